"""Hyper-parameter sweeps from config files: a config file's `get_sweep(arg)` lists override
dicts; each becomes one run in its own readable folder under a root, run here or on a cluster.

  python -m bclip.sweep --config configs/X.py[:arg] --workdir ROOT [--mode local|slurm|tpu]
      [--parallel N] [--vectorize] [--dry_run] [-- LAUNCHER FLAGS]

  local, --parallel 1: runs one after another in this process (bclip.train.train_and_evaluate).
  local, --parallel N: N `python -m bclip.main` subprocesses at once (output in RUN/stdout.log).
  local, --vectorize: the unfinished runs train together as one jitted program reading one shared
         input stream (bclip.train.train_group). Only for sweeps whose runs differ in nothing but
         optim.learning_rate, optim.weight_decay and objective.*_weight (any other differing key
         is an error that names it); deep clustering cannot be vectorised. Each run still gets its
         folder with the files a lone run writes (metrics.jsonl, evals.jsonl, its final checkpoint,
         done.json). The group's stacked checkpoints live in ROOT/_vectorised/GROUP/ until it
         finishes, so a killed vectorised sweep resumes where it was; a run that diverges is
         reported as failed and the others go on.
  slurm: one array job, one task per run, at most N at once (launch/slurm.py; its flags after --).
  tpu:   runs one after another on a pod slice (launch/tpu_pod.py; its flags after --).

A sweep entry maps dotted keys to values, {"optim.learning_rate": 1e-4, "objective.ssl_weight": 2.0};
its run folder is ROOT/lr=1e-04_ssl_weight=2 and holds overrides.json. Runs whose folder has
done.json are skipped, so rerunning a sweep finishes what is left. An array task runs one run
of the plan written to ROOT/sweep.json:

  python -m bclip.sweep --plan ROOT/sweep.json --run_index I
"""

from __future__ import annotations

if __name__ == "__main__":
    # First, before the heavy imports below: on a CPU host this restarts the command with a glibc
    # heap that keeps XLA's step buffers mapped (see bclip/cpu_runtime.py).
    from bclip import cpu_runtime

    cpu_runtime.reexec_with_retained_heap()

import argparse
import concurrent.futures
import copy
import dataclasses
import decimal
import difflib
import hashlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from etils import epath

from bclip import distributed

DONE_FILE = "done.json"  # Written by bclip.train at the end of a successful run.
OVERRIDES_FILE = "overrides.json"
PLAN_FILE = "sweep.json"
VECTORISED_DIR = "_vectorised"  # ROOT/_vectorised/GROUP: what the runs of a vectorised group share.
MODES = ("local", "slurm", "tpu")

# Short names for keys that recur in sweeps; any other key is named by its last component.
SHORT_KEY_NAMES = {
    "learning_rate": "lr",
    "weight_decay": "wd",
    "batch_size": "bs",
    "num_epochs": "epochs",
    "warmup_steps": "warmup",
}
MAX_NAME_LENGTH = 96

_LAUNCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    workdir: str
    overrides: dict[str, Any]


class UnknownOverrideError(ValueError):
    """A sweep names a config key that does not exist."""


# ---------------------------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------------------------


def split_config_path(config_path: str) -> tuple[str, str | None]:
    """"configs/x.py:arg" -> ("configs/x.py", "arg"); split at the first ':' as config_flags does."""
    path, colon, arg = config_path.partition(":")
    return path, (arg if colon else None)


def load_config_module(path: str):
    """Imports a config file by path (config files are code the user wrote)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    name = "bclip_sweep_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_sweep(config_path: str) -> tuple[ml_collections.ConfigDict, list[dict[str, Any]]]:
    """The locked base config (`get_config(arg)`) and the sweep (`get_sweep(arg)`) of a config file."""
    path, arg = split_config_path(config_path)
    module = load_config_module(path)
    for function in ("get_config", "get_sweep"):
        if not callable(getattr(module, function, None)):
            raise ValueError(f"{path} defines no {function}(); a sweep config needs get_config and get_sweep")
    call_args = () if arg is None else (arg,)
    config = module.get_config(*call_args)
    if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(f"{path}: get_config returned {type(config).__name__}, expected a ConfigDict")
    config.lock()
    sweep = module.get_sweep(*call_args)
    if not isinstance(sweep, Sequence) or not all(isinstance(entry, Mapping) for entry in sweep):
        raise TypeError(f"{path}: get_sweep must return a list of dicts of overrides")
    return config, [dict(entry) for entry in sweep]


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A locked copy of config with each dotted key set; unknown keys and wrong types are errors."""
    config = copy.deepcopy(config)
    config.lock()
    for key, value in overrides.items():
        *parents, field = key.split(".")
        node, walked = config, []
        for part in parents + [field]:
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                options = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                where = ".".join(walked) or "the config"
                hint = difflib.get_close_matches(part, options, n=1)
                raise UnknownOverrideError(
                    f"unknown config key {key!r}: {where} has no field {part!r}"
                    + (f"; did you mean {'.'.join(walked + hint)!r}?" if hint else "")
                    + (f" (fields: {', '.join(options)})" if options else f" ({where} is not a section)")
                )
            if part != field:
                node = node[part]
            walked.append(part)
        try:
            node[field] = value
        except (TypeError, ValueError) as error:
            raise TypeError(f"cannot set {key!r} to {value!r}: {error}") from None
    return config


def flag_value(value: Any) -> str:
    """The text of `--config.KEY=TEXT` that ml_collections' config_flags parses back to value."""
    if value is None:
        raise ValueError("a None override cannot be passed as a --config flag; run the sweep with --parallel 1")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, list, tuple, dict)):
        return repr(value)
    raise TypeError(f"override value {value!r} of type {type(value).__name__} cannot be a flag")


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
    """["--config.optim.learning_rate=0.0001", ...] for `python -m bclip.main`."""
    return [f"--config.{key}={flag_value(value)}" for key, value in overrides.items()]


def main_command(python: str, config_path: str, workdir: str, overrides: Mapping[str, Any]) -> list[str]:
    return [python, "-m", "bclip.main", "--config", config_path, "--workdir", workdir, *override_flags(overrides)]


# ---------------------------------------------------------------------------------------------
# Run names
# ---------------------------------------------------------------------------------------------


def _float_text(value: float) -> str:
    """Shortest exact text; scientific for small and large values: 1e-4 -> "1e-04", 2.0 -> "2"."""
    if value == 0 or value != value or value in (float("inf"), float("-inf")):
        return repr(value).replace(".0", "")
    if abs(value) < 1e-3 or abs(value) >= 1e5:
        mantissa, exponent = f"{decimal.Decimal(repr(value)).normalize():e}".split("e")
        sign = "-" if exponent.startswith("-") else "+"
        return f"{mantissa}e{sign}{exponent.lstrip('+-').zfill(2)}"
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _float_text(value)
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "-".join(_value_text(item) for item in value)
    if isinstance(value, Mapping):
        return "-".join(f"{key}-{_value_text(item)}" for key, item in value.items())
    return str(value)


def _key_names(keys: Sequence[str]) -> dict[str, str]:
    """Each key's short name, or its full dotted name where two keys would share one."""
    short = {key: SHORT_KEY_NAMES.get(key.split(".")[-1], key.split(".")[-1]) for key in keys}
    counts: dict[str, int] = {}
    for name in short.values():
        counts[name] = counts.get(name, 0) + 1
    return {key: (name if counts[name] == 1 else key) for key, name in short.items()}


def run_name(overrides: Mapping[str, Any]) -> str:
    """A folder name that reads as the overrides: {"optim.learning_rate": 1e-4,
    "objective.ssl_weight": 2.0} -> "lr=1e-04_ssl_weight=2". Depends on this run alone, so
    adding runs to a sweep never renames the finished ones."""
    if not overrides:
        return "base"
    names = _key_names(list(overrides))
    parts = [f"{names[key]}={_value_text(value)}" for key, value in overrides.items()]
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(parts)).strip("-.")
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=repr).encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME_LENGTH - 9].rstrip('-._')}-{digest}"
    return name


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def expand_sweep(root: str, sweep: Sequence[Mapping[str, Any]]) -> list[Run]:
    """One Run per sweep entry, in order; two entries with the same folder name are an error."""
    runs, seen = [], {}
    for index, overrides in enumerate(sweep):
        overrides = dict(overrides)
        try:
            json.dumps(overrides)
        except TypeError as error:
            raise TypeError(f"sweep entry {index} is not JSON data (numbers, strings, bools, None, lists, "
                            f"dicts): {error}") from None
        name = run_name(overrides)
        if name in seen:
            raise ValueError(f"sweep entries {seen[name]} and {index} both map to run folder {name!r}: "
                             f"{sweep[seen[name]]} vs {overrides}")
        seen[name] = index
        runs.append(Run(name=name, workdir=_join(root, name), overrides=overrides))
    return runs


def check_overrides(config: ml_collections.ConfigDict, runs: Sequence[Run]) -> None:
    """Applies every run's overrides up front, so a typo fails before anything starts."""
    for run in runs:
        try:
            apply_overrides(config, run.overrides)
        except (UnknownOverrideError, TypeError) as error:
            raise type(error)(f"run {run.name}: {error}") from None


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def is_finished(workdir: str) -> bool:
    return (epath.Path(workdir) / DONE_FILE).exists()


def write_overrides(run: Run) -> None:
    workdir = epath.Path(run.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / OVERRIDES_FILE).write_text(json.dumps(run.overrides, indent=2) + "\n")


def write_plan(root: str, config_path: str, runs: Sequence[Run]) -> str:
    """ROOT/sweep.json: the config and every run, what array tasks read their run from."""
    plan = {"config": config_path, "runs": [dataclasses.asdict(run) for run in runs]}
    path = epath.Path(root) / PLAN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return os.fspath(path)


def read_plan(path: str) -> tuple[str, list[Run]]:
    plan = json.loads(epath.Path(path).read_text())
    return plan["config"], [Run(**run) for run in plan["runs"]]


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


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
        run_config = apply_overrides(config, run.overrides)
        write_overrides(run)
        try:
            train_fn(run_config, run.workdir)
        except Exception as error:  # noqa: BLE001 - one bad run must not end the sweep.
            print(f"run {run.name} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            failed.append(run.name)
    return failed


def configs_of_runs(config: ml_collections.ConfigDict, runs: Sequence[Run]) -> list[ml_collections.ConfigDict]:
    return [apply_overrides(config, run.overrides) for run in runs]


def check_vectorisable(config: ml_collections.ConfigDict, runs: Sequence[Run]) -> None:
    """Fail, naming the offending keys, unless the runs can train as one vectorised program."""
    from bclip import run_group  # Imported here: it pulls in all of JAX and Flax.

    run_group.check_vectorisable(configs_of_runs(config, runs), [run.name for run in runs])


def vectorised_group_dir(root: str, runs: Sequence[Run]) -> str:
    """ROOT/_vectorised/GROUP, GROUP a digest of the runs' names: the same unfinished runs find
    their group again after an interruption."""
    digest = hashlib.sha1(json.dumps(sorted(run.name for run in runs)).encode()).hexdigest()[:10]
    return _join(_join(root, VECTORISED_DIR), f"{len(runs)}runs-{digest}")


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
    if is_finished(run.workdir):
        print(f"{run.name}: already finished ({DONE_FILE} present)")
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
        path, arg = split_config_path(config_path)
        config_path = os.path.abspath(path) + ("" if arg is None else f":{arg}")
        root = root if "://" in root else os.path.abspath(root)
    config, entries = load_sweep(config_path)
    runs = expand_sweep(root, entries)
    check_overrides(config, runs)
    if vectorize:
        check_vectorisable(config, runs)  # All runs, finished or not: the sweep as written.
    pending = [run for run in runs if not is_finished(run.workdir)]
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher_argv: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, launcher_argv = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m bclip.sweep", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )
    parser.add_argument("--config", help="Config file defining get_config and get_sweep, optionally ':arg'.")
    parser.add_argument("--workdir", help="Root folder; each run gets a sub-folder.")
    parser.add_argument("--mode", choices=MODES, default="local")
    parser.add_argument("--parallel", type=int, default=1, help="Runs at once (local subprocesses / array tasks).")
    parser.add_argument("--vectorize", action="store_true",
                        help="Train the runs together as one vmapped program on one input stream (local mode).")
    parser.add_argument("--dry_run", action="store_true", help="Print what would run; run and write nothing.")
    parser.add_argument("--plan", help="Array-task mode: a sweep.json written by an earlier sweep.")
    parser.add_argument("--run_index", type=int, help="Array-task mode: which run of --plan.")
    args = parser.parse_args(argv)
    if args.plan is not None or args.run_index is not None:
        if args.plan is None or args.run_index is None:
            parser.error("--plan and --run_index go together")
        return run_one_from_plan(args.plan, args.run_index)
    if not args.config or not args.workdir:
        parser.error("--config and --workdir are required")
    if args.mode == "local" and args.parallel == 1 and not args.dry_run:
        distributed.initialize()  # Multi-host JAX when started on every host; else nothing.
    try:
        return sweep(args.config, args.workdir, args.mode, args.parallel, args.dry_run, launcher_argv,
                     vectorize=args.vectorize)
    except (UnknownOverrideError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
