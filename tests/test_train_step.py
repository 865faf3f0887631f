"""The sharded train step: 8 devices vs 1, FSDP vs replicated, overfitting, temperature clamp."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bclip import objectives, optim, sharding, train_step
from bclip.models import clip


# One optimiser for every test: the schedule's numbers are constants of the compiled step, so tests
# that share them share programs (and the compilation cache).
def _setup(model_name, mesh, objective, params_sharding="replicated", lr=1e-3, warmup=2, total=100, eps=1e-3):
    model_config = clip.model_config(model_name)
    model = clip.build_model(model_config)
    optim_config = optim.optim_config(learning_rate=lr, warmup_steps=warmup, eps=eps)
    tx = optim.make_optimizer(optim_config)
    state, shardings = train_step.create_sharded_state(
        model, tx, jax.random.key(0), mesh, model_config, sharding.sharding_config(params=params_sharding, fsdp_min_size=64)
    )
    return model_config, state, _jitted_step(model, tx, objective, optim_config, total, shardings, mesh)


def _jitted_step(model, tx, objective, optim_config, total_steps, shardings, mesh):
    """The jitted step of one run whose hyper-parameters are those of `optim_config` and `objective`,
    called as (state, batch, rng)."""
    jitted = train_step.shard_and_jit_train_step(
        train_step.make_train_step(model, tx, objective, optim_config, total_steps), shardings, mesh
    )
    hparams = train_step.run_hyperparams(optim_config, objective)
    return lambda state, batch, rng: jitted(state, batch, rng, hparams)


def _batch(model_config, batch_size, seed=0, views=False):
    rng = np.random.default_rng(seed)
    size, ctx, vocab = model_config.image.size, model_config.text.context_length, model_config.text.vocab_size

    def tokens():
        t = np.zeros((batch_size, ctx), np.int32)
        lengths = rng.integers(2, ctx - 1, size=batch_size)
        for row, n in enumerate(lengths):
            t[row, 0] = vocab - 2
            t[row, 1:n] = rng.integers(1, vocab - 2, size=n - 1)
            t[row, n] = vocab - 1
        return t

    batch = {"image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8), "text": tokens()}
    if views:
        batch["aug_image"] = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
        batch["aug_text"] = tokens()
    return batch


def _run(model_name, devices, objective, steps=3, params_sharding="replicated", views=False):
    # Some gradients are exactly zero in exact arithmetic (e.g. the key bias, which softmax ignores);
    # with Adam's default eps of 1e-8 float round-off in them becomes a full ±lr step whose sign
    # depends on the reduction order. _setup's eps=1e-3 turns round-off of ~1e-9 into nothing while
    # real gradients (1e-4 and up) still move the parameters by a good part of a step.
    mesh = sharding.make_mesh(devices)
    model_config, state, step = _setup(model_name, mesh, objective, params_sharding)
    history = []
    for i in range(steps):
        batch = jax.device_put(_batch(model_config, 16, seed=i, views=views), sharding.batch_sharding(mesh))
        state, metrics = step(state, batch, jax.random.key(i))
        history.append(jax.device_get(metrics))
    return jax.device_get(state["params"]), history


def _assert_trees_close(a, b, rtol, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize(
    "model_name,objective,views",
    [
        ("micro-vit", objectives.objective_config(mmcl=1.0), False),
        ("micro-resnet", objectives.objective_config(mmcl=1.0, ssl=1.0), True),
    ],
)
def test_eight_devices_match_one_device(model_name, objective, views):
    steps = 2 if model_name == "micro-resnet" else 3  # the ResNet's compile dominates; keep it under a minute
    params8, hist8 = _run(model_name, jax.devices(), objective, steps=steps, views=views)
    params1, hist1 = _run(model_name, jax.devices()[:1], objective, steps=steps, views=views)
    for m8, m1 in zip(hist8, hist1):
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
        np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
    _assert_trees_close(params8, params1, rtol=1e-4, atol=2e-6)


def test_fsdp_matches_replicated():
    objective = objectives.objective_config(mmcl=1.0)
    params_f, hist_f = _run("micro-vit", jax.devices(), objective, params_sharding="fsdp")
    params_r, hist_r = _run("micro-vit", jax.devices(), objective, params_sharding="replicated")
    for a, b in zip(hist_f, hist_r):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    _assert_trees_close(params_f, params_r, rtol=1e-4, atol=2e-6)


def test_fsdp_actually_splits_large_parameters():
    mesh = sharding.make_mesh()
    model_config, state, _ = _setup("micro-vit", mesh, objectives.objective_config(), params_sharding="fsdp")
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state["params"])]
    assert any("data" in tuple(spec) for spec in specs)
    # Adam moments follow their parameter's layout.
    mu = state["opt"].inner_state[0].mu
    for p, m in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(mu)):
        assert p.sharding.spec == m.sharding.spec


def test_tiny_model_overfits_a_fixed_batch():
    """MMCL on one fixed batch of 16 pairs: the loss starts near chance (ln 16) and falls more than 10×."""
    mesh = sharding.make_mesh()
    model_config, state, step = _setup("micro-vit", mesh, objectives.objective_config())
    batch = jax.device_put(_batch(model_config, 16), sharding.batch_sharding(mesh))
    losses = []
    for i in range(60):
        state, metrics = step(state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert losses[0] > 0.8 * np.log(16)
    assert losses[-1] < losses[0] / 10, losses[::10]


def test_metrics_hold_each_term_temperature_grad_norm_and_lr():
    mesh = sharding.make_mesh()
    objective = objectives.objective_config(mmcl=1.0, ssl=0.5)
    model_config, state, step = _setup("micro-vit", mesh, objective)
    batch = jax.device_put(_batch(model_config, 16, views=True), sharding.batch_sharding(mesh))
    _, metrics = step(state, batch, jax.random.key(0))
    metrics = jax.device_get(metrics)
    assert set(metrics) == {"loss", "mmcl", "ssl", "temperature", "grad_norm", "learning_rate"}
    np.testing.assert_allclose(metrics["loss"], metrics["mmcl"] + 0.5 * metrics["ssl"], rtol=1e-6)
    # Measured 9.5e-9 off, float32's rounding of 1/0.07; 1e-7 is about one and a half float32 steps at 14.3.
    np.testing.assert_allclose(metrics["temperature"], 1 / 0.07, rtol=1e-7)
    # First update of a linear warm-up from 0 uses lr 0.
    assert metrics["learning_rate"] == 0.0
    assert metrics["grad_norm"] > 0


def _with_logit_scale(state, value):
    """A fresh copy of `state` (the step donates its input) with logit_scale set to `value`."""
    shardings = jax.tree.map(lambda x: x.sharding, state)
    host = jax.device_get(state)
    host["params"] = {**host["params"], "logit_scale": np.asarray(value, np.float32)}
    return jax.device_put(host, shardings)


@pytest.mark.parametrize(
    "start, clamped",
    [(np.log(100.0) + 0.5, np.float32(np.log(100.0))), (-0.5, np.float32(0.0))],
    ids=["above_log_100", "below_0"],
)
def test_temperature_clamp_applied_inside_the_step(start, clamped):
    mesh = sharding.make_mesh()
    model_config, state, step = _setup("micro-vit", mesh, objectives.objective_config())
    batch = jax.device_put(_batch(model_config, 16), sharding.batch_sharding(mesh))
    # The first update's learning rate is 0 (warm-up): only the clamp can move the scale, and it must
    # land exactly on the bound, exp(logit_scale) in [1, 100].
    state, metrics = step(_with_logit_scale(state, start), batch, jax.random.key(0))
    assert float(metrics["learning_rate"]) == 0.0
    assert np.asarray(state["params"]["logit_scale"]) == clamped
    np.testing.assert_allclose(metrics["temperature"], np.exp(np.float64(clamped)), rtol=1e-6)


def _decay_mask_by_path(model_name):
    """{"image_tower/proj": True, ...}: the weight-decay mask of the model's parameters (SigLIP
    bias included), keyed by slash-joined parameter paths."""
    model_config = clip.model_config(model_name, siglip_bias=True)
    model = clip.build_model(model_config)
    shapes = jax.eval_shape(
        lambda rng: train_step.init_variables(model, rng, model_config.image.size, model_config.text.context_length),
        jax.random.key(0),
    )
    mask = optim.weight_decay_mask(shapes["params"])
    return {"/".join(key.key for key in path): decayed for path, decayed in jax.tree_util.tree_leaves_with_path(mask)}


def _transformer_paths(tower, names):
    return {f"{tower}/transformer/block_{i}/{name}" for i in range(2) for name in names}


# CLIP's convention (OpenCLIP's exclusion list): weight matrices, convolution kernels and embedding
# tables decay; biases, norm gains and offsets, the class token and the scalars do not.
_BLOCK_DECAYED = ("attn/qkv/kernel", "attn/out/kernel", "mlp_fc/kernel", "mlp_proj/kernel")
_BLOCK_KEPT = ("attn/qkv/bias", "attn/out/bias", "mlp_fc/bias", "mlp_proj/bias",
               "ln_1/scale", "ln_1/bias", "ln_2/scale", "ln_2/bias")
_TEXT_DECAYED = {"text_tower/token_embedding/embedding", "text_tower/positional_embedding",
                 "text_tower/text_projection"} | _transformer_paths("text_tower", _BLOCK_DECAYED)
_TEXT_AND_SCALARS_KEPT = {"text_tower/ln_final/scale", "text_tower/ln_final/bias", "logit_scale",
                          "logit_bias"} | _transformer_paths("text_tower", _BLOCK_KEPT)


def test_weight_decay_mask_skips_vectors_and_temperature():
    decayed = _TEXT_DECAYED | {"image_tower/patch_embed/kernel", "image_tower/positional_embedding",
                               "image_tower/proj"} | _transformer_paths("image_tower", _BLOCK_DECAYED)
    kept = _TEXT_AND_SCALARS_KEPT | {
        "image_tower/class_embedding", "image_tower/ln_pre/scale", "image_tower/ln_pre/bias",
        "image_tower/ln_post/scale", "image_tower/ln_post/bias"} | _transformer_paths("image_tower", _BLOCK_KEPT)
    mask = _decay_mask_by_path("micro-vit")
    assert set(mask) == decayed | kept  # every parameter is named above
    assert {path for path, decays in mask.items() if decays} == decayed


def test_weight_decay_mask_of_a_resnet_skips_batch_norm():
    blocks = [f"image_tower/layer{stage}_block0" for stage in (1, 2, 3, 4)]
    decayed = _TEXT_DECAYED | {
        *(f"image_tower/stem_conv{i}/kernel" for i in (1, 2, 3)),
        *(f"{block}/{conv}/kernel" for block in blocks for conv in ("conv1", "conv2", "conv3", "downsample_conv")),
        *(f"image_tower/attnpool/{proj}/kernel" for proj in ("q_proj", "k_proj", "v_proj", "c_proj")),
        "image_tower/attnpool/positional_embedding",
    }
    kept = _TEXT_AND_SCALARS_KEPT | {
        *(f"image_tower/stem_bn{i}/{name}" for i in (1, 2, 3) for name in ("scale", "bias")),
        *(f"{block}/{bn}/{name}" for block in blocks for bn in ("bn1", "bn2", "bn3", "downsample_bn")
          for name in ("scale", "bias")),
        *(f"image_tower/attnpool/{proj}/bias" for proj in ("q_proj", "k_proj", "v_proj", "c_proj")),
    }
    mask = _decay_mask_by_path("micro-resnet")
    assert set(mask) == decayed | kept
    assert {path for path, decays in mask.items() if decays} == decayed


def test_views_made_on_device_are_encoded_as_the_same_views_sent_by_the_host():
    """A batch with view keys (data.views_on_device) gives the embeddings that a batch with those
    views as aug_image gives, with the batch split over 8 devices (each makes its share's views)."""
    from bclip import device_augment
    from bclip.data import pipeline

    mesh = sharding.make_mesh(jax.devices())
    model_config = clip.model_config("micro-vit")
    model = clip.build_model(model_config)
    variables = train_step.init_variables(model, jax.random.key(0), model_config.image.size, model_config.text.context_length)
    batch = _batch(model_config, 16, views=True)
    keyed = {k: v for k, v in batch.items() if k != "aug_image"}
    keyed["view_key"] = pipeline.view_keys(0, 1, np.arange(16), np.zeros(16, np.int64))
    sent = {k: v for k, v in keyed.items() if k != "view_key"}
    sent["aug_image"] = np.asarray(jax.jit(device_augment.autoaugment_views)(batch["image"], keyed["view_key"]))
    assert np.mean(np.any(sent["aug_image"] != batch["image"], axis=(1, 2, 3))) > 0.5  # real views

    @jax.jit
    def embeddings(params, batch):
        return train_step.compute_embeddings(model, params, {}, batch, with_views=True, train=False)[0]

    from_keys = embeddings(variables["params"], jax.device_put(keyed, sharding.batch_sharding(mesh)))
    from_views = embeddings(variables["params"], jax.device_put(sent, sharding.batch_sharding(mesh)))
    assert from_keys["aug_image"].sharding.spec == from_views["aug_image"].sharding.spec
    # Compiled together with the encoder, a blend may fuse differently and put a pixel one level
    # off; the embeddings of the views then differ in the last digits only.
    for key, atol in (("image", 1e-6), ("text", 1e-6), ("aug_text", 1e-6), ("aug_image", 1e-5)):
        np.testing.assert_allclose(np.asarray(from_keys[key]), np.asarray(from_views[key]), atol=atol, err_msg=key)


def test_pairs_are_grouped_with_their_own_views():
    # Jitted as in the train step (op by op each reshape, stack and slice would compile alone).
    group = jax.jit(train_step.group_originals_with_views, static_argnames="pairs_per_group")
    split = jax.jit(train_step.split_originals_and_views, static_argnames="pairs_per_group")
    originals, views = np.arange(4)[:, None] * np.ones((1, 3), int), (10 + np.arange(4))[:, None] * np.ones((1, 3), int)
    grouped = np.asarray(group(jnp.asarray(originals), jnp.asarray(views), pairs_per_group=2))
    np.testing.assert_array_equal(grouped[:, 0], [0, 1, 10, 11, 2, 3, 12, 13])
    assert grouped.shape == (8, 3)
    back = split(jnp.asarray(grouped), pairs_per_group=2)
    np.testing.assert_array_equal(back[0], originals)
    np.testing.assert_array_equal(back[1], views)
    # One group of the whole batch is the plain [originals; views].
    whole = np.asarray(group(jnp.asarray(originals), jnp.asarray(views), pairs_per_group=4))
    np.testing.assert_array_equal(whole[:, 0], [0, 1, 2, 3, 10, 11, 12, 13])


def test_statistics_groups_must_hold_whole_pairs():
    assert train_step.pairs_per_statistics_group(16, 0) == 16
    assert train_step.pairs_per_statistics_group(16, 4) == 2
    with pytest.raises(ValueError, match="batch_norm_group_size=5 must be even"):
        train_step.pairs_per_statistics_group(16, 5)
    with pytest.raises(ValueError, match="batch_norm_group_size=6 .* batch of 16 pairs"):
        train_step.pairs_per_statistics_group(16, 6)


def test_each_statistics_group_holds_its_pairs_originals_and_views():
    """MMCL+SSL with statistics groups of 4 images over a batch of 16 pairs split over 8 devices:
    each group is 2 pairs' originals and their views (one device's share, as in the reference's
    data-parallel training), so the embeddings and statistics equal those of running the model,
    with whole-batch statistics, on [2 originals; their 2 views] for each pair of pairs alone."""
    group_size, batch_size = 4, 16
    pairs_per_group = group_size // 2
    config = clip.model_config("micro-resnet")
    whole_batch_model = clip.build_model(config)
    grouped_model = clip.build_model(clip.model_config("micro-resnet", **{"image.batch_norm_group_size": group_size}))
    variables = train_step.init_variables(whole_batch_model, jax.random.key(0), config.image.size, config.text.context_length)
    # Unit BatchNorm scales: the zero-initialised last one of each block would hide its statistics.
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: np.ones(leaf.shape, leaf.dtype) if path[-1].key == "scale" else leaf, variables["params"]
    )
    batch = _batch(config, batch_size, views=True)
    # Dark originals, bright views: statistics over the wrong images show in the outputs.
    batch["image"] = batch["image"] // 3
    batch["aug_image"] = 128 + batch["aug_image"] // 2

    mesh = sharding.make_mesh(jax.devices())
    grouped_step = jax.jit(
        lambda params, stats, batch: train_step.compute_embeddings(grouped_model, params, stats, batch, with_views=True)
    )
    embeddings, new_stats = grouped_step(params, variables["batch_stats"], jax.device_put(batch, sharding.batch_sharding(mesh)))

    alone = jax.jit(
        lambda params, stats, images, tokens: train_step.encode_pair(whole_batch_model, params, stats, images, tokens, True)
    )

    def run_alone(images, tokens):
        return jax.device_get(alone(params, variables["batch_stats"], jnp.asarray(images), jnp.asarray(tokens)))

    separate = []
    for start in range(0, batch_size, pairs_per_group):
        rows = slice(start, start + pairs_per_group)
        separate.append(
            run_alone(
                np.concatenate([batch["image"][rows], batch["aug_image"][rows]]),
                np.concatenate([batch["text"][rows], batch["aug_text"][rows]]),
            )
        )
    expected = {
        "image": np.concatenate([run[0][:pairs_per_group] for run in separate]),
        "aug_image": np.concatenate([run[0][pairs_per_group:] for run in separate]),
        "text": np.concatenate([run[1][:pairs_per_group] for run in separate]),
        "aug_text": np.concatenate([run[1][pairs_per_group:] for run in separate]),
    }
    for key, want in expected.items():
        error = np.abs(np.asarray(embeddings[key]) - want).max()
        assert error < 1e-5, (key, error)
    mean_of_updates = jax.tree.map(lambda *updates: np.mean(updates, axis=0), *[run[2] for run in separate])
    _assert_trees_close(new_stats, mean_of_updates, rtol=1e-5, atol=1e-6)

    # Groups of consecutive rows of [originals; views] (originals with originals) give other embeddings.
    all_images = np.concatenate([batch["image"], batch["aug_image"]])
    all_tokens = np.concatenate([batch["text"], batch["aug_text"]])
    wrong = np.concatenate(
        [run_alone(all_images[i : i + group_size], all_tokens[i : i + group_size])[0] for i in range(0, 2 * batch_size, group_size)]
    )
    assert np.abs(wrong[:batch_size] - expected["image"]).max() > 1e-2


def test_siglip_step_minimises_the_sigmoid_loss_of_the_models_embeddings():
    """SigLIP through the sharded step: its loss is the pairwise sigmoid loss of the embeddings the
    model gives (computed here with numpy), and the bias is trained."""
    mesh = sharding.make_mesh()
    model_config = clip.model_config("micro-vit", siglip_bias=True)
    model = clip.build_model(model_config)
    optim_config = optim.optim_config(learning_rate=1e-3, warmup_steps=0, eps=1e-3)
    tx = optim.make_optimizer(optim_config)
    state, shardings = train_step.create_sharded_state(model, tx, jax.random.key(0), mesh, model_config, sharding.sharding_config())
    objective = objectives.objective_config(mmcl=0.0, siglip=1.0)
    step = _jitted_step(model, tx, objective, optim_config, 100, shardings, mesh)
    host_batch = _batch(model_config, 16)
    params = jax.device_get(state["params"])
    # Jitted: run op by op on 8 devices the forward pass compiles each of its ~140 primitives alone.
    (image_emb, text_emb), _ = jax.jit(clip.apply_model, static_argnums=0)(
        model, {"params": params}, host_batch["image"], host_batch["text"]
    )
    logits = np.exp(params["logit_scale"]) * np.asarray(image_emb, np.float64) @ np.asarray(text_emb, np.float64).T + params["logit_bias"]
    signs = 2 * np.eye(16) - 1
    expected = np.sum(np.log1p(np.exp(-signs * logits))) / 16

    new_state, metrics = step(state, jax.device_put(host_batch, sharding.batch_sharding(mesh)), jax.random.key(0))
    metrics = jax.device_get(metrics)
    assert set(metrics) == {"loss", "siglip", "temperature", "grad_norm", "learning_rate"}
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["siglip"], expected, rtol=1e-5)
    # The first step runs at the peak learning rate (no warm-up): the bias moves by about lr.
    bias_change = float(jax.device_get(new_state["params"]["logit_bias"]) - params["logit_bias"])
    assert 0.5e-3 < abs(bias_change) < 1.5e-3
