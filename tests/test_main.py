"""The command line: config files load with --config.key=value overrides; unknown keys fail."""

import os
import subprocess
import sys

import pytest
from ml_collections import config_flags  # noqa: F401  (the loader the CLI uses)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=120):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "bclip.main", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_unknown_override_key_is_rejected(tmp_path):
    result = _main("--config", "configs/tiny.py:/nonexistent", "--workdir", str(tmp_path), "--config.optim.learning_rte=0.1")
    assert result.returncode != 0
    assert "learning_rte" in result.stderr
    assert not os.listdir(tmp_path)  # nothing ran


def test_missing_training_data_is_a_clear_error(tmp_path):
    result = _main("--config", f"configs/tiny.py:{tmp_path / 'no_world'}", "--workdir", str(tmp_path / "run"))
    assert result.returncode != 0
    assert "no_world/vocab.txt" in result.stderr or "no_world/train/train.csv" in result.stderr


def test_tiny_config_overrides_apply():
    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        import tiny
    finally:
        sys.path.pop(0)
    config = tiny.get_config("/data/world")
    assert config.data.train_csv == "/data/world/train/train.csv"
    assert config.model.image.size == 32 and config.model.text.vocab_size == 256
    with pytest.raises(AttributeError):
        config.optim.learning_rte = 0.1  # locked: a typo is an error
