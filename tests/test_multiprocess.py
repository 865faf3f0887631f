"""Training in two processes of 4 CPU devices each, joined by jax.distributed, against one process of 8.

Each run is tests/_multiprocess_worker.py started in fresh processes with the local launcher's
environment. The two-process run must take the same train steps as the single process, read every
example exactly once per epoch between its processes, and, restarted from a checkpoint its two
processes saved, take exactly the steps it would have taken uninterrupted. The runs are shared by
the module; together they take about a minute on 2 busy CPU cores.
"""

import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from bclip.data.synthetic import writer

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS_DIR, "_multiprocess_worker.py")

NUM_TRAIN = 128
BATCH_SIZE = 32
STEPS = NUM_TRAIN // BATCH_SIZE  # one epoch
SAVE_AT = 2
NUM_POISONED = 8  # the worker's config.poison.count
LEARNING_RATE = 1e-3  # the worker's config.optim.learning_rate
EMBED_WIDTH = 32  # micro-vit's transformer width in both towers
# Each run ends well within this; a process that hangs (e.g. waiting for a peer that died) is killed.
RUN_TIMEOUT_S = 300
# Compiling the train step dominates each run; unoptimised CPU code compiles in about half the time
# and runs these tiny steps just as fast. Every run uses it, so they still compute alike.
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0"


def _local_launcher():
    spec = importlib.util.spec_from_file_location(
        "test_multiprocess_launch_local", os.path.join(os.path.dirname(TESTS_DIR), "launch", "local.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Starting the workers
# ---------------------------------------------------------------------------------------------


def _base_env(cache_dir) -> dict[str, str]:
    """This environment without anything that would make a worker join some other job, plus a
    compilation cache shared by the runs (the resumed run's process 0 reuses the first run's steps)."""
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


def _run_all(jobs: list[tuple[str, dict[str, str], list[str]]], log_dir, timeout_s: float) -> None:
    """Runs (name, env, argv) jobs at once; when one fails or time runs out, kills the rest and fails
    with the end of every log (a process of a distributed job whose peer died would otherwise wait)."""
    processes, logs = [], []
    try:
        for name, env, argv in jobs:
            log = open(os.path.join(log_dir, f"{name}.log"), "w")
            logs.append(log)
            processes.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        while True:
            codes = [process.poll() for process in processes]
            if all(code == 0 for code in codes):
                return
            failed = [name for (name, _, _), code in zip(jobs, codes) if code not in (None, 0)]
            if failed or time.monotonic() > deadline:
                why = f"{', '.join(failed)} failed" if failed else f"timed out after {timeout_s:.0f} s"
                raise AssertionError(f"worker run {why}:\n" + _log_tails(jobs, log_dir))
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        for process in processes:
            process.wait()
        for log in logs:
            log.close()


def _log_tails(jobs, log_dir, num_lines: int = 25) -> str:
    tails = []
    for name, _, _ in jobs:
        with open(os.path.join(log_dir, f"{name}.log"), errors="replace") as f:
            lines = [line for line in f.read().splitlines() if not line.startswith("[Gloo]")]
        tails.append(f"--- {name} ---\n" + "\n".join(lines[-num_lines:]))
    return "\n".join(tails)


def _worker_argv(world, out_dir, checkpoint_dir, *extra) -> list[str]:
    return [sys.executable, WORKER, "--world", str(world), "--out", str(out_dir), "--checkpoints",
            str(checkpoint_dir), "--steps", str(STEPS), "--batch_size", str(BATCH_SIZE), *extra]


def _two_process_jobs(name, base_env, argv) -> list[tuple[str, dict[str, str], list[str]]]:
    """Two processes of 4 CPU devices, with the environment `launch/local.py` gives them."""
    local = _local_launcher()
    commands = local.process_commands(sys.executable, "unused", "unused", [], num_processes=2,
                                      cpu_devices_per_process=4, port=local.free_port())
    jobs = []
    for i, (env, _) in enumerate(commands):
        env = {**base_env, **env, "XLA_FLAGS": f"{env['XLA_FLAGS']} {FAST_COMPILE_XLA_FLAGS}"}
        jobs.append((f"{name}_process{i}", env, argv))
    return jobs


def _load_run(out_dir, num_processes: int) -> dict:
    processes = []
    for i in range(num_processes):
        with np.load(os.path.join(out_dir, f"process_{i}.npz"), allow_pickle=False) as f:
            processes.append({key: f[key] for key in f.files})
    with np.load(os.path.join(out_dir, "params.npz"), allow_pickle=False) as f:
        params = {key: f[key] for key in f.files}
    return {"processes": processes, "params": params}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process run, the two-process run (saving at step SAVE_AT) and its resumption."""
    root = tmp_path_factory.mktemp("multiprocess")
    world = writer.write_world(root / "world", image_size=32, num_train=NUM_TRAIN, num_test=4, num_selection=4)
    base_env = _base_env(root / "compilation_cache")
    single_env = {
        **base_env,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_XLA_FLAGS}",
        "BCLIP_NUM_PROCESSES": "1",
    }
    single = [("single", single_env, _worker_argv(world, root / "single", root / "single_checkpoints"))]
    two = _two_process_jobs(
        "two", base_env, _worker_argv(world, root / "two", root / "two_checkpoints", "--save_at", str(SAVE_AT))
    )
    # The two independent runs share the machine; the resumed run needs the other's checkpoint.
    _run_all(single + two, root, RUN_TIMEOUT_S)
    resumed = _two_process_jobs(
        "resumed", base_env, _worker_argv(world, root / "resumed", root / "two_checkpoints", "--resume")
    )
    _run_all(resumed, root, RUN_TIMEOUT_S)
    return {
        "single": _load_run(root / "single", 1),
        "two": _load_run(root / "two", 2),
        "resumed": _load_run(root / "resumed", 2),
    }


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def _without_key_biases(params: dict) -> dict:
    """The parameters less the key third of each fused qkv bias.

    A key bias adds the same q·b to every logit of a query's attention row, which softmax cancels:
    its true gradient is zero, so what it gets is round-off, and Adam scales that to ±learning rate
    whatever its size. It is the one place where a different summation order (8 devices in one
    process, or 2 x 4) shows up as a visibly different parameter.
    """
    trimmed = {}
    for name, value in params.items():
        if "['qkv']['bias']" in name:
            value = np.concatenate([value[:EMBED_WIDTH], value[2 * EMBED_WIDTH :]])
        trimmed[name] = value
    return trimmed


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
    single, two = runs["single"]["processes"][0], runs["two"]["processes"]
    # Every process sees the same (replicated) loss.
    np.testing.assert_array_equal(two[0]["losses"], two[1]["losses"])
    np.testing.assert_allclose(two[0]["losses"], single["losses"], rtol=1e-5)
    assert two[0]["losses"][-1] < two[0]["losses"][0] - 0.5  # it trained
    # Each global batch holds the same examples: the processes' halves make up the single one's.
    for step in range(STEPS):
        global_batch = np.concatenate([two[0]["indices"][step], two[1]["indices"][step]])
        np.testing.assert_array_equal(np.sort(global_batch), np.sort(single["indices"][step]))

    single_params, two_params = runs["single"]["params"], runs["two"]["params"]
    assert single_params.keys() == two_params.keys()
    close_single, close_two = _without_key_biases(single_params), _without_key_biases(two_params)
    for name in single_params:
        np.testing.assert_allclose(close_two[name], close_single[name], rtol=1e-5, atol=1e-6, err_msg=name)
        # Key biases included, no parameter differs by more than Adam's steps can move it.
        assert np.abs(two_params[name] - single_params[name]).max() <= 2 * LEARNING_RATE * STEPS, name


@pytest.mark.slow
def test_processes_read_each_example_once_per_epoch(runs):
    two = runs["two"]["processes"]
    shares = [process["indices"].ravel() for process in two]
    assert [share.size for share in shares] == [NUM_TRAIN // 2, NUM_TRAIN // 2]
    assert not set(shares[0]) & set(shares[1])
    np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.arange(NUM_TRAIN))
    # Poisoning is decided per example, so both runs poison the same ones, each once.
    poisoned_two = np.concatenate([process["indices"][process["poisoned"]] for process in two])
    single = runs["single"]["processes"][0]
    poisoned_single = single["indices"][single["poisoned"]]
    assert len(poisoned_two) == NUM_POISONED
    np.testing.assert_array_equal(np.sort(poisoned_two), np.sort(poisoned_single))


@pytest.mark.slow
def test_resumed_two_process_run_takes_the_same_next_steps(runs):
    two, resumed = runs["two"]["processes"], runs["resumed"]["processes"]
    for uninterrupted, restarted in zip(two, resumed):
        assert int(restarted["first_step"]) == SAVE_AT
        # Each process continues on exactly its next batches ...
        np.testing.assert_array_equal(restarted["indices"], uninterrupted["indices"][SAVE_AT:])
        # ... and the restored state takes exactly the same steps.
        np.testing.assert_array_equal(restarted["losses"], uninterrupted["losses"][SAVE_AT:])
    for name, value in runs["two"]["params"].items():
        np.testing.assert_array_equal(runs["resumed"]["params"][name], value, err_msg=name)
