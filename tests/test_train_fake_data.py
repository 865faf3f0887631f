"""The whole trainer for one step on fake data held in memory (no dataset files), as flax's
examples test theirs: every stage runs, and what it writes is what one step must write."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from bclip import config as run_configs
from bclip import evaluators, run_files, train
from bclip.data import pipeline

WORDS = ["a", "photo", "of", "red", "blue", "square", "banana"]
BATCH_SIZE = 8


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeTrainingSource:
    """Eight image–caption pairs: red or blue squares, said so in their captions."""

    def __init__(self):
        self.colours = [((200, 20, 20), "red"), ((20, 20, 200), "blue")] * (BATCH_SIZE // 2)

    def __len__(self):
        return len(self.colours)

    def __getitem__(self, index):
        index = int(index)
        rgb, name = self.colours[index]
        return {"image_bytes": _png(rgb), "caption": f"a photo of a {name} square", "index": index, "path": f"memory/{index}"}

    @property
    def captions(self):
        return [f"a photo of a {name} square" for _, name in self.colours]


class FakeEvalSource:
    """Four labelled squares of two classes."""

    classnames = ["red", "blue"]
    templates = ["a photo of a {} square"]

    def __len__(self):
        return 4

    def __getitem__(self, index):
        index = int(index)
        rgb = (200, 20, 20) if index % 2 == 0 else (20, 20, 200)
        return {"image_bytes": _png(rgb), "label": index % 2, "index": index, "path": f"memory/eval/{index}"}


def fake_data_config(tmp_path, monkeypatch):
    """A tiny run config whose training and eval data are the fake in-memory sources above (one
    batch per epoch, one epoch)."""
    monkeypatch.setattr(pipeline, "training_source", lambda data: FakeTrainingSource())
    monkeypatch.setattr(evaluators, "make_eval_source", lambda set_config: FakeEvalSource())
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    config = run_configs.run_config(
        "micro-vit",
        image={"size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
        text={"context_length": 12, "vocab_size": 64, "width": 32, "layers": 1, "heads": 2},
        embed_dim=32,
    )
    return run_configs.override(config, {
        "data.train_csv": "in-memory",
        "data.tokenizer.path": str(vocab),
        "data.batch_size": BATCH_SIZE,
        "poison.target_label": "blue",
        "optim.warmup_steps": 0,
        "eval.batch_size": 8,
    })


def test_one_step_on_in_memory_data_writes_a_finished_run(tmp_path, monkeypatch):
    config = fake_data_config(tmp_path, monkeypatch)
    workdir = str(tmp_path / "run")
    finished_checkpoints_at_done = []
    write_json = train.write_json

    def watching_write_json(path, record):
        if os.path.basename(str(path)) == run_files.DONE_FILE:
            finished_checkpoints_at_done.append(sorted(os.listdir(os.path.join(workdir, run_files.CHECKPOINTS_DIR))))
        write_json(path, record)

    monkeypatch.setattr(train, "write_json", watching_write_json)
    results = train.train_and_evaluate(config, workdir)
    # done.json is written once the final checkpoint is complete (not while Orbax still writes it).
    assert finished_checkpoints_at_done == [["1", "epochs.json"]]

    metrics = run_files.read_json_lines(os.path.join(workdir, run_files.METRICS_FILE))
    assert [record["step"] for record in metrics] == [1]
    assert np.isfinite(metrics[0]["loss"]) and metrics[0]["loss"] == metrics[0]["mmcl"]
    # The one step ran at the peak learning rate (no warm-up), then the cosine reached 0 at its end.
    assert metrics[0]["learning_rate"] == pytest.approx(config.optim.learning_rate)
    evals = run_files.read_json_lines(os.path.join(workdir, run_files.EVALS_FILE))
    assert [record["step"] for record in evals] == [0, 1]
    assert evals[-1]["test/num_images"] == 4
    assert results == {k: v for k, v in evals[-1].items() if k not in ("step", "epoch")}
    with open(os.path.join(workdir, run_files.DONE_FILE)) as f:
        assert json.load(f) == {"steps": 1, "results": results}
    assert sorted(os.listdir(os.path.join(workdir, run_files.CHECKPOINTS_DIR))) == ["1", "epochs.json"]
