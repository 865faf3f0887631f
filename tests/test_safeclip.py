"""SafeCLIP (Yang et al., ICML 2024): the masked contrastive terms against numpy, the safe split and
its schedule, and a tiny sharded run over 8 devices that resumes mid-epoch exactly."""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import saved_arrays
from test_train_fake_data import FakeTrainingSource, fake_data_config

from bclip import config as run_configs
from bclip import epoch_passes, experiment, objectives, run_files, sharding, train
from bclip.data import pipeline

# ---------------------------------------------------------------------------------------------
# The masked contrastive terms
# ---------------------------------------------------------------------------------------------


def _unit(rng, shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_info_nce(anchors, candidates, scale, keep):
    """Mean over the kept rows i of -log(exp(s a_i.c_i) / sum over kept j of exp(s a_i.c_j)),
    written out term by term on the kept sub-batch alone."""
    kept = np.flatnonzero(keep)
    if len(kept) == 0:
        return 0.0
    losses = []
    for i in kept:
        numerator = np.exp(scale * anchors[i] @ candidates[i])
        denominator = sum(np.exp(scale * anchors[i] @ candidates[j]) for j in kept)
        losses.append(-np.log(numerator / denominator))
    return float(np.mean(losses))


SAFE = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 0, 1], np.float32)


def test_safe_mmcl_is_clip_on_the_safe_sub_batch_alone():
    rng = np.random.default_rng(0)
    image, text = _unit(rng, (16, 8)), _unit(rng, (16, 8))
    logit_scale = np.float32(np.log(10.0))
    safe_only = lambda x: x[SAFE > 0]
    expected = 0.5 * (
        _numpy_info_nce(image, text, 10.0, SAFE > 0) + _numpy_info_nce(text, image, 10.0, SAFE > 0)
    )
    got = objectives.safe_mmcl_loss(jnp.asarray(image), jnp.asarray(text), logit_scale, jnp.asarray(SAFE))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # The same as the plain loss on the safe pairs cut out of the batch: risky ones are not negatives.
    cut = objectives.mmcl_loss(jnp.asarray(safe_only(image)), jnp.asarray(safe_only(text)), logit_scale)
    np.testing.assert_allclose(got, cut, rtol=1e-5)
    # ... which the per-pair weights (0-weight pairs still negatives) are not.
    weighted = objectives.mmcl_loss(jnp.asarray(image), jnp.asarray(text), logit_scale, jnp.asarray(SAFE))
    assert abs(float(weighted) - expected) > 1e-2
    # All safe: the plain loss. None safe: 0, with a finite gradient.
    all_safe = objectives.safe_mmcl_loss(jnp.asarray(image), jnp.asarray(text), logit_scale, jnp.ones(16))
    np.testing.assert_allclose(all_safe, objectives.mmcl_loss(jnp.asarray(image), jnp.asarray(text), logit_scale), rtol=1e-6)
    loss, grad = jax.value_and_grad(objectives.safe_mmcl_loss)(jnp.asarray(image), jnp.asarray(text), logit_scale, jnp.zeros(16))
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_risky_ssl_is_the_in_modal_term_on_the_risky_sub_batch_alone():
    rng = np.random.default_rng(1)
    image, aug_image, text, aug_text = (_unit(rng, (16, 8)) for _ in range(4))
    risky = SAFE == 0
    expected = 0.5 * (_numpy_info_nce(image, aug_image, 10.0, risky) + _numpy_info_nce(text, aug_text, 10.0, risky))
    args = [jnp.asarray(x) for x in (image, aug_image, text, aug_text)]
    got = objectives.risky_ssl_loss(*args, np.float32(np.log(10.0)), jnp.asarray(SAFE))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    none_safe = objectives.risky_ssl_loss(*args, np.float32(np.log(10.0)), jnp.zeros(16))
    np.testing.assert_allclose(none_safe, objectives.ssl_loss(*args, np.float32(np.log(10.0))), rtol=1e-6)


def test_masked_terms_on_a_sharded_global_batch_match_the_unsharded_value():
    # Written on global arrays: sharded over 8 devices, the denominators and the count of safe pairs
    # span the global batch, not each device's 2 rows.
    rng = np.random.default_rng(2)
    image, text = _unit(rng, (16, 8)).astype(np.float32), _unit(rng, (16, 8)).astype(np.float32)
    mesh = sharding.make_mesh()
    assert mesh.size == 8
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    loss = jax.jit(objectives.safe_mmcl_loss)(put(image), put(text), np.float32(np.log(10.0)), put(SAFE))
    expected = 0.5 * (_numpy_info_nce(image, text, 10.0, SAFE > 0) + _numpy_info_nce(text, image, 10.0, SAFE > 0))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_the_terms_say_what_they_need_without_the_pass():
    inputs = {"image": jnp.zeros((2, 4)), "text": jnp.zeros((2, 4)), "logit_scale": jnp.zeros(())}
    with pytest.raises(ValueError, match="epoch_passes.safeclip"):
        objectives.TERMS["safe_mmcl"].loss(inputs)


# ---------------------------------------------------------------------------------------------
# The split and its schedule
# ---------------------------------------------------------------------------------------------


def test_safe_split_takes_the_top_share_by_similarity():
    rng = np.random.default_rng(3)
    similarity = rng.uniform(-1, 1, 100).astype(np.float32)
    similarity[[7, 50]] = np.nan  # no value: never safe, not counted
    table = epoch_passes.safe_split(similarity, 0.18)
    known = np.flatnonzero(~np.isnan(similarity))
    count = int(0.18 * 98)  # 17
    top = known[np.argsort(similarity[known])[::-1][:count]]
    np.testing.assert_array_equal(np.flatnonzero(table), np.sort(top))
    assert table.dtype == np.float32 and table.sum() == 17
    # A share reached by adding steps counts as the exact share: 0.15 + 18 * 0.01 is 0.32999999999999996
    # in floating point, and 33 of 100 pairs, not 32.
    assert epoch_passes.safe_split(np.linspace(0, 1, 100), 0.15 + 18 * 0.01).sum() == 33
    # Ties go to the lower index.
    np.testing.assert_array_equal(epoch_passes.safe_split(np.array([0.5, 0.9, 0.5, 0.5]), 0.5), [1, 1, 0, 0])


def test_safe_split_of_known_embeddings():
    # Pairs whose caption embedding is rotated away from the image by a known angle: the split keeps
    # the least rotated. The pass's similarity is the dot product of the unit embeddings.
    angles = np.array([0.3, 1.2, 0.1, 0.9, 0.5, 1.5, 0.2, 0.7])
    image = np.stack([np.ones_like(angles), np.zeros_like(angles)], -1)
    text = np.stack([np.cos(angles), np.sin(angles)], -1)
    similarity = np.sum(image * text, -1)
    np.testing.assert_array_equal(epoch_passes.safe_split(similarity, 0.5), [1, 0, 1, 0, 1, 0, 1, 0])


def test_schedule_warm_ups_then_a_growing_capped_share():
    options = ml_collections.ConfigDict(dict(epoch_passes.EPOCH_PASSES["safeclip"].options))
    phases = [epoch_passes.safeclip_schedule(options, epoch) for epoch in range(80)]
    assert phases[:5] == [("inmodal_warmup", 0.0)] * 5
    assert phases[5] == ("multimodal_warmup", 1.0)
    assert [phase for phase, _ in phases[6:]] == ["split"] * 74
    shares = np.array([share for _, share in phases[6:]])
    expected = np.minimum(0.15 + 0.01 * np.arange(74), 0.85)
    np.testing.assert_allclose(shares, expected, atol=1e-12)
    assert shares[-1] == 0.85 and shares[69] == pytest.approx(0.84)


# ---------------------------------------------------------------------------------------------
# A sharded run, resumed mid-epoch
# ---------------------------------------------------------------------------------------------


class SixteenPairs(FakeTrainingSource):
    """The fake red and blue squares, 16 pairs: two batches of 8 an epoch."""

    def __init__(self):
        super().__init__()
        self.colours = self.colours * 2


def _safeclip_config(tmp_path, monkeypatch):
    config = fake_data_config(tmp_path, monkeypatch)
    monkeypatch.setattr(pipeline, "training_source", lambda data: SixteenPairs())
    # The config entry: one epoch of each warm-up, then a split keeping 4 of the 16 pairs; the
    # cross-modal warm-up at the published constant rate.
    run_configs.enable_epoch_pass(config, "safeclip", inmodal_warmup_epochs=1, multimodal_warmup_epochs=1, safe_share_start=0.25)
    config.objective = objectives.objective_config(mmcl=0.0, safe_mmcl=1.0, risky_ssl=1.0)
    config.optim.epoch_learning_rates = epoch_passes.safeclip_learning_rates(config.epoch_passes.safeclip)
    config.eval.sets = ml_collections.ConfigDict()  # no evaluation: the test reads the states
    lexicon = tmp_path / "synonyms.json"
    lexicon.write_text('{"photo": ["picture"], "square": ["block"]}')  # for the captions' SSL views
    return run_configs.override(config, {
        "data.synonyms": str(lexicon),
        "train.num_epochs": 3,
        "train.checkpoint_every_steps": 1,
        "train.keep_checkpoints": 2,
        "train.log_every_steps": 1,
    })


def test_a_sharded_safeclip_run_follows_its_schedule_and_resumes_exactly(tmp_path, monkeypatch):
    config = _safeclip_config(tmp_path, monkeypatch)
    safe_fields, tables = [], []
    real_jit_step, real_split = train.run_group.RunGroup.jit_step, epoch_passes.safeclip_split

    def recording_jit_step(group, step, shardings):
        jitted = real_jit_step(group, step, shardings)

        def call(state, batch, rng, hparams):
            assert len(batch[objectives.SAFE_PAIRS].sharding.device_set) == 8
            safe_fields.append(np.asarray(batch[objectives.SAFE_PAIRS]))
            return jitted(state, batch, rng, hparams)

        return call

    def recording_split(context, state, rng):
        table, state = real_split(context, state, rng)
        tables.append((context.epoch, table))
        return table, state

    monkeypatch.setattr(train.run_group.RunGroup, "jit_step", recording_jit_step)
    monkeypatch.setitem(
        epoch_passes.EPOCH_PASSES, "safeclip", dataclasses.replace(epoch_passes.EPOCH_PASSES["safeclip"], run=recording_split)
    )
    reference = str(tmp_path / "reference")
    train.train_and_evaluate(config, reference)

    # Per epoch: all risky, all safe, then 4 of the 16 pairs safe, in the batches as in the table.
    assert [(epoch, float(table.sum())) for epoch, table in tables] == [(0, 0.0), (1, 16.0), (2, 4.0)]
    assert [float(field.sum()) for field in safe_fields[:4]] == [0.0, 0.0, 8.0, 8.0]
    assert all(field.shape == (8,) for field in safe_fields) and len(safe_fields) == 6
    assert float(safe_fields[4].sum() + safe_fields[5].sum()) == 4.0
    # The in-modal warm-up trains no MMCL and the cross-modal one no SSL.
    metrics = run_files.read_json_lines(os.path.join(reference, run_files.METRICS_FILE))
    by_step = {record["step"]: record for record in metrics}
    assert by_step[1]["safe_mmcl"] == 0.0 and by_step[1]["risky_ssl"] > 0.0
    assert by_step[3]["risky_ssl"] == 0.0 and by_step[3]["safe_mmcl"] > 0.0
    # ... at 5e-6; the cosine schedule (no warm-up, 6 steps, peak 1e-3) around it.
    expected = [1e-3 * 0.5 * (1 + np.cos(np.pi * step / 6)) for step in range(6)]
    expected[2:4] = [5e-6, 5e-6]
    np.testing.assert_allclose([by_step[step]["learning_rate"] for step in range(1, 7)], expected, rtol=1e-6)

    # The run killed after step 5 (halfway through the split epoch) resumes from that checkpoint,
    # reads the epoch's split back rather than recomputing it, and ends with the same state.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(reference, resumed)
    shutil.rmtree(os.path.join(resumed, run_files.CHECKPOINTS_DIR, "6"))
    os.remove(os.path.join(resumed, run_files.DONE_FILE))
    tables.clear()
    safe_fields.clear()
    train.train_and_evaluate(config, resumed)
    assert tables == [] and len(safe_fields) == 1
    final = lambda run: saved_arrays.read_state(os.path.join(run, run_files.CHECKPOINTS_DIR, "6", "state"))
    expected = dict(jax.tree_util.tree_leaves_with_path(final(reference)))
    got = dict(jax.tree_util.tree_leaves_with_path(final(resumed)))
    assert got.keys() == expected.keys()
    for path, leaf in expected.items():
        assert np.array_equal(np.asarray(got[path]), np.asarray(leaf)), jax.tree_util.keystr(path)


# ---------------------------------------------------------------------------------------------
# Config entries
# ---------------------------------------------------------------------------------------------


def _config_module(name):
    return run_configs.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py"))


def _flat(config) -> dict:
    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return dict(walk(config.to_dict()))


SAFECLIP_KEYS = {"objective.mmcl_weight", "objective.safe_mmcl_weight", "objective.risky_ssl_weight"}


def test_cc3m_entry_is_the_study_run_with_the_published_schedule():
    config = _config_module("pretrain_safeclip_cc").get_config("cc3m")
    assert config.epoch_passes.safeclip.to_dict() == {
        "inmodal_warmup_epochs": 5, "multimodal_warmup_epochs": 1,
        "safe_share_start": 0.15, "safe_share_step": 0.01, "safe_share_cap": 0.85,
    }
    assert objectives.active_terms(config.objective) == ("safe_mmcl", "risky_ssl")
    assert (config.poison.count, config.poison.target_label, config.model.image.kind) == (1_500, "banana", "resnet")
    assert (config.train.num_epochs, config.optim.learning_rate, config.data.batch_size) == (32, 5e-4, 1_024)
    # The cross-modal warm-up is the 6th epoch (0-based 5), at the published --filter_lr.
    assert config.optim.epoch_learning_rates.to_dict() == {5: 5e-6}
    # Everything else is the study's MMCL+SSL CC3M run.
    study_run = _flat(_config_module("pretrain_cc").get_config("cc3m_mmcl_ssl"))
    different = {key for key, value in _flat(config).items() if study_run.get(key, "<none>") != value}
    assert different == SAFECLIP_KEYS | {"objective.ssl_weight", "optim.learning_rate", "train.num_epochs", "optim.epoch_learning_rates.5"} | {
        f"epoch_passes.safeclip.{option}" for option in config.epoch_passes.safeclip
    }
    with pytest.raises(ValueError, match="cc3m"):
        _config_module("pretrain_safeclip_cc").get_config("cc6m")


def test_synthetic_entry_is_the_studys_mmcl_run_with_the_scaled_schedule(tmp_path):
    module = _config_module("pretrain_safeclip_synthetic")
    config = module.get_config(str(tmp_path / "world"))
    # 6 epochs: one of each warm-up, then 4 splits whose share reaches the published last share, 40 %.
    options = config.epoch_passes.safeclip
    assert (options.inmodal_warmup_epochs, options.multimodal_warmup_epochs) == (1, 1)
    shares = [epoch_passes.safeclip_schedule(options, epoch)[1] for epoch in range(6)]
    np.testing.assert_allclose(shares, [0.0, 1.0, 0.15, 0.15 + 0.25 / 3, 0.15 + 0.5 / 3, 0.40])
    assert module.scaled_schedule(32) == {"inmodal_warmup_epochs": 5, "multimodal_warmup_epochs": 1, "safe_share_step": pytest.approx(0.01)}
    study = run_configs.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "study_synthetic.py"))
    mmcl = experiment.pretrain_configs(experiment.apply_proportions(study.get_config("default")), str(tmp_path / "world"))["MMCL"]
    different = {key for key, value in _flat(config).items() if _flat(mmcl).get(key, "<none>") != value}
    assert config.optim.epoch_learning_rates.to_dict() == {1: 5e-6}
    assert different == SAFECLIP_KEYS | {"optim.epoch_learning_rates.1"} | {f"epoch_passes.safeclip.{option}" for option in options}


def test_the_pass_refuses_a_run_whose_objective_ignores_its_split():
    config = run_configs.run_config("micro-vit")
    run_configs.enable_epoch_pass(config, "safeclip")
    context = epoch_passes.PassContext(config, None, None, None, 4)
    with pytest.raises(ValueError, match="safe_mmcl_weight"):
        epoch_passes.safeclip_split(context, {}, None)
    config = run_configs.override(config, {"epoch_passes.safeclip.safe_share_step": 1.5})
    with pytest.raises(ValueError, match="epoch_passes.safeclip.safe_share_step"):
        epoch_passes.safeclip_split(epoch_passes.PassContext(config, None, None, None, 4), {}, None)
