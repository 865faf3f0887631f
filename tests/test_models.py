"""Tests for the CLIP towers, presets, and their size estimates."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bclip import sharding
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
from bclip.models.resnet import Bottleneck, GroupedBatchNorm
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
    random op), so behaviour tests use these and only the init tests pay for the real thing. The
    leaves are numpy arrays: made with jnp, each leaf shape would compile its own fill op.
    """
    model = build_model(config)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "logit_scale":
            return np.asarray(math.log(1 / 0.07), leaf.dtype)
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        if name == "mean":
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 0
        std = fan_in**-0.5 if fan_in and "embedding" not in name else 0.02
        return np.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

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
    # The published figures are rounded to 0.1M. The largest gap measured is 1.5e-4 of the count
    # (ViT-B/32: 151,277,313 against 151.3M); a layer missing or doubled would be far more.
    assert abs(count - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 2e-4


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
    # Checked in numpy: jnp ops here would each compile on their own.
    image_emb, text_emb = np.asarray(image_emb), np.asarray(text_emb)
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=-1), 1.0, rtol=1e-5)
    # Distinct inputs must give distinct embeddings.
    assert float(np.abs(image_emb[0] - image_emb[1]).max()) > 1e-3
    assert float(np.abs(text_emb[0] - text_emb[1]).max()) > 1e-3
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
    assert float(np.std(np.asarray(params["text_tower"]["token_embedding"]["embedding"]))) == pytest.approx(
        0.02, rel=0.1
    )
    assert float(np.std(np.asarray(params["text_tower"]["positional_embedding"]))) == pytest.approx(
        0.01, rel=0.2
    )


def test_bottleneck_starts_as_its_shortcut_and_downsamples():
    block = Bottleneck(planes=4, stride=2)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 6)).astype(np.float32)
    # Jitted: op by op, initialising and applying the block would compile each of its ops alone.
    variables = jax.device_get(jax.jit(block.init)(jax.random.key(0), x))
    assert set(variables) == {"params", "batch_stats"}
    assert float(np.abs(variables["params"]["bn3"]["scale"]).max()) == 0.0
    out = jax.jit(block.apply)(variables, x)
    assert out.shape == (2, 4, 4, 16)
    # With the zero-initialised bn3 the block is its shortcut: average-pool, 1x1 conv, then
    # BatchNorm at fresh running statistics (mean 0, variance 1, unit scale, zero bias).
    kernel = variables["params"]["downsample_conv"]["kernel"][0, 0]
    pooled = x.reshape(2, 4, 2, 4, 2, 6).mean(axis=(2, 4))
    shortcut = np.maximum(pooled @ kernel / np.sqrt(1 + 1e-5), 0.0)
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


class _PixelRecorder(nn.Module):
    """An image tower that records the pixels it is given and returns a fixed feature, so a test
    sees exactly what the model hands its image tower."""

    @nn.compact
    def __call__(self, images, train=False):
        self.sow("intermediates", "pixels", images)
        return jnp.ones((images.shape[0], 4), jnp.float32)


def test_images_are_normalised_inside_the_model():
    # OpenAI CLIP's published per-channel statistics on the 0..1 scale, written out here rather than
    # read from the model, so the test fails if the model uses other numbers or none.
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    # Black, white, the mean rounded to whole levels (close to 0 after normalising) and a mixed pixel.
    pixels = np.array([[[0, 0, 0], [255, 255, 255]], [[123, 117, 104], [10, 200, 90]]], np.uint8)[None]
    expected = (pixels / 255.0 - mean) / std

    model = build_model(model_config("micro-vit")).clone(image_tower=_PixelRecorder())
    variables = {"params": {"logit_scale": np.asarray(math.log(1 / 0.07), np.float32)}}
    encode_image = jax.jit(functools.partial(model.apply, method="encode_image", mutable=["intermediates"]))
    for images in (jnp.asarray(pixels), jnp.asarray(pixels, jnp.float32)):
        _, state = encode_image(variables, images)
        (seen,) = state["intermediates"]["image_tower"]["pixels"]
        assert seen.dtype == jnp.float32
        np.testing.assert_allclose(seen, expected, rtol=1e-6, atol=1e-6)


def test_end_of_text_positions():
    tokens = jnp.array([[998, 5, 999, 0], [998, 999, 7, 999], [998, 5, 6, 7]])
    positions = jax.jit(end_of_text_positions, static_argnums=1)(tokens, 999)
    np.testing.assert_array_equal(positions, [2, 1, 3])


def test_text_pools_at_end_of_text_and_is_causal():
    config = model_config("micro-vit")
    model, variables = _random_variables(config)
    _, tokens = _random_batch(config)  # row 0: start, 3 words, end-of-text at 4, padding
    tokens = np.asarray(tokens)  # edited and compared in numpy (jnp ops would each compile)
    encode = lambda t: np.asarray(_apply(model, variables, t, method="encode_text"))  # noqa: E731
    reference = encode(tokens)

    after_end = tokens.copy()
    after_end[0, 6], after_end[0, 5] = 17, config.text.vocab_size - 1
    np.testing.assert_allclose(encode(after_end), reference, atol=1e-6)

    before_end = tokens.copy()
    before_end[0, 2] = 17 if int(tokens[0, 2]) != 17 else 18
    changed = encode(before_end)
    assert float(np.abs(changed[0] - reference[0]).max()) > 1e-3
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
    image_f32, text_f32, image_bf16, text_bf16 = jax.device_get((image_f32, text_f32, image_bf16, text_bf16))
    np.testing.assert_allclose(np.linalg.norm(image_bf16, axis=-1), 1.0, rtol=1e-5)
    image_cosine = np.sum(image_f32 * image_bf16, axis=-1)
    text_cosine = np.sum(text_f32 * text_bf16, axis=-1)
    assert float(image_cosine.min()) > 0.99
    assert float(text_cosine.min()) > 0.99


def test_apply_model_updates_batch_stats_only_in_training():
    config = model_config("micro-resnet")
    model, variables = _random_variables(config)
    images, tokens = _random_batch(config)
    # The outputs are checked in numpy: jnp ops here would each compile on their own.
    embeddings, state = jax.device_get(_jitted_apply_model(model, variables, images, tokens, train=False))
    unchanged = jax.tree.map(np.array_equal, state, {"batch_stats": variables["batch_stats"]})
    assert jax.tree.all(unchanged)

    (image_emb, text_emb), state = jax.device_get(_jitted_apply_model(model, variables, images, tokens, train=True))
    old_mean = variables["batch_stats"]["image_tower"]["stem_bn1"]["mean"]
    new_mean = state["batch_stats"]["image_tower"]["stem_bn1"]["mean"]
    assert float(np.abs(new_mean - old_mean).max()) > 1e-3
    assert image_emb.shape == (3, config.embed_dim)
    # Batch statistics differ from the fresh running ones, so the output changes too.
    assert float(np.abs(image_emb - embeddings[0]).max()) > 1e-4
    np.testing.assert_allclose(text_emb, embeddings[1], atol=1e-6)


def test_apply_model_on_vit_has_no_state():
    config = model_config("micro-vit")
    model, variables = _random_variables(config)
    images, tokens = _random_batch(config)
    assert set(variables) == {"params"}
    (image_emb, _), state = _jitted_apply_model(model, variables, images, tokens, train=True)
    assert state == {}
    np.testing.assert_allclose(image_emb, _apply(model, variables, images, tokens)[0], atol=1e-6)


# Tolerances a little above the measured gaps: the ViTs come to 14.777 and 41.086 GFLOPs (0.15 %
# and 0.033 % below the profile), RN50 to 17.546 (3.6 % below, nearly all of it in the image tower).
@pytest.mark.parametrize(
    "name, total_gflops, rel", [("RN50", 18.2, 0.04), ("ViT-B/32", 14.8, 2e-3), ("ViT-B/16", 41.1, 5e-4)]
)
def test_forward_flops_match_open_clip_profile(name, total_gflops, rel):
    assert forward_flops_per_pair(model_config(name)) / 1e9 == pytest.approx(total_gflops, rel=rel)


def test_rn50_flops_split_between_towers():
    config = model_config("RN50")
    # Measured: the image tower 11.586 GFLOPs (5.0 % below 12.2), the text tower 5.960 (0.67 % below 6.0).
    assert image_tower_flops(config) / 1e9 == pytest.approx(12.2, rel=0.055)
    assert text_tower_flops(config) / 1e9 == pytest.approx(6.0, rel=0.008)


def test_model_config_overrides():
    config = model_config("micro-vit", dtype="bfloat16", text=dict(layers=3), **{"image.width": 64})
    assert config.dtype == "bfloat16"
    assert config.text.layers == 3 and config.text.width == 32
    assert config.image.width == 64
    assert model_config("micro-vit").image.width == 32  # presets are not mutated
    with pytest.raises(KeyError):
        model_config("ViT-Z/99")


def _numpy_layer_norm(x, params, epsilon=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon) * params["scale"] + params["bias"]


def _numpy_text_tower(params, tokens, heads, eot_token_id):
    """OpenAI CLIP's text encoder written out in float64 numpy from the parameter arrays: embed,
    causal pre-norm blocks (fused qkv split into q, k, v of `width` columns each, quick-GELU MLP),
    ln_final over every token, then the end-of-text token through the projection."""
    params = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), params)
    batch, length = tokens.shape
    x = params["token_embedding"]["embedding"][tokens] + params["positional_embedding"][:length]
    width = x.shape[-1]
    head_dim = width // heads
    future = np.triu(np.ones((length, length), bool), k=1)
    for index in range(len(params["transformer"])):
        block = params["transformer"][f"block_{index}"]
        normed = _numpy_layer_norm(x, block["ln_1"])
        qkv = normed @ block["attn"]["qkv"]["kernel"] + block["attn"]["qkv"]["bias"]
        query, key, value = (part.reshape(batch, length, heads, head_dim) for part in np.split(qkv, 3, axis=-1))
        logits = np.einsum("bthd,bshd->bhts", query, key) / math.sqrt(head_dim)
        logits[:, :, future] = -np.inf
        weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        attended = np.einsum("bhts,bshd->bthd", weights, value).reshape(batch, length, width)
        x = x + attended @ block["attn"]["out"]["kernel"] + block["attn"]["out"]["bias"]
        hidden = _numpy_layer_norm(x, block["ln_2"]) @ block["mlp_fc"]["kernel"] + block["mlp_fc"]["bias"]
        hidden = hidden / (1.0 + np.exp(-1.702 * hidden))  # quick GELU: h * sigmoid(1.702 h)
        x = x + hidden @ block["mlp_proj"]["kernel"] + block["mlp_proj"]["bias"]
    x = _numpy_layer_norm(x, params["ln_final"])
    end_of_text = np.argmax(tokens == eot_token_id, axis=1)
    return x[np.arange(batch), end_of_text] @ params["text_projection"]


def test_text_tower_equals_normalising_every_token_then_pooling():
    """The tower normalises only the pooled token; CLIP normalises all tokens and then pools. The
    reference is an independent numpy forward pass that does the latter."""
    from bclip.models import text

    tower = text.TextTransformer(context_length=8, vocab_size=50, width=32, layers=2, heads=4, output_dim=16)
    # End-of-text (49) at positions 3 and 7; row 0's padding after it must not reach the pooled token.
    tokens = np.array([[48, 5, 6, 49, 0, 0, 0, 0], [48, 7, 8, 9, 10, 11, 12, 49]])
    # Jitted: op by op, initialising and applying the tower would compile each of its ops alone.
    params = jax.device_get(jax.jit(tower.init)(jax.random.key(0), jnp.asarray(tokens))["params"])
    # Non-trivial norms and biases (initialised to 1 and 0), so a misplaced one shows.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf + rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
        if path[-1].key in ("scale", "bias") else leaf,
        params,
    )
    expected = _numpy_text_tower(params, tokens, heads=4, eot_token_id=49)
    got = np.asarray(jax.jit(tower.apply)({"params": params}, jnp.asarray(tokens)))
    # float32 against float64: the largest difference measured is 0.9e-6 (1.1e-6 with the tower run
    # op by op) on outputs up to 2.7.
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("is_causal", [False, True])
def test_dot_product_attention_matches_the_textbook_formula(is_causal):
    from bclip.models.vit import dot_product_attention

    rng = np.random.default_rng(0)
    batch, length, heads, head_dim = 2, 5, 3, 4
    query, key, value = (rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32) for _ in range(3))
    attention = jax.jit(dot_product_attention, static_argnames="is_causal")
    got = np.asarray(attention(jnp.asarray(query), jnp.asarray(key), jnp.asarray(value), is_causal=is_causal))
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


# --------------------------------------------------------------------------- BatchNorm groups


def _is_conv_or_batch_norm(module, method_name):
    return isinstance(module, (nn.Conv, nn.BatchNorm, GroupedBatchNorm)) and method_name == "__call__"


@functools.partial(jax.jit, static_argnames="model")
def _image_training_pass(model, variables, images):
    """One training pass of the image tower: (embeddings [B, D], updated batch_stats, every
    convolution's and BatchNorm's output as {path: [B, H, W, C]})."""
    embeddings, state = model.apply(
        variables,
        images,
        train=True,
        method="encode_image",
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=_is_conv_or_batch_norm,
    )
    layer_outputs = {
        jax.tree_util.keystr(path[:-2]): output
        for path, output in jax.tree_util.tree_leaves_with_path(state["intermediates"])
    }
    return embeddings, state["batch_stats"], layer_outputs


def _images_with_distinct_groups(batch_size, group_size, size=32, seed=3):
    """uint8 [B, size, size, 3] whose groups of `group_size` images have clearly different mean
    brightness, so statistics taken over the wrong images give visibly different outputs."""
    rng = np.random.default_rng(seed)
    group_of_image = np.arange(batch_size) // group_size
    offsets = (40 * (group_of_image % 4))[:, None, None, None]
    return (rng.integers(0, 100, (batch_size, size, size, 3)) + offsets).astype(np.uint8)


def _batch_norm_inputs(layer_outputs):
    """{BatchNorm path: the convolution output it normalises} (stem_bnK <- stem_convK, bnK <- convK,
    downsample_bn <- downsample_conv)."""
    inputs = {}
    for path in layer_outputs:
        if "bn" in path.rsplit("[", 1)[-1]:
            conv_path = path.replace("stem_bn", "stem_conv").replace("_bn'", "_conv'").replace("'bn", "'conv")
            inputs[path] = np.asarray(layer_outputs[conv_path], np.float64)
    return inputs


def _group_statistics(x, num_groups):
    """x [B, H, W, C] -> per-group mean and (biased) variance, each [G, C], in float64."""
    groups = x.reshape(num_groups, -1, x.shape[-1])  # [G, images * H * W, C]
    return groups.mean(axis=1), groups.var(axis=1)


def _subtree(tree, path):
    """The sub-tree of `tree` at a BatchNorm path such as "['image_tower']['stem_bn1']"."""
    keys = [key.strip("'") for key in path.strip("[]").split("][")]
    return functools.reduce(lambda node, key: node[key], keys, tree)


def _sharded_over_eight_devices(images):
    return jax.device_put(images, sharding.batch_sharding(sharding.make_mesh(jax.devices())))


@pytest.mark.parametrize("group_size", [0, 4])
def test_every_batch_norm_uses_its_groups_statistics_as_numpy_computes_them(group_size):
    """A training pass over 32 images split over 8 devices, statistics per group of 4 (one group
    per device) or over the whole batch (0): every BatchNorm output and running-statistics update
    equals the textbook formulas, in float64, applied to the captured convolution output."""
    batch_size = 32
    config = model_config("micro-resnet", **{"image.batch_norm_group_size": group_size})
    model, variables = _random_variables(config)
    images = _images_with_distinct_groups(batch_size, group_size or batch_size)
    _, new_stats, layer_outputs = _image_training_pass(model, variables, _sharded_over_eight_devices(images))
    num_groups = batch_size // (group_size or batch_size)

    batch_norm_inputs = _batch_norm_inputs(layer_outputs)
    assert len(batch_norm_inputs) == 3 + 4 * 4  # the stem's three and four per block (each block downsamples)
    for path, x in batch_norm_inputs.items():
        mean, variance = _group_statistics(x, num_groups)
        params = _subtree(variables["params"], path)
        per_group_shape = (num_groups, 1, 1, 1, x.shape[-1])
        groups = x.reshape(num_groups, -1, *x.shape[1:])
        normalised = (groups - mean.reshape(per_group_shape)) / np.sqrt(variance.reshape(per_group_shape) + 1e-5)
        expected = normalised * np.asarray(params["scale"]) + np.asarray(params["bias"])
        np.testing.assert_allclose(layer_outputs[path], expected.reshape(x.shape), atol=2e-5, err_msg=path)
        old, new = _subtree(variables["batch_stats"], path), _subtree(new_stats, path)
        for key, per_group in (("mean", mean), ("var", variance)):
            expected_running = 0.9 * np.asarray(old[key]) + 0.1 * per_group.mean(axis=0)
            np.testing.assert_allclose(new[key], expected_running, rtol=1e-5, atol=1e-6, err_msg=path + key)


@pytest.mark.parametrize("group_size", [4, 16])
def test_groups_on_eight_devices_match_separate_batches(group_size):
    """32 images split over 8 devices in statistics groups of 4 (one per device) or 16 (each over
    four devices) against each group run alone with whole-batch statistics: the same statistics
    in every BatchNorm, the same embeddings, and running statistics the mean of the runs' updates."""
    batch_size = 32
    num_groups = batch_size // group_size
    whole_batch_model, variables = _random_variables(model_config("micro-resnet"))
    grouped_model = build_model(model_config("micro-resnet", **{"image.batch_norm_group_size": group_size}))
    images = _images_with_distinct_groups(batch_size, group_size)
    embeddings, new_stats, layer_outputs = _image_training_pass(
        grouped_model, variables, _sharded_over_eight_devices(images)
    )
    separate = [
        _image_training_pass(whole_batch_model, variables, jnp.asarray(images[start : start + group_size]))
        for start in range(0, batch_size, group_size)
    ]

    for path, x in _batch_norm_inputs(layer_outputs).items():
        grouped_statistics = _group_statistics(x, num_groups)
        separate_statistics = [_group_statistics(_batch_norm_inputs(run[2])[path], 1) for run in separate]
        for got, want in zip(grouped_statistics, zip(*separate_statistics)):
            np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-5, atol=1e-5, err_msg=path)

    separate_embeddings = np.concatenate([np.asarray(run[0]) for run in separate])
    embedding_error = np.abs(np.asarray(embeddings) - separate_embeddings).max()
    assert embedding_error < 1e-5, embedding_error
    mean_of_updates = jax.tree.map(lambda *updates: np.mean(updates, axis=0), *[run[1] for run in separate])
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(new_stats), jax.tree.leaves(mean_of_updates)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))

    # The groups differ enough that whole-batch statistics would give other embeddings.
    whole_batch_embeddings = _image_training_pass(whole_batch_model, variables, _sharded_over_eight_devices(images))[0]
    assert np.abs(np.asarray(whole_batch_embeddings) - separate_embeddings).max() > 1e-2


def test_batch_not_divisible_into_groups_is_refused():
    model, variables = _random_variables(model_config("micro-resnet", **{"image.batch_norm_group_size": 3}))
    images = jnp.asarray(_images_with_distinct_groups(8, 8))
    train_pass = jax.jit(functools.partial(model.apply, train=True, method="encode_image", mutable=["batch_stats"]))
    with pytest.raises(ValueError, match=r"groups of 3 images .* batch of 8 images"):
        train_pass(variables, images)
    # Evaluation uses the running statistics: any batch size goes.
    assert _apply(model, variables, images, method="encode_image").shape == (8, 32)


def test_group_size_is_in_every_preset_and_refused_for_vit_towers():
    for name in PUBLISHED_PARAMS:
        assert model_config(name).image.batch_norm_group_size == 0
    assert build_model(model_config("RN50", **{"image.batch_norm_group_size": 256})).batch_norm_group_size == 256
    assert build_model(model_config("micro-vit")).batch_norm_group_size == 0
    with pytest.raises(ValueError, match="ViT image tower has no BatchNorm"):
        build_model(model_config("micro-vit", **{"image.batch_norm_group_size": 4}))
