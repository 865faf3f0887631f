"""RoCLIP as a per-epoch pass: the pool, the nearest-caption matching, the batches it changes, and
an exact resume, on the real sharded pipeline and trainer (8 simulated devices)."""

import dataclasses
import io
import itertools
import os
import shutil

import jax
import numpy as np
import pytest
import saved_arrays
from PIL import Image
from test_configs import load_config_module
from test_train_fake_data import fake_data_config

from bclip import config as run_configs
from bclip import epoch_passes, experiment, run_files, sharding, train
from bclip.data import pipeline, training_input
from bclip.models import clip

NUM_EXAMPLES, POOL_SIZE = 16, 5
COLOURS = {"red": (200, 20, 20), "blue": (20, 20, 200)}
# 16 distinct captions of the fake vocabulary (no two pool captions tie).
CAPTIONS = [
    f"{start} {colour} {thing}{end}"
    for start, colour, thing, end in itertools.product(["a", "a photo of a"], COLOURS, ["square", "banana"], ["", " square"])
]


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class SixteenPairs:
    """16 squares whose colour their (distinct) captions name."""

    captions = CAPTIONS

    def __len__(self):
        return NUM_EXAMPLES

    def __getitem__(self, index):
        index = int(index)
        colour = COLOURS["red" if " red " in CAPTIONS[index] else "blue"]
        return {"image_bytes": _png(colour), "caption": CAPTIONS[index], "index": index, "path": f"memory/{index}"}


def test_nearest_caption_is_the_highest_cosine_not_the_highest_dot_product():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(16, 4)) * rng.uniform(0.1, 10.0, size=(16, 1))
    pool = rng.normal(size=(POOL_SIZE, 4)) * np.array([[0.2], [5.0], [1.0], [3.0], [0.5]])
    mesh = sharding.make_mesh()
    on_mesh = jax.device_put(image.astype(np.float32), sharding.batch_sharding(mesh))
    nearest = jax.jit(epoch_passes.nearest_captions, static_argnums=2)(on_mesh, pool.astype(np.float32), 8)
    cosine = (image / np.linalg.norm(image, axis=1, keepdims=True)) @ (pool / np.linalg.norm(pool, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(np.asarray(nearest), np.argmax(cosine, axis=1))
    assert not np.array_equal(np.argmax(image @ pool.T, axis=1), np.argmax(cosine, axis=1))  # the case tells them apart


def test_pool_is_a_fresh_draw_per_epoch_from_the_seed():
    pool = epoch_passes.caption_pool(seed=0, epoch=1, num_examples=100, size=10)
    np.testing.assert_array_equal(pool, epoch_passes.caption_pool(0, 1, 100, 10))
    assert len(np.unique(pool)) == 10 and np.all(np.diff(pool) > 0) and pool.min() >= 0 and pool.max() < 100
    assert not np.array_equal(pool, epoch_passes.caption_pool(0, 3, 100, 10))
    assert not np.array_equal(pool, epoch_passes.caption_pool(1, 1, 100, 10))
    for size in (0, 101):
        with pytest.raises(ValueError, match=r"epoch_passes.roclip.pool_size=.*1\.\.100"):
            epoch_passes.caption_pool(0, 1, 100, size)
    assert [epoch_passes.is_matching_epoch(e, 2) for e in range(4)] == [False, True, False, True]
    assert [epoch_passes.is_matching_epoch(e, 3) for e in range(6)] == [False, False, True, False, False, True]
    with pytest.raises(ValueError, match=r"epoch_passes.roclip.every_epochs=0"):
        epoch_passes.is_matching_epoch(1, 0)


def _embed(config, params, images, tokens):
    model = clip.build_model(config.model)
    # Jitted: op by op, the model's many small programs take longer to compile than the whole.
    encode = jax.jit(lambda params, images, tokens: (
        model.apply({"params": params}, images, method=clip.CLIP.encode_image),
        model.apply({"params": params}, tokens, method=clip.CLIP.encode_text),
    ))
    image, text = encode(params, images, tokens)
    return np.asarray(image, np.float64), np.asarray(text, np.float64)


def test_matching_epochs_train_on_pool_captions_and_resume_exactly(tmp_path, monkeypatch):
    config = fake_data_config(tmp_path, monkeypatch)
    monkeypatch.setattr(pipeline, "training_source", lambda data: SixteenPairs())
    run_configs.enable_epoch_pass(config, "roclip", pool_size=POOL_SIZE, every_epochs=2)  # the config entry
    # 2 steps per epoch; every step's checkpoint kept, for the resume below.
    config = run_configs.override(
        config, {"train.num_epochs": 3, "train.checkpoint_every_steps": 1, "train.keep_checkpoints": 10,
                 "eval.at_start": False, "eval.every_epochs": 3}
    )
    tokenizer = training_input.make_tokenizer(config)
    length = config.model.text.context_length
    tables, batches = {}, []
    real_pass, real_fields, real_step = epoch_passes.EPOCH_PASSES["roclip"], epoch_passes.batch_fields, train.run_group.RunGroup.jit_step

    def recording_pass(context, state, rng):
        table, state = real_pass.run(context, state, rng)
        tables[context.epoch] = table
        return table, state

    def recording_fields(passes, tables_now, indices, context, batch):
        batches.append({"epoch": context.epoch, "index": indices.copy()})
        return real_fields(passes, tables_now, indices, context, batch)

    def recording_jit_step(group, step, shardings):
        jitted = real_step(group, step, shardings)

        def call(state, batch, rng, hparams):
            batches[-1]["text"] = np.asarray(batch["text"])  # what the step trains on
            return jitted(state, batch, rng, hparams)

        return call

    monkeypatch.setitem(epoch_passes.EPOCH_PASSES, "roclip", dataclasses.replace(real_pass, run=recording_pass))
    monkeypatch.setattr(epoch_passes, "batch_fields", recording_fields)
    monkeypatch.setattr(train.run_group.RunGroup, "jit_step", recording_jit_step)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)

    # Epochs 0 and 2 train on the original pairs; epoch 1 (every_epochs=2) on each image's match.
    assert sorted(tables) == [0, 1, 2] and len(batches) == 6
    for epoch in (0, 2):
        assert np.all(tables[epoch] == -1)
    table = tables[1]
    pool = epoch_passes.caption_pool(config.seed, 1, NUM_EXAMPLES, POOL_SIZE)
    assert set(table.tolist()) <= set(pool.tolist())
    for batch in batches:
        captions_of = table[batch["index"]] if batch["epoch"] == 1 else batch["index"]
        expected = tokenizer.encode_batch([CAPTIONS[i] for i in captions_of], length)
        np.testing.assert_array_equal(batch["text"], expected)
    assert np.any(table != np.arange(NUM_EXAMPLES))  # the matching changed some captions

    # The match is the nearest pool caption by cosine, with the model the epoch started from.
    params = saved_arrays.read_state(os.path.join(workdir, run_files.CHECKPOINTS_DIR, "2", "state"), "params")
    images = np.stack([np.asarray(Image.open(io.BytesIO(SixteenPairs()[i]["image_bytes"]))) for i in range(NUM_EXAMPLES)])
    image, text = _embed(config, params, images, tokenizer.encode_batch([CAPTIONS[i] for i in pool], length))
    cosine = (image / np.linalg.norm(image, axis=1, keepdims=True)) @ (text / np.linalg.norm(text, axis=1, keepdims=True)).T
    chosen = cosine[np.arange(NUM_EXAMPLES), np.searchsorted(pool, table)]
    np.testing.assert_allclose(chosen, cosine.max(axis=1), rtol=0, atol=1e-6)

    # Stopped after step 3, halfway through the matching epoch: the resumed run reads that epoch's
    # table back (the pass runs again only for epoch 2) and ends with the same parameters.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    for step in (4, 5, 6):
        shutil.rmtree(os.path.join(resumed, run_files.CHECKPOINTS_DIR, str(step)))
    os.remove(os.path.join(resumed, run_files.DONE_FILE))
    tables.clear()
    train.train_and_evaluate(config, resumed)
    assert sorted(tables) == [2]
    final, reference = saved_arrays.final_params(resumed), saved_arrays.final_params(workdir)
    assert final.keys() == reference.keys()
    for name in final:
        np.testing.assert_array_equal(final[name], reference[name], err_msg=name)


def _without_pass(config) -> dict:
    as_dict = config.to_dict()
    del as_dict["epoch_passes"]["roclip"]
    return as_dict


def test_configs_are_the_study_runs_plus_the_pass():
    roclip = load_config_module("roclip")
    cc3m = roclip.get_config("cc3m")
    assert cc3m.epoch_passes.roclip.to_dict() == {"pool_size": 21_845, "every_epochs": 2}
    assert _without_pass(cc3m) == load_config_module("pretrain_cc").get_config("cc3m_mmcl").to_dict()
    assert cc3m.poison.count == 1_500 and cc3m.poison.target_label == "banana" and cc3m.model.name == "RN50"

    synthetic = roclip.get_config("synthetic,/worlds/w")
    study = experiment.apply_proportions(load_config_module("study_synthetic").get_config("default"))
    # 0.66 % of the study's 12,000 pairs, as 21,845 of CC3M's 3.3M.
    assert synthetic.epoch_passes.roclip.to_dict() == {"pool_size": 79, "every_epochs": 2}
    assert _without_pass(synthetic) == experiment.pretrain_configs(study, "/worlds/w")["MMCL"].to_dict()
    assert synthetic.data.train_csv == "/worlds/w/train/train.csv"
    for bad in ("synthetic", "cc6m", "cc3m,/w"):
        with pytest.raises(ValueError, match="configs/roclip.py takes"):
            roclip.get_config(bad)
