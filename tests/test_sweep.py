"""Sweeps: expansion into named runs, overrides on the locked config, skipping finished runs, and
each mode's dry run. The trainer is a stub: these tests never train."""

import json
import os
import shlex
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from bclip import config as run_configs
from bclip import run_files
from bclip.sweep import __main__ as sweep_main
from bclip.sweep import execute as sweep_execute
from bclip.sweep import runs as sweep_runs

SWEEP_CONFIG = '''
"""A small sweep on the default run config."""
from bclip import config as run_configs


def get_config(arg=None):
    config = run_configs.run_config()
    if arg == "cleaning":
        config.train.num_epochs = 20
    return config


def get_sweep(arg=None):
    runs = []
    for learning_rate in (1e-4, 5e-4):
        for ssl_weight in (2.0, 4.0):
            runs.append({"optim.learning_rate": learning_rate, "objective.ssl_weight": ssl_weight})
    runs.append(
        {"cleaning.shrink": 0.95, "data.batch_size": 64, "eval.batch_size": 32, "poison.trigger.name": "blended"}
    )
    return runs
'''


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "sweep_config.py"
    path.write_text(SWEEP_CONFIG)
    return str(path)


EXPECTED_NAMES = [
    "lr=1e-04_ssl_weight=2",
    "lr=1e-04_ssl_weight=4",
    "lr=5e-04_ssl_weight=2",
    "lr=5e-04_ssl_weight=4",
    "shrink=0.95_data.batch_size=64_eval.batch_size=32_name=blended",
]


def test_load_and_expand(config_file, tmp_path):
    config, entries = sweep_runs.load_sweep(config_file + ":cleaning")
    assert config.train.num_epochs == 20 and config.is_locked
    runs = sweep_runs.expand_sweep(str(tmp_path / "root"), entries)
    assert [run.name for run in runs] == EXPECTED_NAMES
    assert runs[0].workdir == str(tmp_path / "root" / EXPECTED_NAMES[0])
    assert runs[0].overrides == {"optim.learning_rate": 1e-4, "objective.ssl_weight": 2.0}


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({}, "base"),
        ({"optim.learning_rate": 3e-4}, "lr=3e-04"),
        ({"optim.learning_rate": 0.001, "optim.weight_decay": 0.5}, "lr=0.001_wd=0.5"),
        ({"train.num_epochs": 20, "poison.captions": "label_consistent"}, "epochs=20_captions=label_consistent"),
        (
            {"optim.grad_clip_norm": None, "train.init_from": "/runs/pre train/ckpt"},
            "grad_clip_norm=none_init_from=-runs-pre-train-ckpt",
        ),
        ({"optim.learning_rate": 1.00001e-4}, "lr=1.00001e-04"),
        ({"x": 123456.0}, "x=1.23456e+05"),
    ],
)
def test_run_names(overrides, name):
    assert sweep_runs.run_name(overrides) == name


def test_long_names_are_cut_and_stay_distinct():
    first = sweep_runs.run_name({"train.init_from": "a" * 200 + "1"})
    second = sweep_runs.run_name({"train.init_from": "a" * 200 + "2"})
    assert len(first) <= sweep_runs.MAX_NAME_LENGTH and first != second
    assert first.startswith("init_from=aaaa")


def test_duplicate_runs_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="both map to run folder"):
        sweep_runs.expand_sweep(str(tmp_path), [{"seed": 1}, {"seed": 1}])


def test_apply_overrides(config_file):
    config, _ = sweep_runs.load_sweep(config_file)
    changed = run_configs.override(config, {"optim.learning_rate": 1e-4, "objective.ssl_weight": 2,
                                             "optim.grad_clip_norm": 1.0, "cleaning.shrink": 0.95})
    assert changed.optim.learning_rate == 1e-4
    assert changed.objective.ssl_weight == 2.0 and isinstance(changed.objective.ssl_weight, float)
    assert changed.optim.grad_clip_norm == 1.0 and changed.cleaning.shrink == 0.95
    assert changed.is_locked
    assert config.optim.learning_rate == 0.001 and config.optim.grad_clip_norm is None  # Base untouched.


@pytest.mark.parametrize(
    "key, message",
    [
        ("optim.learnig_rate", "optim has no field 'learnig_rate'; did you mean 'optim.learning_rate'"),
        ("optimizer.learning_rate", "the config has no field 'optimizer'; did you mean 'optim'"),
        ("optim.learning_rate.x", "optim.learning_rate is not a section"),
    ],
)
def test_unknown_keys_are_rejected(config_file, key, message):
    config, _ = sweep_runs.load_sweep(config_file)
    with pytest.raises(run_configs.UnknownOverrideError, match=message.replace(".", r"\.").replace("(", r"\(")):
        run_configs.override(config, {key: 1e-4})


def test_wrong_type_is_rejected(config_file):
    config, _ = sweep_runs.load_sweep(config_file)
    with pytest.raises(TypeError, match="train.num_epochs"):
        run_configs.override(config, {"train.num_epochs": 1.5})


def test_unknown_key_fails_the_sweep_before_any_run(tmp_path, capsys):
    path = tmp_path / "bad.py"
    path.write_text(SWEEP_CONFIG.replace('"objective.ssl_weight"', '"objective.ssl_wieght"'))
    calls = []
    with pytest.raises(run_configs.UnknownOverrideError, match="ssl_wieght"):
        sweep_execute.sweep(str(path), str(tmp_path / "root"), train_fn=lambda config, workdir: calls.append(workdir))
    assert calls == [] and not (tmp_path / "root").exists()
    assert sweep_main.main(["--config", str(path), "--workdir", str(tmp_path / "root")]) == 2
    assert "did you mean 'objective.ssl_weight'" in capsys.readouterr().err


def test_override_flags_parse_back_through_config_flags(config_file):
    """The flags handed to bclip.main give the same config as applying the overrides here."""
    config, _ = sweep_runs.load_sweep(config_file)
    overrides = {"optim.learning_rate": 1e-4, "optim.grad_clip_norm": 0.5, "train.num_epochs": 3,
                 "poison.captions": "label_consistent", "poison.trigger.name": "blended", "data.train_csv": ""}
    argv = ["prog", f"--config={config_file}", *sweep_runs.override_flags(overrides)]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    assert flag_values.config.to_dict() == run_configs.override(config, overrides).to_dict()
    with pytest.raises(ValueError, match="None"):
        sweep_runs.override_flags({"optim.grad_clip_norm": None})


def test_none_override_needs_the_in_process_mode(tmp_path, capsys):
    path = tmp_path / "none.py"
    path.write_text(SWEEP_CONFIG.replace('"cleaning.shrink": 0.95', '"optim.grad_clip_norm": None'))
    argv = ["--config", str(path), "--workdir", str(tmp_path / "root"), "--parallel", "2"]
    assert sweep_main.main(argv) == 2
    assert "--parallel 1" in capsys.readouterr().err and not (tmp_path / "root").exists()


def _finish(workdir):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, run_files.DONE_FILE), "w") as f:
        json.dump({}, f)


def test_local_sequential_runs_with_stub_trainer_and_skips_finished(config_file, tmp_path):
    root = tmp_path / "root"
    _finish(root / EXPECTED_NAMES[1])
    seen = []

    def train_fn(config, workdir):
        seen.append((os.path.basename(workdir), config.optim.learning_rate, config.objective.ssl_weight))
        if config.objective.ssl_weight == 4.0:
            raise RuntimeError("diverged")
        _finish(workdir)

    assert sweep_execute.sweep(config_file, str(root), train_fn=train_fn) == 1  # One run failed.
    assert seen == [
        (EXPECTED_NAMES[0], 1e-4, 2.0),
        (EXPECTED_NAMES[2], 5e-4, 2.0),
        (EXPECTED_NAMES[3], 5e-4, 4.0),
        (EXPECTED_NAMES[4], 0.001, 0.0),
    ]
    assert json.loads((root / EXPECTED_NAMES[2] / "overrides.json").read_text()) == {
        "optim.learning_rate": 5e-4, "objective.ssl_weight": 2.0}
    assert not (root / EXPECTED_NAMES[1] / "overrides.json").exists()  # Finished before: untouched.
    # The plan lists every run, so the sweep report can name runs that never started.
    _, planned = sweep_runs.read_plan(str(root / "sweep.json"))
    assert [run.name for run in planned] == EXPECTED_NAMES

    # A second pass only retries the failed run.
    seen.clear()
    def retry(config, workdir):
        seen.append(workdir)
        _finish(workdir)

    assert sweep_execute.sweep(config_file, str(root), train_fn=retry) == 0
    assert seen == [str(root / EXPECTED_NAMES[3])]
    assert sweep_execute.sweep(config_file, str(root), train_fn=lambda config, workdir: seen.append("again")) == 0
    assert seen[-1] != "again"


def test_local_dry_run_prints_commands_and_writes_nothing(config_file, tmp_path, capsys):
    root = tmp_path / "root"
    _finish(root / EXPECTED_NAMES[0])
    assert sweep_main.main(["--config", config_file, "--workdir", str(root), "--parallel", "2", "--dry_run"]) == 0
    out = capsys.readouterr().out
    commands = [shlex.split(line) for line in out.splitlines() if "-m bclip.main" in line]
    assert len(commands) == 4
    assert commands[0] == [sys.executable, "-m", "bclip.main", "--config", config_file, "--workdir",
                           str(root / EXPECTED_NAMES[1]), "--config.optim.learning_rate=0.0001",
                           "--config.objective.ssl_weight=4.0"]
    assert f"{EXPECTED_NAMES[0]} (finished, skipped)" in out
    assert sorted(os.listdir(root)) == [EXPECTED_NAMES[0]]


def test_parallel_subprocesses(config_file, tmp_path):
    """--parallel runs bclip.main commands as subprocesses; a stand-in program records its argv."""
    stand_in = tmp_path / "fake_python.sh"
    stand_in.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done > "$6/argv.txt"\ntouch "$6/done.json"\n')
    stand_in.chmod(0o755)
    root = tmp_path / "root"
    assert sweep_execute.sweep(config_file, str(root), parallel=3, python=str(stand_in)) == 0
    argv = (root / EXPECTED_NAMES[4] / "argv.txt").read_text().splitlines()
    assert argv == ["-m", "bclip.main", "--config", config_file, "--workdir", str(root / EXPECTED_NAMES[4]),
                    "--config.cleaning.shrink=0.95", "--config.data.batch_size=64", "--config.eval.batch_size=32",
                    "--config.poison.trigger.name=blended"]
    assert all(run_files.is_finished(str(root / name)) for name in EXPECTED_NAMES)


def test_slurm_array_dry_run(config_file, tmp_path, capsys):
    root = tmp_path / "root"
    _finish(root / EXPECTED_NAMES[2])
    argv = ["--config", config_file + ":cleaning", "--workdir", str(root), "--mode", "slurm", "--parallel", "2",
            "--dry_run", "--", "--nodes", "2", "--gpus_per_node", "8", "--python", "py"]
    assert sweep_main.main(argv) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-1,3-4%2\n" in out
    assert "#SBATCH --nodes=2\n" in out and "#SBATCH --ntasks-per-node=8\n" in out
    plan = str(root / "sweep.json")
    assert f'py -m bclip.sweep --plan {shlex.quote(plan)} --run_index "$SLURM_ARRAY_TASK_ID"' in out
    assert not os.path.exists(plan)


def test_slurm_plan_and_array_task(config_file, tmp_path, monkeypatch):
    """Without --dry_run the plan and overrides are written; an array task execs its run."""
    root = tmp_path / "root"
    import subprocess

    submitted = []
    def fake_run(command, check):
        submitted.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert sweep_main.main(["--config", config_file, "--workdir", str(root), "--mode", "slurm", "--", "--python", "py"]) == 0
    assert submitted == [["sbatch", str(root / "sweep.sbatch")]]
    config_path, runs = sweep_runs.read_plan(str(root / "sweep.json"))
    assert config_path == os.path.abspath(config_file)
    assert [run.name for run in runs] == EXPECTED_NAMES
    assert json.loads((root / EXPECTED_NAMES[3] / "overrides.json").read_text())["optim.learning_rate"] == 5e-4

    executed = []
    monkeypatch.setattr(os, "execv", lambda program, argv: executed.append(argv))
    sweep_main.main(["--plan", str(root / "sweep.json"), "--run_index", "3"])
    assert executed == [[sys.executable, "-m", "bclip.main", "--config", os.path.abspath(config_file), "--workdir",
                         str(root / EXPECTED_NAMES[3]), "--config.optim.learning_rate=0.0005",
                         "--config.objective.ssl_weight=4.0"]]
    _finish(root / EXPECTED_NAMES[3])
    assert sweep_main.main(["--plan", str(root / "sweep.json"), "--run_index", "3"]) == 0
    assert len(executed) == 1  # Finished: a requeued task does nothing.


def test_tpu_dry_run(config_file, tmp_path, capsys):
    root = tmp_path / "root"
    for name in EXPECTED_NAMES[1:]:
        _finish(root / name)
    argv = ["--config", config_file, "--workdir", str(root), "--mode", "tpu", "--dry_run",
            "--", "--name", "pod", "--zone", "z", "--install", "git", "--repo", "https://example.com/b.git"]
    assert sweep_main.main(argv) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("gcloud")]
    assert len(commands) == 2  # Install once, then the one unfinished run.
    assert all("--worker=all" in command for command in commands)
    remote = shlex.split(commands[1][commands[1].index("--command") + 1])
    assert remote[remote.index("--workdir") + 1] == str(root / EXPECTED_NAMES[0])
    assert remote[-2:] == ["--config.optim.learning_rate=0.0001", "--config.objective.ssl_weight=2.0"]


def test_missing_get_sweep_is_explained(tmp_path):
    path = tmp_path / "plain.py"
    path.write_text("from bclip import config\n\ndef get_config():\n    return config.run_config()\n")
    with pytest.raises(ValueError, match="no get_sweep"):
        sweep_runs.load_sweep(str(path))
