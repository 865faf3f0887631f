"""A sweep's runs: the override dicts of a config file's get_sweep, each a run with a folder name
that reads as its overrides; the plan file array tasks read; the command that runs one run."""

from __future__ import annotations

import dataclasses
import decimal
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from etils import epath

from bclip import config as run_configs

OVERRIDES_FILE = "overrides.json"


PLAN_FILE = "sweep.json"


VECTORISED_DIR = "_vectorised"  # ROOT/_vectorised/GROUP: what the runs of a vectorised group share.


# Short names for keys that recur in sweeps; any other key is named by its last component.
SHORT_KEY_NAMES = {
    "learning_rate": "lr",
    "weight_decay": "wd",
    "batch_size": "bs",
    "num_epochs": "epochs",
    "warmup_steps": "warmup",
}


MAX_NAME_LENGTH = 96


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    workdir: str
    overrides: dict[str, Any]


def load_sweep(config_path: str) -> tuple[ml_collections.ConfigDict, list[dict[str, Any]]]:
    """The locked base config (`get_config(arg)`) and the sweep (`get_sweep(arg)`) of a config file."""
    path, arg = run_configs.split_config_path(config_path)
    module = run_configs.load_config_file(path)
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
            run_configs.override(config, run.overrides)
        except (run_configs.UnknownOverrideError, TypeError) as error:
            raise type(error)(f"run {run.name}: {error}") from None


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


def vectorised_group_dir(root: str, runs: Sequence[Run]) -> str:
    """ROOT/_vectorised/GROUP, GROUP a digest of the runs' names: the same unfinished runs find
    their group again after an interruption."""
    digest = hashlib.sha1(json.dumps(sorted(run.name for run in runs)).encode()).hexdigest()[:10]
    return _join(_join(root, VECTORISED_DIR), f"{len(runs)}runs-{digest}")
