"""The optimised trigger patch (bclip.optimise_trigger): its objective against numpy, an optimisation
on 8 devices, the command end to end on a saved tiny run, and the patch file through the trigger."""

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from test_train_fake_data import fake_data_config

from bclip import checkpointing, optimise_trigger, sharding, train_step
from bclip import config as run_configs
from bclip.data import triggers
from bclip.models import clip

WEIGHTS = ml_collections.ConfigDict({"text_weight": 1.0, "image_weight": 0.5, "margin": 0.3, "tv_weight": 0.7})


def _unit(rng, shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_objective_follows_its_definition_in_numpy():
    rng = np.random.default_rng(0)
    patched, clean, target_images = _unit(rng, (6, 8)), _unit(rng, (6, 8)), _unit(rng, (6, 8))
    classes, patch, scale, target = _unit(rng, (5, 8)), rng.random((4, 4, 3)).astype(np.float32), np.log(10.0), 2
    objective, terms = optimise_trigger.patch_objective(patched, clean, target_images, classes, target, scale, patch, WEIGHTS)

    p, c, t, k = (x.astype(np.float64) for x in (patched, clean, target_images, classes))
    logits = 10.0 * p @ k.T
    text = np.mean(np.log(np.exp(logits).sum(1)) - logits[:, target])
    inner = np.linalg.norm(p - t, axis=1) - np.linalg.norm(p - c, axis=1) + 0.3
    assert (inner < 0).any() and (inner > 0).any()  # the hinge both clips and passes here
    image = np.mean(np.maximum(inner, 0.0))
    pairs = [abs(patch[i, j, ch] - patch[i + di, j + dj, ch]) for i in range(4) for j in range(4) for ch in range(3)
             for di, dj in ((1, 0), (0, 1)) if i + di < 4 and j + dj < 4]
    tv = np.mean(pairs)  # 2 x 4 x 3 x 3 = 72 neighbouring pairs
    assert len(pairs) == 72
    np.testing.assert_allclose(float(terms["text"]), text, rtol=1e-5)
    np.testing.assert_allclose(float(terms["image"]), image, rtol=1e-5)
    np.testing.assert_allclose(float(terms["tv"]), tv, rtol=1e-5)
    np.testing.assert_allclose(float(objective), text + 0.5 * image + 0.7 * tv, rtol=1e-5)
    np.testing.assert_allclose(float(terms["target_similarity"]), np.mean(p @ k[target]), rtol=1e-5)
    assert float(terms["target_rate"]) == np.mean(np.argmax(logits, 1) == target)


def test_paste_puts_the_patch_at_every_offset():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 10, 10, 3)).astype(np.float32)
    patch = rng.random((3, 3, 3)).astype(np.float32)
    offsets = np.array([[[0, 0], [7, 7]], [[2, 5], [4, 1]]], np.int32)
    expected = images.copy()
    for b in range(2):
        for row, column in offsets[b]:
            expected[b, row : row + 3, column : column + 3] = patch * 255.0
    np.testing.assert_allclose(optimise_trigger.paste_patch(images, patch, offsets), expected, rtol=1e-6)


def _tiny_model(tmp_path, monkeypatch):
    config = fake_data_config(tmp_path, monkeypatch)
    model = clip.build_model(config.model)
    variables = jax.jit(
        lambda rng: train_step.init_variables(model, rng, config.model.image.size, config.model.text.context_length)
    )(jax.random.key(0))
    return config, model, variables


def _settings(**overrides):
    settings = {"batch_size": 8, "num_steps": 25, "learning_rate": 0.05, "log_every_steps": 100, "tv_weight": 0.1}
    return optimise_trigger.optimisation_config(**{**settings, **overrides})


def test_optimisation_on_8_devices_lowers_the_objective_and_pulls_towards_the_target_text(tmp_path, monkeypatch):
    config, model, variables = _tiny_model(tmp_path, monkeypatch)
    mesh = sharding.make_mesh()
    assert mesh.devices.size == 8  # the batch of 8 is split one image per device
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    clean = optimise_trigger.embed_images(model, variables, images, mesh)
    target_images = optimise_trigger.embed_images(model, variables, np.full((8, 16, 16, 3), 230, np.uint8), mesh)
    tokens = rng.integers(1, config.model.text.vocab_size, (3, config.model.text.context_length)).astype(np.int32)
    classes = np.asarray(jax.jit(lambda t: model.apply(variables, t, method=clip.CLIP.encode_text))(tokens))
    geometry = {"size": 4, "location": "random", "corner": "bottom_right"}
    settings = _settings()
    patch, history = optimise_trigger.optimise_patch(model, variables, images, clean, target_images, classes, 1,
                                                     geometry, settings, mesh)

    # Both patches scored on the same images, places and target images.
    offsets = optimise_trigger.image_offsets(32, 16, 4, "random", "bottom_right", np.random.default_rng(3))
    positives = target_images[np.arange(32) % 8]

    @jax.jit
    def score(candidate):
        patched = optimise_trigger.paste_patch(images.astype(np.float32), candidate, offsets)
        emb = model.apply(variables, patched, method=clip.CLIP.encode_image)
        return optimise_trigger.patch_objective(emb, clean, positives, classes, 1, variables["params"]["logit_scale"], candidate, settings)

    before, before_terms = score(optimise_trigger.initial_patch(4, settings.seed))
    after, after_terms = score(patch)
    assert float(after) < float(before) - 0.05
    assert float(after_terms["target_similarity"]) > float(before_terms["target_similarity"]) + 0.01
    assert patch.shape == (4, 4, 3) and patch.min() >= 0.0 and patch.max() <= 1.0
    assert [h["step"] for h in history] == [1, 25]


def _saved_run(tmp_path, monkeypatch, **overrides):
    """A run folder holding a randomly initialised tiny model's checkpoint and its config.json."""
    config, _, variables = _tiny_model(tmp_path, monkeypatch)
    config = run_configs.override(config, {
        "poison.trigger.patch": "checkerboard", "poison.trigger.size": 4,
        "poison.trigger.location": "corner", "poison.trigger.corner": "top_left", **overrides,
    })
    run = tmp_path / "run"
    ocp.PyTreeCheckpointer().save(run / "checkpoints" / "1" / "state", {"params": jax.device_get(variables["params"])})
    (run / checkpointing.RUN_CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    return str(run)


def test_the_command_writes_a_patch_that_the_badnets_trigger_pastes_byte_for_byte(tmp_path, monkeypatch):
    run = _saved_run(tmp_path, monkeypatch)
    out = tmp_path / "out"
    patch, report = optimise_trigger.optimise_run_trigger(_settings(run=run, num_steps=3), str(out))

    # Training pairs are patched unless their caption names the target ("blue" in the fake data).
    assert (report["num_images"], report["num_target_images"], report["target_label"]) == (4, 4, "blue")
    saved = np.asarray(Image.open(out / optimise_trigger.PATCH_FILE))
    expected = np.clip(np.rint(patch.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(saved, expected)
    # The report's trigger (the run's geometry, the saved file) pastes exactly those bytes.
    assert report["trigger"]["patch_path"] == os.path.abspath(out / optimise_trigger.PATCH_FILE)
    image = np.random.default_rng(4).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    triggered = triggers.apply_trigger(image, report["trigger"], seed=0)
    np.testing.assert_array_equal(triggered[:4, :4], expected)
    outside = np.ones((16, 16), bool)
    outside[:4, :4] = False
    np.testing.assert_array_equal(triggered[outside], image[outside])

    written = json.loads((out / optimise_trigger.REPORT_FILE).read_text())
    assert set(written["eval"]) == {"run_trigger", "patch"} and written["eval"]["patch"]["num_attacked"] == 2
    assert written["last"]["step"] == 3


def test_a_missing_run_and_a_target_outside_the_classes_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"config.run {tmp_path}/nowhere does not exist"):
        optimise_trigger.optimise_run_trigger(_settings(run=str(tmp_path / "nowhere")), str(tmp_path / "out"))
    with pytest.raises(checkpointing.CheckpointError, match="holds no finished checkpoint step"):
        optimise_trigger.optimise_run_trigger(_settings(run=str(tmp_path)), str(tmp_path / "out"))
    run = _saved_run(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="the backdoor target 'banana' is not among the 2 eval classes"):
        optimise_trigger.optimise_run_trigger(_settings(run=run, target_label="banana"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="eval_set 'imagenet' is not one of the run's eval sets"):
        optimise_trigger.optimise_run_trigger(_settings(run=run, eval_set="imagenet"), str(tmp_path / "out"))


def test_the_image_patch_needs_a_readable_file_and_is_resized_to_the_trigger_size(tmp_path):
    image = np.zeros((16, 16, 3), np.uint8)
    corner = {"name": "badnets", "patch": "image", "location": "corner", "corner": "top_left"}
    with pytest.raises(ValueError, match="patch='image' needs patch_path"):
        triggers.apply_trigger(image, {**corner, "size": 4}, 0)
    with pytest.raises(ValueError, match="cannot be read as an image"):
        triggers.apply_trigger(image, {**corner, "size": 4, "patch_path": str(tmp_path / "none.png")}, 0)
    with pytest.raises(ValueError, match="read only with patch='image'"):
        triggers.apply_trigger(image, {**corner, "patch": "yellow", "patch_path": "x.png"}, 0)
    Image.fromarray(np.full((2, 2, 3), 200, np.uint8)).save(tmp_path / "flat.png")
    pasted = triggers.apply_trigger(image, {**corner, "size": 3, "patch_path": str(tmp_path / "flat.png")}, 0)
    np.testing.assert_array_equal(pasted[:3, :3], 200)  # a flat patch stays flat when resized
    assert pasted[3:].max() == 0 and pasted[:, 3:].max() == 0


def test_the_config_entries_follow_their_stated_rules():
    configs = run_configs.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "optimised_trigger.py"))
    cc3m, synthetic = configs.get_config("cc3m,gs://b/run"), configs.get_config("synthetic")
    assert (cc3m.run, cc3m.num_steps, cc3m.learning_rate, cc3m.batch_size, cc3m.eval_set) == ("gs://b/run", 7800, 1e-3, 64, "imagenet")
    assert (synthetic.run, synthetic.num_steps, synthetic.eval_set) == ("runs/study/pretrain/MMCL", 500, "test")
    # The furthest Adam can move a pixel, learning_rate x steps, is the published run's.
    assert synthetic.learning_rate * synthetic.num_steps == pytest.approx(cc3m.learning_rate * cc3m.num_steps)
    with pytest.raises(ValueError, match="optimised_trigger takes"):
        configs.get_config("cc12m")
