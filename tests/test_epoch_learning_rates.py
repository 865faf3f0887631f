"""optim.epoch_learning_rates: constant learning rates in chosen epochs, against hand-computed
schedules, its errors, and a tiny group of two runs sharded over 8 devices that trains with them
and resumes exactly in the middle of an overridden epoch. (A lone SafeCLIP run with its warm-up rate,
resumed from a checkpoint, is in test_safeclip.py.)"""

import math
import os

import jax
import numpy as np
import optax
import pytest
from test_configs import load_from_command_line
from test_run_group import _batch

from bclip import config as run_configs
from bclip import epoch_passes, optim, run_group, sharding, train, train_step
from bclip.models import clip


def _schedule_values(config, total_steps, steps_per_epoch, peak=None):
    schedule = jax.jit(lambda count, peak: optim.learning_rate_schedule(config, total_steps, peak, steps_per_epoch)(count))
    return np.array([schedule(step, config.learning_rate if peak is None else peak) for step in range(total_steps)])


def test_listed_epochs_take_their_rate_and_the_schedule_runs_on_through_them():
    # 4 epochs of 2 steps, peak 1, 2 warm-up steps, then cosine over the 6 steps left:
    # 0, 0.5, then 0.5 * (1 + cos(pi * k / 6)) for k = 0..5.
    config = optim.optim_config(learning_rate=1.0, warmup_steps=2, epoch_learning_rates={1: 0.25, 3: 0.0})
    plain = [0.0, 0.5, 1.0, 0.5 + 0.25 * math.sqrt(3), 0.75, 0.5, 0.25, 0.5 - 0.25 * math.sqrt(3)]
    # Epoch 1 (steps 2, 3) at 0.25 and epoch 3 (steps 6, 7) at 0; step 4 is the schedule's own step 4
    # (0.75), not where it would be had the schedule paused through epoch 1 (1.0).
    np.testing.assert_allclose(_schedule_values(config, 8, 2), [0.0, 0.5, 0.25, 0.25, 0.75, 0.5, 0.0, 0.0], atol=1e-7)
    # A run's traced peak scales the schedule, never the constant rates (the same for every run).
    expected = [2 * value for value in plain]
    expected[2:4], expected[6:8] = [0.25, 0.25], [0.0, 0.0]
    np.testing.assert_allclose(_schedule_values(config, 8, 2, peak=2.0), expected, atol=1e-7)
    # Unset: the very program of the schedule as it was before epoch overrides (optax's warm-up then
    # cosine, joined), so runs without them compute what they did.
    unset = optim.optim_config(learning_rate=1.0, warmup_steps=2)
    before = optax.join_schedules(
        [optax.linear_schedule(0.0, 1.0, 2), optax.cosine_decay_schedule(1.0, 6, alpha=0.0)], [2]
    )
    as_program = lambda schedule: str(jax.make_jaxpr(schedule)(0))  # noqa: E731
    assert as_program(optim.learning_rate_schedule(unset, 8, steps_per_epoch=2)) == as_program(before)
    np.testing.assert_allclose(_schedule_values(unset, 8, 2), plain, atol=1e-7)


@pytest.mark.parametrize(
    "rates, message",
    [
        ({4: 1e-5}, "epoch 4 is outside the run's epochs 0..3"),
        ({-1: 1e-5}, "epoch -1 is outside"),
        ({"1": 1e-5}, "key '1' \\(str\\) is not an integer epoch"),
        ({1.0: 1e-5}, "key 1.0 \\(float\\) is not an integer epoch"),
        ({True: 1e-5}, "key True \\(bool\\) is not an integer epoch"),
        ({1: -1e-5}, "\\[1\\]: the rate must be a finite number >= 0, got -1e-05"),
        ({1: float("nan")}, "\\[1\\]: the rate must be a finite number >= 0"),
    ],
)
def test_bad_entries_are_errors_naming_them(rates, message):
    config = optim.optim_config(epoch_learning_rates=rates)
    with pytest.raises(ValueError, match="config.optim.epoch_learning_rates.*" + message):
        optim.learning_rate_schedule(config, 8, steps_per_epoch=2)


def test_a_run_refuses_bad_entries_before_any_work_and_the_schedule_needs_the_epoch_length(tmp_path):
    config = run_configs.override(run_configs.run_config(), {"train.num_epochs": 2, "optim.epoch_learning_rates": {2: 1e-5}})
    with pytest.raises(ValueError, match="epoch 2 is outside the run's epochs 0..1"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="steps_per_epoch"):
        optim.learning_rate_schedule(optim.optim_config(epoch_learning_rates={0: 1e-5}), 8)


def test_safeclip_learning_rates_cover_its_cross_modal_warmup():
    options = {"inmodal_warmup_epochs": 5, "multimodal_warmup_epochs": 2}
    assert epoch_passes.safeclip_learning_rates(options) == {5: 5e-6, 6: 5e-6}
    assert epoch_passes.safeclip_learning_rates({**options, "multimodal_warmup_epochs": 0}) == {}


def test_the_entry_is_set_from_the_command_line_and_from_nested_overrides():
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain_safeclip_cc.py")
    config = load_from_command_line(f"{path}:cc3m", "--config.optim.epoch_learning_rates={5: 1e-6, 7: 0.0}")
    assert config.optim.epoch_learning_rates.to_dict() == {5: 1e-6, 7: 0.0}
    # A mapping keyed by epochs stays one value when nested overrides are flattened ...
    flat = run_configs.dotted({"optim": {"learning_rate": 1e-4, "epoch_learning_rates": {2: 1e-6}}})
    assert flat == {"optim.learning_rate": 1e-4, "optim.epoch_learning_rates": {2: 1e-6}}
    config = run_configs.override(run_configs.run_config(), flat)
    assert config.optim.epoch_learning_rates.to_dict() == {2: 1e-6}
    # ... and the runs of one group must share it (one compiled step holds the constants).
    other = run_configs.override(config, {"optim.epoch_learning_rates": {2: 1e-5}})
    same = run_configs.override(config, {"optim.learning_rate": 1e-3})
    assert run_group.vectorisation_problems([config, same], ["a", "b"]) == []
    (problem,) = run_group.vectorisation_problems([config, other], ["a", "b"])
    assert problem.startswith("optim.epoch_learning_rates differs between runs (a: {2: 1e-06}, b: {2: 1e-05}")


# ---------------------------------------------------------------------------------------------
# A group of two runs on 8 devices
# ---------------------------------------------------------------------------------------------

PEAKS, OVERRIDE = (1e-3, 4e-3), 3e-4
STEPS_PER_EPOCH, NUM_EPOCHS = 2, 3


def test_a_sharded_group_trains_each_runs_schedule_with_the_epochs_rate_and_resumes_inside_it():
    # The tiny ViT of the fake-data tests; two runs differing in their peak rate, as a sweep's.
    config = run_configs.run_config(
        "micro-vit",
        image={"size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
        text={"context_length": 12, "vocab_size": 64, "width": 32, "layers": 1, "heads": 2},
        embed_dim=32,
    )
    config = run_configs.override(config, {"optim.warmup_steps": 0, "optim.epoch_learning_rates": {1: OVERRIDE}})
    configs = [run_configs.override(config, {"optim.learning_rate": peak}) for peak in PEAKS]
    model, mesh, total_steps = clip.build_model(config.model), sharding.make_mesh(), STEPS_PER_EPOCH * NUM_EPOCHS
    tx = optim.make_optimizer(config.optim)
    run_state = jax.device_get(
        train_step.init_state(tx, train_step.init_variables(model, jax.random.key(0), 16, 12))
    )
    run_shardings = sharding.state_shardings(jax.eval_shape(lambda: run_state), mesh, config.sharding)
    # "dispatch", the trainer's way over a group's runs on CPUs.
    group = run_group.RunGroup(len(PEAKS), mesh, "dispatch")
    hparams = group.hyperparams(run_group.group_hyperparams(configs))
    batches = [jax.device_put(_batch(config.model, seed), sharding.batch_sharding(mesh)) for seed in range(total_steps)]

    def train(states, steps):
        # A fresh program each time, as a restarted trainer builds it.
        run_step = train_step.make_train_step(model, tx, config.objective, config.optim, total_steps, STEPS_PER_EPOCH)
        step_fn, rates = group.jit_step(run_step, run_shardings), []
        for step in steps:
            states, metrics = step_fn(states, batches[step], jax.random.key(step), hparams)
            rates.append(np.asarray(metrics["learning_rate"]))
        return states, rates

    states, first = train(group.replicate(jax.device_put(run_state, run_shardings), run_shardings), range(3))
    assert len(jax.tree.leaves(states["params"])[0].sharding.device_set) == 8
    saved = jax.device_get(states)  # as a checkpoint after step 3 holds it, mid-way through epoch 1
    states, rest = train(states, range(3, total_steps))
    # No warm-up; cosine over the 6 steps at each run's peak, but epoch 1 (steps 2, 3) at the
    # constant rate for both runs.
    for run, peak in enumerate(PEAKS):
        expected = [peak * 0.5 * (1 + math.cos(math.pi * step / total_steps)) for step in range(total_steps)]
        expected[2:4] = [OVERRIDE, OVERRIDE]
        np.testing.assert_allclose([rates[run] for rates in first + rest], expected, rtol=1e-6)
    # Restarted from the saved state, the group takes the same rates and ends bit-identical.
    resumed, again = train(jax.device_put(saved, group.shardings(run_shardings)), range(3, total_steps))
    np.testing.assert_array_equal(np.stack(again), np.stack(rest))
    for (path, leaf), other in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(states)), jax.tree.leaves(jax.device_get(resumed))):
        assert np.array_equal(leaf, other), jax.tree_util.keystr(path)
