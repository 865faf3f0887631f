"""The step benchmark's warm-up rule (bclip.bench.step.settle): untimed steps go on while a step
still faults in new pages, so heap growth is not timed as the step's cost."""

import mmap

from bclip.bench import step as bench_step


def growing_steps(growing, kept: list):
    """A step that, for the calls in `growing` (a count: the first ones; or a set of call numbers), writes and keeps 16 MB of fresh anonymous memory
    (4,096 pages faulted in: a private mapping, which no huge page serves without madvise), and
    afterwards touches nothing new."""

    def run(i):
        if (i < growing) if isinstance(growing, int) else (i in growing):
            memory = mmap.mmap(-1, 16 << 20)
            memory.write(b"\1" * (16 << 20))
            kept.append(memory)

    return run


def test_warm_up_lasts_until_steps_in_a_row_fault_in_nothing_new():
    kept = []
    steps, faults = bench_step.settle(growing_steps(4, kept), min_steps=2, max_steps=10, settled_in_a_row=1)
    assert steps == 5 and faults <= bench_step.SETTLED_FAULTS  # steps 0-3 grew; step 4 did not
    assert len(kept) == 4
    # Growth with quiet steps between its jumps (as the retained heap's): steps 0, 2 and 3 grow, so
    # the first three quiet steps in a row are 4, 5 and 6.
    kept = []
    steps, faults = bench_step.settle(growing_steps({0, 2, 3}, kept), min_steps=2, max_steps=10, settled_in_a_row=3)
    assert steps == 7 and faults <= bench_step.SETTLED_FAULTS and len(kept) == 3


def test_warm_up_runs_its_minimum_and_stops_at_its_maximum():
    steps, faults = bench_step.settle(growing_steps(0, []), min_steps=4, max_steps=10, settled_in_a_row=2)
    assert steps == 4 and faults <= bench_step.SETTLED_FAULTS
    # Still growing at the maximum: it stops there and reports the last step's faults.
    steps, faults = bench_step.settle(growing_steps(100, []), min_steps=1, max_steps=4)
    assert steps == 4 and faults >= 4096
