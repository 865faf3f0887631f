"""Running a sweep's unfinished runs: one after another in this process, together as one group
(bclip.train.train_group), as local subprocesses, as a Slurm array or on a TPU pod slice."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from bclip import config as run_configs
from bclip import run_files
from bclip.sweep.runs import (
    PLAN_FILE,
    Run,
    _join,
    check_overrides,
    expand_sweep,
    load_sweep,
    main_command,
    override_flags,
    read_plan,
    vectorised_group_dir,
    write_overrides,
    write_plan,
)

MODES = ("local", "slurm", "tpu")


_LAUNCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "launch")


def run_sequentially(
    config: ml_collections.ConfigDict,
    runs: Sequence[Run],
    train_fn: Callable[[ml_collections.ConfigDict, str], Any] | None = None,
) -> list[str]:
    """Trains each run in this process, one after another; returns the names of failed runs.

    A failed run is reported and the sweep goes on. train_fn defaults to
    bclip.train.train_and_evaluate.
    """
    if train_fn is None:
        from bclip import train  # Imported here: the trainer pulls in all of JAX and Flax.

        train_fn = train.train_and_evaluate
    failed = []
    for number, run in enumerate(runs, 1):
        print(f"[{number}/{len(runs)}] {run.name}", flush=True)
        run_config = run_configs.override(config, run.overrides)
        write_overrides(run)
        try:
            train_fn(run_config, run.workdir)
        except Exception as error:  # noqa: BLE001 - one bad run must not end the sweep.
            print(f"run {run.name} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            failed.append(run.name)
    return failed


def configs_of_runs(config: ml_collections.ConfigDict, runs: Sequence[Run]) -> list[ml_collections.ConfigDict]:
    return [run_configs.override(config, run.overrides) for run in runs]


def check_vectorisable(config: ml_collections.ConfigDict, runs: Sequence[Run]) -> None:
    """Fail, naming the offending keys, unless the runs can train as one vectorised program."""
    from bclip import run_group  # Imported here: it pulls in all of JAX and Flax.

    run_group.check_vectorisable(configs_of_runs(config, runs), [run.name for run in runs])


def run_vectorised(config: ml_collections.ConfigDict, runs: Sequence[Run], root: str) -> list[str]:
    """Trains the runs together as one vectorised program in this process; returns the failed run
    names (those that diverged, or all of them when the group itself fails)."""
    from bclip import train

    group_dir = vectorised_group_dir(root, runs)
    for run in runs:
        write_overrides(run)
    print(f"training {len(runs)} runs as one vectorised program (group state in {group_dir})", flush=True)
    try:
        outcome = train.train_group(
            configs_of_runs(config, runs), [run.workdir for run in runs], group_dir
        )
    except Exception as error:  # noqa: BLE001 - reported like failed runs of a sequential sweep.
        traceback.print_exc()
        print(f"vectorised group failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return [run.name for run in runs]
    return [run.name for run in runs if run.workdir in outcome.failed]


def run_unfinished(
    config: ml_collections.ConfigDict,
    runs: Sequence[Run],
    root: str,
    *,
    vectorize: bool,
    train_fn: Callable[[ml_collections.ConfigDict, str], Any] | None = None,
) -> list[str]:
    """Trains the runs without done.json in this process; returns the failed run names.

    With `vectorize`, they train as one group when they can share a program (bclip.run_group);
    otherwise, saying why, one after another. A given train_fn (config, workdir) always runs them
    one after another.
    """
    pending = [run for run in runs if not run_files.is_finished(run.workdir)]
    if not pending:
        return []
    if vectorize and train_fn is None:
        from bclip import run_group  # Imported here: it pulls in all of JAX and Flax.

        problems = run_group.vectorisation_problems(configs_of_runs(config, pending), [run.name for run in pending])
        if not problems:
            return run_vectorised(config, pending, root)
        print(f"{root}: runs trained one after another, not as one group: {'; '.join(problems)}", flush=True)
    return run_sequentially(config, pending, train_fn)


def _run_subprocess(command: list[str], run: Run) -> int:
    # Several runs sharing accelerators must not each grab most of their memory up front.
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if "://" in run.workdir:
        return subprocess.run(command, env=env, check=False).returncode
    with open(os.path.join(run.workdir, "stdout.log"), "w") as log:
        return subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def run_in_parallel(config_path: str, runs: Sequence[Run], parallel: int, python: str = sys.executable) -> list[str]:
    """Up to `parallel` `python -m bclip.main` subprocesses at once; returns the failed run names."""
    commands = {run.name: main_command(python, config_path, run.workdir, run.overrides) for run in runs}
    for run in runs:
        write_overrides(run)
    failed = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(_run_subprocess, commands[run.name], run): run for run in runs}
        for future in concurrent.futures.as_completed(futures):
            run, returncode = futures[future], future.result()
            print(f"{run.name}: {'done' if returncode == 0 else f'failed (exit code {returncode})'}", flush=True)
            if returncode != 0:
                failed.append(run.name)
    return failed


def _load_launcher(name: str):
    """launch/NAME.py of this checkout (launch/ holds scripts, not an installed package)."""
    path = os.path.join(_LAUNCH_DIR, f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --mode slurm/tpu need bclip's source checkout")
    spec = importlib.util.spec_from_file_location(f"bclip_launch_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_one_from_plan(plan_path: str, run_index: int) -> int:
    """An array task: replaces this process by `python -m bclip.main` for run `run_index`."""
    config_path, runs = read_plan(plan_path)
    if not 0 <= run_index < len(runs):
        raise IndexError(f"run index {run_index} outside the plan's {len(runs)} runs")
    run = runs[run_index]
    if run_files.is_finished(run.workdir):
        print(f"{run.name}: already finished ({run_files.DONE_FILE} present)")
        return 0
    command = main_command(sys.executable, config_path, run.workdir, run.overrides)
    print(f"{run.name}: {shlex.join(command)}", flush=True)
    os.execv(command[0], command)  # A new program with these exact arguments; nothing is interpreted.
    return 1  # Not reached.


def _report(failed: list[str]) -> int:
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def sweep(
    config_path: str,
    root: str,
    mode: str = "local",
    parallel: int = 1,
    dry_run: bool = False,
    launcher_argv: Sequence[str] = (),
    train_fn: Callable[[ml_collections.ConfigDict, str], Any] | None = None,
    python: str = sys.executable,
    vectorize: bool = False,
) -> int:
    """Expands the sweep of `config_path` under `root` and runs the unfinished runs; exit code."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    if parallel < 1:
        raise ValueError("parallel must be at least 1")
    if vectorize and (mode != "local" or parallel != 1):
        raise ValueError("--vectorize trains the runs in this process: use it with --mode local --parallel 1")
    if mode == "slurm":
        # Array tasks start elsewhere and later: give them paths that do not depend on the cwd.
        path, arg = run_configs.split_config_path(config_path)
        config_path = os.path.abspath(path) + ("" if arg is None else f":{arg}")
        root = root if "://" in root else os.path.abspath(root)
    config, entries = load_sweep(config_path)
    runs = expand_sweep(root, entries)
    check_overrides(config, runs)
    if vectorize:
        check_vectorisable(config, runs)  # All runs, finished or not: the sweep as written.
    pending = [run for run in runs if not run_files.is_finished(run.workdir)]
    if mode != "local" or parallel > 1:
        for run in pending:
            override_flags(run.overrides)  # Flags cannot carry every value: fail before starting any.
    print(f"sweep {config_path}: {len(runs)} runs, {len(runs) - len(pending)} finished, {len(pending)} to run")
    for run in runs:
        state = "to run" if run in pending else "finished, skipped"
        print(f"  {run.name} ({state}): {json.dumps(run.overrides)}")
    if not pending:
        return 0

    if mode == "local":
        if not dry_run:
            write_plan(root, config_path, runs)  # So the sweep report lists runs not started yet.
        if vectorize:
            if dry_run:
                print(f"would train {len(pending)} runs as one vectorised program, group state in "
                      f"{vectorised_group_dir(root, pending)}")
                return 0
            return _report(run_vectorised(config, pending, root))
        if dry_run:
            for run in pending:
                print(shlex.join(main_command(python, config_path, run.workdir, run.overrides)))
            return 0
        if parallel == 1:
            return _report(run_sequentially(config, pending, train_fn))
        return _report(run_in_parallel(config_path, pending, parallel, python))

    if mode == "slurm":
        slurm = _load_launcher("slurm")
        resources = slurm.resource_parser(prog="bclip.sweep --mode slurm --").parse_args(list(launcher_argv))
        if python != sys.executable:
            resources.python = python
        plan_path = _join(root, PLAN_FILE)
        if not dry_run:
            plan_path = write_plan(root, config_path, runs)
            for run in pending:
                write_overrides(run)
        indices = [index for index, run in enumerate(runs) if run in pending]
        return slurm.submit_array(resources, plan_path, indices, parallel, dry_run)

    tpu_pod = _load_launcher("tpu_pod")
    if parallel != 1:
        raise ValueError("--mode tpu runs one run at a time on the pod slice; use --parallel 1")
    pod = tpu_pod.pod_parser(prog="bclip.sweep --mode tpu --").parse_args(list(launcher_argv))
    commands = tpu_pod.setup_commands(pod) + [
        tpu_pod.run_command(pod, config_path, run.workdir, override_flags(run.overrides)) for run in pending
    ]
    if not dry_run:
        write_plan(root, config_path, runs)
        for run in pending:
            write_overrides(run)
    return tpu_pod.run_all(commands, dry_run)
