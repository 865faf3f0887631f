"""The command line: config files load with --config.key=value overrides; unknown keys fail."""

import json
import os
import subprocess
import sys
import traceback

import pytest
from absl import app, flags
from ml_collections import config_flags  # noqa: F401  (the loader the CLI uses)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=120):
    """`python -m bclip.main ARGS` as its own process (the entry point itself: the heap re-exec and
    absl's app.run)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "bclip.main", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _main_in_process(capsys, monkeypatch, *args):
    """`python -m bclip.main ARGS` run in this process, without the seconds a new interpreter and
    its imports take: (exit status, stderr). The flags are parsed as absl's app.run parses them
    (a flags error prints and exits with 1), then bclip.main.main runs; an exception escaping either
    is exit status 1 with its traceback on stderr, as the interpreter gives it. Afterwards the
    flags are as before: unparsed (the next call starts from their defaults), and without the
    --config.KEY flags config_flags defined for the overrides."""
    from bclip import main as bclip_main  # defines the command's --config and --workdir flags

    monkeypatch.chdir(REPO)
    # config_flags finds the --config.KEY overrides in sys.argv, as in the command's own process.
    monkeypatch.setattr(sys, "argv", ["bclip.main", *args])
    was_parsed = flags.FLAGS.is_parsed()
    try:
        try:
            argv = app.parse_flags_with_usage(sys.argv)
            raise SystemExit(bclip_main.main(argv))
        finally:
            flags.FLAGS.unparse_flags()
            for name in [name for name in flags.FLAGS if name.startswith("config.")]:
                delattr(flags.FLAGS, name)
            if was_parsed:
                flags.FLAGS.mark_as_parsed()
    except SystemExit as exit:
        status = 0 if exit.code is None else exit.code if isinstance(exit.code, int) else 1
    except Exception:
        traceback.print_exc()
        status = 1
    return status, capsys.readouterr().err


def test_unknown_override_key_is_rejected(tmp_path, capsys, monkeypatch):
    status, stderr = _main_in_process(
        capsys, monkeypatch,
        "--config", "configs/tiny.py:/nonexistent", "--workdir", str(tmp_path), "--config.optim.learning_rte=0.1",
    )
    assert status != 0
    assert "learning_rte" in stderr
    assert not os.listdir(tmp_path)  # nothing ran


def test_missing_training_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    status, stderr = _main_in_process(
        capsys, monkeypatch, "--config", f"configs/tiny.py:{tmp_path / 'no_world'}", "--workdir", str(tmp_path / "run")
    )
    assert status != 0
    assert "no_world/vocab.txt" in stderr or "no_world/train/train.csv" in stderr


def test_tiny_config_overrides_apply(tmp_path):
    # The one test through `python -m bclip.main` in a process of its own: what is typed on the
    # command line reaches the trainer through the entry point (the re-exec and app.run).
    # The run writes the config it was given to config.json before it reads any data, so a world
    # that does not exist is enough to see what bclip.main handed the trainer.
    world, workdir = tmp_path / "no_world", tmp_path / "run"
    result = _main(
        "--config", f"configs/tiny.py:{world}", "--workdir", str(workdir),
        "--config.optim.learning_rate=0.05", "--config.model.text.layers=3", "--config.data.batch_size=32",
    )
    assert result.returncode != 0 and f"{world}/vocab.txt" in result.stderr  # stopped at the data
    config = json.loads((workdir / "config.json").read_text())
    # The three overrides, each a value tiny.py does not use itself...
    assert config["optim"]["learning_rate"] == 0.05
    assert config["model"]["text"]["layers"] == 3
    assert config["data"]["batch_size"] == 32
    # ...and tiny.py's own values, from its arg and its body, where nothing overrides them.
    assert config["data"]["train_csv"] == f"{world}/train/train.csv"
    assert config["eval"]["sets"]["test"]["path"] == f"{world}/test"
    assert config["model"]["image"]["size"] == 32 and config["model"]["text"]["vocab_size"] == 256
    assert config["optim"]["warmup_steps"] == 20

    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        import tiny
    finally:
        sys.path.pop(0)
    defaults = tiny.get_config(str(world))
    assert (defaults.optim.learning_rate, defaults.model.text.layers, defaults.data.batch_size) == (1e-3, 2, 64)
    with pytest.raises(AttributeError):
        defaults.optim.learning_rte = 0.1  # locked: a typo is an error
