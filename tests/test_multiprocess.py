"""The trainer in two processes of 4 CPU devices each, joined by jax.distributed, against one process
of 8 devices.

Every run is `bclip.train.train_and_evaluate` itself on the same config (tests/_multiprocess_worker.py:
one epoch of poisoned MMCL pretraining of micro-vit, 4 steps, FSDP parameters, a checkpoint every 2
steps, an evaluation at the start and at the end); a recorder in each process notes the batches it
read, the eval images it decoded, the checkpoint it resumed from and what it wrote through epath.
The one-process run is trained in this test process (8 devices, tests/conftest.py); the two-process
runs are started with the environment `launch/local.py` gives its processes. They must train alike
(the same metrics to round-off, the same final parameters but for round-off that Adam magnifies,
the same evaluation figures), only process 0 may write the run files, each process must read its
own half of every batch and decode its own half of the eval set, and a two-process run stopped after
step 3 must resume from its step-2 checkpoint and end exactly as the uninterrupted one (stopped and
resumed by fresh trainers in the processes that trained the uninterrupted one; see the worker's
docstring). The runs are shared by the
module.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
import saved_arrays

from bclip import checkpointing, run_files
from bclip.data.synthetic import writer

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS_DIR, "_multiprocess_worker.py")


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load("test_multiprocess_worker", WORKER)

NUM_TRAIN = 128
NUM_TEST = 12  # each of two processes decodes 6, in eval batches of 4 local rows (one padded)
STEPS = NUM_TRAIN // worker.BATCH_SIZE  # one epoch
STOP_AFTER = 3  # the stopped run's last step: after its step-2 checkpoint, with step 3 logged
SAVED_BEFORE_STOP = 2
EMBED_WIDTH = 32  # micro-vit's transformer width in both towers
# The launch (three runs) ends well within this; a process that hangs (e.g. waiting for a peer that
# died) is killed.
RUN_TIMEOUT_S = 600
# Measured (2 x 4 devices against 1 x 8, this config): the logged metrics differ by at most 2.2e-7
# relative (loss; grad_norm 1.6e-7), the parameters other than the key biases by at most 1.2e-7 (one
# float32 step at 1.0). The bounds leave a margin of about 4x for other CPUs and XLA versions.
LOSS_RTOL = 1e-6
PARAMS_ATOL = 5e-7


# ---------------------------------------------------------------------------------------------
# Starting the workers
# ---------------------------------------------------------------------------------------------


def _base_env(cache_dir) -> dict[str, str]:
    """This environment without anything that would make a worker join some other job, plus a
    compilation cache."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("BCLIP_", "SLURM_", "TPU_", "CLOUD_TPU_")) and key != "XLA_FLAGS"
    }
    env.update(
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def _compiler_flags() -> str:
    """This process's XLA flags (tests/conftest.py) but the device count, so that the workers'
    programs are compiled as the one-process run's are."""
    return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count"))


def _two_process_jobs(name, base_env, argv) -> list[tuple[str, dict[str, str], list[str]]]:
    """Two processes of 4 CPU devices, with the environment `launch/local.py` gives them."""
    local = _load("test_multiprocess_launch_local", os.path.join(os.path.dirname(TESTS_DIR), "launch", "local.py"))
    commands = local.process_commands(sys.executable, "unused", "unused", [], num_processes=2,
                                      cpu_devices_per_process=4, port=local.free_port())
    jobs = []
    for i, (env, _) in enumerate(commands):
        env = {**base_env, **env, "XLA_FLAGS": f"{env['XLA_FLAGS']} {_compiler_flags()}"}
        jobs.append((f"{name}_process{i}", env, argv))
    return jobs


class _Workers:
    """Jobs (name, env, argv) started at once, their output in LOG_DIR/name.log."""

    def __init__(self, jobs, log_dir):
        self.jobs, self.log_dir = jobs, log_dir
        self.processes, self.logs = [], []
        for name, env, argv in jobs:
            log = open(os.path.join(log_dir, f"{name}.log"), "w")
            self.logs.append(log)
            self.processes.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, timeout_s: float) -> None:
        """Until every job succeeded; when one fails or time runs out, kills the rest and fails with
        the end of every log (a process of a distributed job whose peer died would otherwise wait)."""
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                codes = [process.poll() for process in self.processes]
                if all(code == 0 for code in codes):
                    return
                failed = [name for (name, _, _), code in zip(self.jobs, codes) if code not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    why = f"{', '.join(failed)} failed" if failed else f"timed out after {timeout_s:.0f} s"
                    raise AssertionError(f"worker run {why}:\n" + self._log_tails())
                time.sleep(0.2)
        finally:
            self.stop()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait()
        for log in self.logs:
            log.close()
        self.logs = []

    def _log_tails(self, num_lines: int = 25) -> str:
        tails = []
        for name, _, _ in self.jobs:
            with open(os.path.join(self.log_dir, f"{name}.log"), errors="replace") as f:
                lines = [line for line in f.read().splitlines() if not line.startswith("[Gloo]")]
            tails.append(f"--- {name} ---\n" + "\n".join(lines[-num_lines:]))
        return "\n".join(tails)


def _worker_argv(world, workdir, record_dir, *extra) -> list[str]:
    return [sys.executable, WORKER, "--world", str(world), "--workdir", str(workdir), "--record", str(record_dir), *map(str, extra)]


# ---------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------


def _run(workdir, records: list[dict]) -> dict:
    workdir = str(workdir)
    return {
        "workdir": workdir,
        "processes": records,
        "files": sorted(os.listdir(workdir)),
        "metrics": run_files.read_json_lines(os.path.join(workdir, run_files.METRICS_FILE)),
        "evals": run_files.read_json_lines(os.path.join(workdir, run_files.EVALS_FILE)),
        "params": saved_arrays.final_params(workdir),
    }


def _records(record_dir, num_processes: int) -> list[dict]:
    records = []
    for i in range(num_processes):
        with open(os.path.join(record_dir, f"process_{i}.json")) as f:
            records.append(json.load(f))
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process run, the two-process run, and a two-process run stopped after step 3 then
    resumed in the same folder (what the stopped run left is copied aside as "stopped")."""
    root = tmp_path_factory.mktemp("multiprocess")
    world = writer.write_world(root / "world", image_size=32, num_train=NUM_TRAIN, num_test=NUM_TEST, num_selection=4)
    # One launch of two processes trains the uninterrupted run, then the stopped run and its
    # resumption (a fresh trainer each): the later runs compile nothing the first one compiled.
    two_argv = _worker_argv(
        world, root / "two", root / "two_records",
        "--resume_workdir", root / "resumed", "--resume_record", root / "resumed_records",
        "--stop_after_steps", STOP_AFTER, "--stopped_copy", root / "stopped", "--stopped_record", root / "stopped_records",
    )
    env = _base_env(root / "two_process_cache")
    # The two processes train while this process trains the one-process run.
    workers = _Workers(_two_process_jobs("two", env, two_argv), root)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            recorder = worker.Recorder(str(root / "single"))
            recorder.install(monkeypatch.setattr)
            single = recorder.run(worker.worker_config(str(world)))
    except BaseException:
        workers.stop()
        raise
    workers.wait(RUN_TIMEOUT_S)
    return {
        "single": _run(root / "single", [single]),
        "two": _run(root / "two", _records(root / "two_records", 2)),
        "stopped": _run(root / "stopped", _records(root / "stopped_records", 2)),
        "resumed": _run(root / "resumed", _records(root / "resumed_records", 2)),
    }


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def _without_key_biases(params: dict) -> dict:
    """The parameters less the key third of each fused qkv bias.

    A key bias adds the same q·b to every logit of a query's attention row, which softmax cancels:
    its true gradient is zero, so what it gets is round-off, and Adam scales that to ±learning rate
    whatever its size. It is the one place where a different summation order (8 devices in one
    process, or 2 x 4) shows up as a visibly different parameter (measured: up to 8.1e-4).
    """
    trimmed = {}
    for name, value in params.items():
        if "['qkv']['bias']" in name:
            value = np.concatenate([value[:EMBED_WIDTH], value[2 * EMBED_WIDTH :]])
        trimmed[name] = value
    return trimmed


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "pairs_per_s"} for record in records]


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
    single, two = runs["single"], runs["two"]
    assert [record["step"] for record in two["metrics"]] == list(range(1, STEPS + 1))
    for one, other in zip(_without_timing(single["metrics"]), _without_timing(two["metrics"]), strict=True):
        assert one.keys() == other.keys()
        for key in one:
            np.testing.assert_allclose(other[key], one[key], rtol=LOSS_RTOL, atol=0, err_msg=f"step {one['step']}: {key}")
    losses = [record["loss"] for record in two["metrics"]]
    assert losses[-1] < losses[0] - 0.5  # it trained
    # The same evaluation figures (at the start and at the end), and every process returns them.
    assert [record["step"] for record in two["evals"]] == [0, STEPS]
    assert two["evals"] == single["evals"]
    assert two["evals"][-1]["test/num_images"] == NUM_TEST
    final = {k: v for k, v in two["evals"][-1].items() if k not in ("step", "epoch")}
    assert [process["results"] for process in two["processes"]] == [final, final]
    assert single["processes"][0]["results"] == final

    assert single["params"].keys() == two["params"].keys()
    close_single, close_two = _without_key_biases(single["params"]), _without_key_biases(two["params"])
    # Adam moves a parameter by at most about its learning rate per step.
    adam_bound = 2 * sum(record["learning_rate"] for record in single["metrics"])
    for name in single["params"]:
        np.testing.assert_allclose(close_two[name], close_single[name], rtol=0, atol=PARAMS_ATOL, err_msg=name)
        assert np.abs(two["params"][name] - single["params"][name]).max() <= adam_bound, name


@pytest.mark.slow
def test_processes_read_each_example_once_per_epoch(runs):
    single = runs["single"]["processes"][0]
    two = runs["two"]["processes"]
    # Each global batch holds the same examples: the processes' halves make up the one process's.
    for step in range(STEPS):
        halves = [process["indices"][step] for process in two]
        assert [len(half) for half in halves] == [worker.BATCH_SIZE // 2] * 2
        assert sorted(halves[0] + halves[1]) == sorted(single["indices"][step])
    shares = [np.ravel(process["indices"]) for process in two]
    assert not set(shares[0]) & set(shares[1])
    np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.arange(NUM_TRAIN))
    # Poisoning is decided per example, so both runs poison the same ones, each once.
    poisoned = lambda process: np.asarray(process["indices"])[np.asarray(process["poisoned"])]  # noqa: E731
    poisoned_two = np.concatenate([poisoned(process) for process in two])
    assert len(poisoned_two) == worker.NUM_POISONED
    np.testing.assert_array_equal(np.sort(poisoned_two), np.sort(poisoned(single)))


@pytest.mark.slow
def test_each_process_decodes_only_its_share_of_the_eval_set(runs):
    # Two evaluations (the start and the end); in each, process p decodes examples p, p + 2, ...
    for index, process in enumerate(runs["two"]["processes"]):
        assert [sorted(decoded) for decoded in process["eval_decodes"]] == [list(range(index, NUM_TEST, 2))] * 2
    assert [sorted(decoded) for decoded in runs["single"]["processes"][0]["eval_decodes"]] == [list(range(NUM_TEST))] * 2


def _files_written(writes, prefix: str = "") -> set[str]:
    """Files created or replaced (not folders made or files removed) under `prefix`."""
    written = ("open:", "replace", "rename", "copy")
    return {path for operation, path in writes if operation.startswith(written) and path.startswith(prefix)}


@pytest.mark.slow
def test_only_process_0_writes_the_run_files(runs):
    two = runs["two"]
    chief, other = (process["writes"] for process in two["processes"])
    outside_checkpoints = lambda writes: {p for p in _files_written(writes) if not p.startswith("checkpoints/")}  # noqa: E731
    # What process 0 wrote (poison_indices.json and done.json are written whole and then renamed).
    assert outside_checkpoints(chief) == {
        run_files.CONFIG_FILE, run_files.METRICS_FILE, run_files.EVALS_FILE,
        run_files.POISON_FILE, run_files.POISON_FILE + ".tmp", run_files.DONE_FILE, run_files.DONE_FILE + ".tmp",
    }
    assert f"checkpoints/{checkpointing.EPOCHS_FILE}" in _files_written(chief)
    # Process 1 made the run folder (as every process does) and wrote nothing but its own part of
    # each checkpoint: its data position and its arrays' metadata.
    assert [write for write in other if not write[1].startswith("checkpoints/") and tuple(write) != ("makedirs", ".")] == []
    other_checkpoint_files = _files_written(other, "checkpoints/")
    assert all("process_1" in os.path.basename(path) for path in other_checkpoint_files), other_checkpoint_files
    for step in (2, 4):
        data_position = [p for p in other_checkpoint_files if p.startswith(f"checkpoints/{step}") and p.endswith("/process_1-of-2.json")]
        assert len(data_position) == 1, (step, other_checkpoint_files)
    # The run folder holds each run file once (and one event file: process 0's summary writer).
    files = two["files"]
    assert {name for name in files if not name.startswith("events.out.tfevents")} == {
        run_files.CONFIG_FILE, run_files.METRICS_FILE, run_files.EVALS_FILE, run_files.POISON_FILE,
        run_files.DONE_FILE, run_files.CHECKPOINTS_DIR,
    }
    assert len([name for name in files if name.startswith("events.out.tfevents")]) == 1
    done = run_files.read_json(os.path.join(two["workdir"], run_files.DONE_FILE))
    assert done == {"steps": STEPS, "results": two["processes"][0]["results"]}
    # The one-process run wrote the same run files.
    assert outside_checkpoints(runs["single"]["processes"][0]["writes"]) == outside_checkpoints(chief)


@pytest.mark.slow
def test_stopped_two_process_run_resumes_from_its_checkpoint_as_if_uninterrupted(runs):
    two, stopped, resumed = runs["two"], runs["stopped"], runs["resumed"]
    # The stopped run saved step 2, logged step 3 and stopped without finishing.
    assert [process["stopped"] for process in stopped["processes"]] == [True, True]
    assert [len(process["indices"]) for process in stopped["processes"]] == [STOP_AFTER] * 2
    assert [record["step"] for record in stopped["metrics"]] == list(range(1, STOP_AFTER + 1))
    assert run_files.DONE_FILE not in stopped["files"]
    assert sorted(ocp.utils.checkpoint_steps(os.path.join(stopped["workdir"], "checkpoints"))) == [SAVED_BEFORE_STOP]
    for uninterrupted, restarted in zip(two["processes"], resumed["processes"], strict=True):
        assert restarted["restored_step"] == SAVED_BEFORE_STOP
        # Each process continues on exactly its next batches ...
        assert restarted["indices"] == uninterrupted["indices"][SAVED_BEFORE_STOP:]
        assert restarted["results"] == uninterrupted["results"]
    # ... and the restored state takes exactly the same steps: step 3 is logged once, as before.
    assert _without_timing(resumed["metrics"]) == _without_timing(two["metrics"])
    assert resumed["evals"] == two["evals"]
    for name, value in two["params"].items():
        np.testing.assert_array_equal(resumed["params"][name], value, err_msg=name)
