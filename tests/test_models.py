"""Tests for the CLIP towers, presets, and their size estimates."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bclip.models import (
    apply_model,
    build_model,
    count_params,
    forward_flops_per_pair,
    image_tower_flops,
    init_variables,
    model_config,
    text_tower_flops,
)
from bclip.models.resnet import Bottleneck
from bclip.models.text import end_of_text_positions

# Parameter counts of OpenAI's released checkpoints (logit_scale included).
PUBLISHED_PARAMS = {
    "RN50": 102.0e6,
    "RN101": 119.7e6,
    "RN50x4": 178.3e6,
    "ViT-B/32": 151.3e6,
    "ViT-B/16": 149.6e6,
    "ViT-L/14": 427.6e6,
}


def _variable_shapes(config):
    model = build_model(config)
    return jax.eval_shape(
        lambda rng: init_variables(model, rng, config.image.size, config.text.context_length),
        jax.random.key(0),
    )


def _random_variables(config, seed=0):
    """Model and variables of the model's shapes filled from numpy, initialisation-like.

    XLA on CPU takes seconds to compile `init_variables` (every parameter is drawn by its own
    random op), so behaviour tests use these and only the init tests pay for the real thing.
    """
    model = build_model(config)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "logit_scale":
            return jnp.asarray(math.log(1 / 0.07), leaf.dtype)
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "mean":
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 0
        std = fan_in**-0.5 if fan_in and "embedding" not in name else 0.02
        return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

    return model, jax.tree_util.tree_map_with_path(fill, _variable_shapes(config))


@functools.partial(jax.jit, static_argnames=("model", "method"))
def _apply(model, variables, *inputs, method="__call__"):
    return model.apply(variables, *inputs, method=method)


_jitted_apply_model = jax.jit(apply_model, static_argnames=("model", "train"))


def _random_batch(config, batch_size=3, seed=1):
    rng = np.random.default_rng(seed)
    size = config.image.size
    images = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    vocab, length = config.text.vocab_size, config.text.context_length
    tokens = np.zeros((batch_size, length), np.int32)
    for row in range(batch_size):
        num_words = 3 + 2 * row
        tokens[row, 0] = vocab - 2
        tokens[row, 1 : 1 + num_words] = rng.integers(1, vocab - 2, num_words)
        tokens[row, 1 + num_words] = vocab - 1
    return jnp.asarray(images), jnp.asarray(tokens)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_count_matches_openai(name):
    count = count_params(model_config(name))
    assert abs(count - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.005


def test_batch_stats_are_not_counted_as_params():
    shapes = _variable_shapes(model_config("RN50"))
    assert set(shapes) == {"params", "batch_stats"}
    num_stats = sum(leaf.size for leaf in jax.tree.leaves(shapes["batch_stats"]))
    num_params = sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))
    assert num_stats > 0
    assert count_params(model_config("RN50")) == num_params


def test_openai_preset_shapes():
    rn50 = _variable_shapes(model_config("RN50"))["params"]
    image = rn50["image_tower"]
    assert image["stem_conv1"]["kernel"].shape == (3, 3, 3, 32)
    assert image["stem_conv3"]["kernel"].shape == (3, 3, 32, 64)
    assert image["layer4_block2"]["conv3"]["kernel"].shape == (1, 1, 512, 2048)
    assert image["attnpool"]["positional_embedding"].shape == (7 * 7 + 1, 2048)
    assert image["attnpool"]["c_proj"]["kernel"].shape == (2048, 1024)
    assert rn50["text_tower"]["text_projection"].shape == (512, 1024)
    assert "layer3_block5" in image and "layer3_block6" not in image

    vit_l = _variable_shapes(model_config("ViT-L/14"))["params"]
    image = vit_l["image_tower"]
    assert image["patch_embed"]["kernel"].shape == (14, 14, 3, 1024)
    assert "bias" not in image["patch_embed"]
    assert image["positional_embedding"].shape == (16 * 16 + 1, 1024)
    assert image["proj"].shape == (1024, 768)
    assert "block_23" in image["transformer"] and "block_24" not in image["transformer"]
    assert vit_l["text_tower"]["transformer"]["block_0"]["attn"]["qkv"]["kernel"].shape == (
        768,
        3 * 768,
    )


def test_tiny_vit_is_exactly_as_specified():
    config = model_config("tiny-vit")
    assert config.image.kind == "vit"
    assert (config.image.size, config.image.patch_size) == (64, 8)
    assert (config.image.width, config.image.layers, config.image.heads) == (256, 6, 4)
    assert config.image.mlp_ratio == 4
    assert (config.text.context_length, config.text.vocab_size) == (32, 49408)
    assert (config.text.width, config.text.layers, config.text.heads) == (256, 6, 4)
    assert config.embed_dim == 256

    params = _variable_shapes(config)["params"]
    image, text = params["image_tower"], params["text_tower"]
    assert image["patch_embed"]["kernel"].shape == (8, 8, 3, 256)
    assert image["positional_embedding"].shape == (8 * 8 + 1, 256)
    assert image["class_embedding"].shape == (256,)
    assert sorted(image["transformer"]) == [f"block_{i}" for i in range(6)]
    block = image["transformer"]["block_0"]
    assert block["attn"]["qkv"]["kernel"].shape == (256, 768)
    assert block["mlp_fc"]["kernel"].shape == (256, 1024)
    assert block["mlp_proj"]["kernel"].shape == (1024, 256)
    assert image["proj"].shape == (256, 256)
    assert text["token_embedding"]["embedding"].shape == (49408, 256)
    assert text["positional_embedding"].shape == (32, 256)
    assert sorted(text["transformer"]) == [f"block_{i}" for i in range(6)]
    assert text["text_projection"].shape == (256, 256)


@pytest.mark.parametrize("name", ["micro-vit", "micro-resnet"])
def test_embeddings_are_unit_norm(name):
    config = model_config(name)
    model, variables = _random_variables(config)
    images, tokens = _random_batch(config)
    image_emb, text_emb = _apply(model, variables, images, tokens)
    assert image_emb.shape == text_emb.shape == (3, config.embed_dim)
    assert image_emb.dtype == text_emb.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(image_emb, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(text_emb, axis=-1), 1.0, rtol=1e-5)
    # Distinct inputs must give distinct embeddings.
    assert float(jnp.abs(image_emb[0] - image_emb[1]).max()) > 1e-3
    assert float(jnp.abs(text_emb[0] - text_emb[1]).max()) > 1e-3
    np.testing.assert_allclose(
        _apply(model, variables, images, method="encode_image"), image_emb, atol=1e-6
    )
    np.testing.assert_allclose(
        _apply(model, variables, tokens, method="encode_text"), text_emb, atol=1e-6
    )


def test_init_variables():
    config = model_config("micro-vit")
    variables = init_variables(build_model(config), jax.random.key(0), 32, 16)
    assert set(variables) == {"params"}
    params = variables["params"]
    assert float(params["logit_scale"]) == pytest.approx(math.log(1 / 0.07))
    assert "logit_bias" not in params
    shapes = _variable_shapes(config)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(lambda leaf: leaf.shape, shapes)
    # OpenAI's initial scales: token embedding std 0.02, positional 0.01.
    assert float(jnp.std(params["text_tower"]["token_embedding"]["embedding"])) == pytest.approx(
        0.02, rel=0.1
    )
    assert float(jnp.std(params["text_tower"]["positional_embedding"])) == pytest.approx(
        0.01, rel=0.2
    )


def test_bottleneck_starts_as_its_shortcut_and_downsamples():
    block = Bottleneck(planes=4, stride=2)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 6)), jnp.float32)
    variables = block.init(jax.random.key(0), x)
    assert set(variables) == {"params", "batch_stats"}
    assert float(jnp.abs(variables["params"]["bn3"]["scale"]).max()) == 0.0
    out = block.apply(variables, x)
    assert out.shape == (2, 4, 4, 16)
    # With the zero-initialised bn3 the block is its shortcut: average-pool, 1x1 conv, then
    # BatchNorm at fresh running statistics (mean 0, variance 1, unit scale, zero bias).
    kernel = variables["params"]["downsample_conv"]["kernel"][0, 0]
    pooled = x.reshape(2, 4, 2, 4, 2, 6).mean(axis=(2, 4))
    shortcut = jnp.maximum(pooled @ kernel / np.sqrt(1 + 1e-5), 0.0)
    np.testing.assert_allclose(out, shortcut, atol=1e-5)


def test_siglip_bias_only_when_asked():
    shapes = _variable_shapes(model_config("micro-vit", siglip_bias=True))["params"]
    assert shapes["logit_bias"].shape == shapes["logit_scale"].shape == ()
    assert "logit_bias" not in _variable_shapes(model_config("micro-vit"))["params"]
    # Reading the scalars alone initialises only them, not the towers.
    model = build_model(model_config("micro-vit", siglip_bias=True))
    scalars = model.init(jax.random.key(0), method=lambda clip: (clip.logit_scale, clip.logit_bias))
    assert float(scalars["params"]["logit_bias"]) == -10.0
    assert float(scalars["params"]["logit_scale"]) == pytest.approx(math.log(1 / 0.07))


def test_images_are_normalised_inside_the_model():
    config = model_config("micro-vit")
    model, variables = _random_variables(config)
    images, _ = _random_batch(config)
    from_uint8 = _apply(model, variables, images, method="encode_image")
    from_float = _apply(model, variables, images.astype(jnp.float32), method="encode_image")
    np.testing.assert_allclose(from_uint8, from_float, atol=1e-6)


def test_end_of_text_positions():
    tokens = jnp.array([[998, 5, 999, 0], [998, 999, 7, 999], [998, 5, 6, 7]])
    np.testing.assert_array_equal(end_of_text_positions(tokens, 999), [2, 1, 3])


def test_text_pools_at_end_of_text_and_is_causal():
    config = model_config("micro-vit")
    model, variables = _random_variables(config)
    _, tokens = _random_batch(config)  # row 0: start, 3 words, end-of-text at 4, padding
    encode = lambda t: _apply(model, variables, t, method="encode_text")  # noqa: E731
    reference = encode(tokens)

    after_end = tokens.at[0, 6].set(17).at[0, 5].set(config.text.vocab_size - 1)
    np.testing.assert_allclose(encode(after_end), reference, atol=1e-6)

    before_end = tokens.at[0, 2].set(17 if int(tokens[0, 2]) != 17 else 18)
    changed = encode(before_end)
    assert float(jnp.abs(changed[0] - reference[0]).max()) > 1e-3
    np.testing.assert_allclose(changed[1:], reference[1:], atol=1e-6)


@pytest.mark.parametrize("name", ["micro-vit", "micro-resnet"])
def test_bfloat16_compute_matches_float32(name):
    config = model_config(name)
    model, variables = _random_variables(config)
    bf16_model = build_model(model_config(name, dtype="bfloat16"))
    images, tokens = _random_batch(config)
    image_f32, text_f32 = _apply(model, variables, images, tokens)
    image_bf16, text_bf16 = _apply(bf16_model, variables, images, tokens)
    assert image_bf16.dtype == text_bf16.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(image_bf16, axis=-1), 1.0, rtol=1e-5)
    image_cosine = jnp.sum(image_f32 * image_bf16, axis=-1)
    text_cosine = jnp.sum(text_f32 * text_bf16, axis=-1)
    assert float(image_cosine.min()) > 0.99
    assert float(text_cosine.min()) > 0.99


def test_apply_model_updates_batch_stats_only_in_training():
    config = model_config("micro-resnet")
    model, variables = _random_variables(config)
    images, tokens = _random_batch(config)
    embeddings, state = _jitted_apply_model(model, variables, images, tokens, train=False)
    unchanged = jax.tree.map(jnp.array_equal, state, {"batch_stats": variables["batch_stats"]})
    assert jax.tree.all(unchanged)

    (image_emb, text_emb), state = _jitted_apply_model(model, variables, images, tokens, train=True)
    old_mean = variables["batch_stats"]["image_tower"]["stem_bn1"]["mean"]
    new_mean = state["batch_stats"]["image_tower"]["stem_bn1"]["mean"]
    assert float(jnp.abs(new_mean - old_mean).max()) > 1e-3
    assert image_emb.shape == (3, config.embed_dim)
    # Batch statistics differ from the fresh running ones, so the output changes too.
    assert float(jnp.abs(image_emb - embeddings[0]).max()) > 1e-4
    np.testing.assert_allclose(text_emb, embeddings[1], atol=1e-6)


def test_apply_model_on_vit_has_no_state():
    config = model_config("micro-vit")
    model, variables = _random_variables(config)
    images, tokens = _random_batch(config)
    assert set(variables) == {"params"}
    (image_emb, _), state = _jitted_apply_model(model, variables, images, tokens, train=True)
    assert state == {}
    np.testing.assert_allclose(image_emb, _apply(model, variables, images, tokens)[0], atol=1e-6)


@pytest.mark.parametrize(
    "name, total_gflops", [("RN50", 18.2), ("ViT-B/32", 14.8), ("ViT-B/16", 41.1)]
)
def test_forward_flops_match_open_clip_profile(name, total_gflops):
    assert forward_flops_per_pair(model_config(name)) / 1e9 == pytest.approx(total_gflops, rel=0.1)


def test_rn50_flops_split_between_towers():
    config = model_config("RN50")
    assert image_tower_flops(config) / 1e9 == pytest.approx(12.2, rel=0.1)
    assert text_tower_flops(config) / 1e9 == pytest.approx(6.0, rel=0.1)


def test_model_config_overrides():
    config = model_config("micro-vit", dtype="bfloat16", text=dict(layers=3), **{"image.width": 64})
    assert config.dtype == "bfloat16"
    assert config.text.layers == 3 and config.text.width == 32
    assert config.image.width == 64
    assert model_config("micro-vit").image.width == 32  # presets are not mutated
    with pytest.raises(KeyError):
        model_config("ViT-Z/99")


def test_text_tower_equals_normalising_every_token_then_pooling():
    """The tower normalises only the pooled token; CLIP normalises all tokens and then pools."""
    from bclip.models import text, vit

    tower = text.TextTransformer(context_length=8, vocab_size=50, width=32, layers=2, heads=4, output_dim=16)
    tokens = jnp.array([[48, 5, 6, 49, 0, 0, 0, 0], [48, 7, 8, 9, 10, 11, 12, 49]])
    params = tower.init(jax.random.key(0), tokens)["params"]
    embedded = params["token_embedding"]["embedding"][tokens] + params["positional_embedding"]
    hidden = vit.Transformer(layers=2, heads=4, is_causal=True).apply({"params": params["transformer"]}, embedded)
    hidden = vit.layer_norm(jnp.float32, jnp.float32, "ln").apply({"params": params["ln_final"]}, hidden)
    expected = hidden[jnp.arange(2), jnp.array([3, 7])] @ params["text_projection"]
    np.testing.assert_allclose(tower.apply({"params": params}, tokens), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("is_causal", [False, True])
def test_dot_product_attention_matches_the_textbook_formula(is_causal):
    from bclip.models.vit import dot_product_attention

    rng = np.random.default_rng(0)
    batch, length, heads, head_dim = 2, 5, 3, 4
    query, key, value = (rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32) for _ in range(3))
    got = np.asarray(dot_product_attention(jnp.asarray(query), jnp.asarray(key), jnp.asarray(value), is_causal))
    # softmax(q k^T / sqrt(d)) v per batch element and head, in float64.
    want = np.empty_like(got)
    for b in range(batch):
        for h in range(heads):
            logits = query[b, :, h].astype(np.float64) @ key[b, :, h].T.astype(np.float64) / math.sqrt(head_dim)
            if is_causal:
                logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
            weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
            weights /= weights.sum(axis=-1, keepdims=True)
            want[b, :, h] = weights @ value[b, :, h]
    np.testing.assert_allclose(got, want, atol=1e-5)
    if is_causal:  # the first query sees only the first key
        np.testing.assert_allclose(got[:, 0], value[:, 0], atol=1e-6)
