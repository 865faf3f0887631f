"""The two-tower CLIP model, its presets (OpenAI's published shapes plus tiny test models),
and helpers to build, initialise, apply, and size it (parameters, FLOPs).

Variables are {'params'} for ViT models and {'params', 'batch_stats'} for ResNet models;
`init_variables` and `apply_model` treat both alike.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bclip.models.resnet import ModifiedResNet
from bclip.models.text import TextTransformer
from bclip.models.vit import Dtype, VisionTransformer

# OpenAI CLIP's per-channel pixel statistics, on the 0..255 scale images arrive in.
IMAGE_MEAN = tuple(255.0 * value for value in (0.48145466, 0.4578275, 0.40821073))
IMAGE_STD = tuple(255.0 * value for value in (0.26862954, 0.26130258, 0.27577711))

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_BIAS_INIT = -10.0  # SigLIP's initial bias

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def l2_normalize(features: jax.Array) -> jax.Array:
    """[B, D] -> float32 [B, D] with unit rows."""
    features = features.astype(jnp.float32)
    # The epsilon keeps the gradient finite for an all-zero row.
    return features * jax.lax.rsqrt(jnp.sum(features**2, axis=-1, keepdims=True) + 1e-12)


def normalize_images(images: jax.Array, dtype: Dtype) -> jax.Array:
    """uint8 or float 0..255 [B, H, W, 3] -> CLIP-normalised [B, H, W, 3] in `dtype`."""
    mean = jnp.asarray(IMAGE_MEAN, jnp.float32)
    std = jnp.asarray(IMAGE_STD, jnp.float32)
    return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


class CLIP(nn.Module):
    """Image and text towers projecting into a shared space, plus the learnable temperature
    `logit_scale` (a log scale) and, for SigLIP, `logit_bias`.

    The towers' parameters live under 'image_tower' and 'text_tower'.
    """

    image_tower: nn.Module
    text_tower: nn.Module
    siglip_bias: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(LOGIT_SCALE_INIT), (), jnp.float32
        )
        if self.siglip_bias:
            self.logit_bias = self.param(
                "logit_bias", nn.initializers.constant(LOGIT_BIAS_INIT), (), jnp.float32
            )

    @property
    def batch_norm_group_size(self) -> int:
        """Images per BatchNorm statistics group in a training pass of the image tower: 0 for the
        whole pass, and for towers without BatchNorm (ViT)."""
        if isinstance(self.image_tower, ModifiedResNet):
            return self.image_tower.batch_norm_group_size
        return 0

    def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images: uint8 or float 0..255 [B, H, W, 3] -> unit-norm float32 [B, D]."""
        return l2_normalize(self.image_tower(normalize_images(images, self.dtype), train=train))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """tokens: int [B, L] -> unit-norm float32 [B, D]."""
        return l2_normalize(self.text_tower(tokens))

    def __call__(
        self, images: jax.Array, tokens: jax.Array, train: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, 3], tokens [B, L] -> (image_emb [B, D], text_emb [B, D])."""
        return self.encode_image(images, train=train), self.encode_text(tokens)


# --------------------------------------------------------------------------- presets


def _openai_text(width: int) -> dict[str, Any]:
    return dict(context_length=77, vocab_size=49408, width=width, layers=12, heads=width // 64)


def _resnet(size: int, layers: tuple[int, ...], width: int) -> dict[str, Any]:
    # OpenAI: attention-pool heads of 64 channels over the 32 * width final channels.
    return dict(kind="resnet", size=size, layers=layers, width=width, heads=width * 32 // 64)


def _vit(size: int, patch_size: int, width: int, layers: int) -> dict[str, Any]:
    return dict(
        kind="vit",
        size=size,
        patch_size=patch_size,
        width=width,
        layers=layers,
        heads=width // 64,
        mlp_ratio=4.0,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "RN50": dict(
        image=_resnet(224, (3, 4, 6, 3), 64), text=_openai_text(512), embed_dim=1024
    ),
    "RN101": dict(
        image=_resnet(224, (3, 4, 23, 3), 64), text=_openai_text(512), embed_dim=512
    ),
    "RN50x4": dict(
        image=_resnet(288, (4, 6, 10, 6), 80), text=_openai_text(640), embed_dim=640
    ),
    "ViT-B/32": dict(image=_vit(224, 32, 768, 12), text=_openai_text(512), embed_dim=512),
    "ViT-B/16": dict(image=_vit(224, 16, 768, 12), text=_openai_text(512), embed_dim=512),
    "ViT-L/14": dict(image=_vit(224, 14, 1024, 24), text=_openai_text(768), embed_dim=768),
    # A small ViT CLIP (22.3M parameters, 0.95 GFLOPs per pair) for quick runs.
    "tiny-vit": dict(
        image=dict(kind="vit", size=64, patch_size=8, width=256, layers=6, heads=4, mlp_ratio=4.0),
        text=dict(context_length=32, vocab_size=49408, width=256, layers=6, heads=4),
        embed_dim=256,
    ),
    # For unit and end-to-end tests on CPU.
    "micro-vit": dict(
        image=dict(kind="vit", size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=4.0),
        text=dict(context_length=16, vocab_size=1000, width=32, layers=2, heads=2),
        embed_dim=32,
    ),
    # 32px images leave a 1x1 grid for the attention pool (two tokens: mean and cell).
    "micro-resnet": dict(
        image=dict(kind="resnet", size=32, layers=(1, 1, 1, 1), width=16, heads=8),
        text=dict(context_length=16, vocab_size=1000, width=32, layers=2, heads=2),
        embed_dim=32,
    ),
}

# Keys every preset shares; a preset (or an override) changes them.
_DEFAULTS: dict[str, Any] = dict(
    siglip_bias=False,
    dtype="float32",
    activation="quick_gelu",  # OpenAI's models; open_clip's non-OpenAI ones use "gelu"
)
_IMAGE_DEFAULTS: dict[str, Any] = dict(
    # ResNet towers: images per BatchNorm statistics group in one training pass of the tower
    # (with SSL views, pairs' originals and views together); 0 = the whole pass. Data-parallel
    # training without synchronised BatchNorm has one group per device. ViT towers have no
    # BatchNorm: build_model refuses a nonzero value for them rather than ignore it.
    batch_norm_group_size=0,
)


def model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The preset `name` as a ConfigDict, with overrides applied.

    Overrides are top-level keys (dtype="bfloat16"), dotted paths passed as a dict
    (**{"text.vocab_size": 1000}), or dicts merged into a sub-config (text=dict(layers=4)).
    """
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    preset = PRESETS[name]
    config = ml_collections.ConfigDict(
        dict(
            name=name,
            image={**_IMAGE_DEFAULTS, **preset["image"]},
            text=dict(preset["text"]),
            embed_dim=preset["embed_dim"],
            **_DEFAULTS,
        )
    )
    config.lock()  # an override of a key the preset does not have is an error, not a new key
    for key, value in overrides.items():
        if isinstance(value, dict):
            config[key].update(value)
            continue
        *parents, leaf = key.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def build_model(config: ml_collections.ConfigDict) -> CLIP:
    """The CLIP flax module described by a `model_config` config."""
    dtype = DTYPES[config.dtype]
    image, text = config.image, config.text
    if image.kind == "vit":
        if image.batch_norm_group_size:
            raise ValueError(
                f"model.image.batch_norm_group_size={image.batch_norm_group_size}, but a ViT image "
                "tower has no BatchNorm; leave it at 0"
            )
        image_tower = VisionTransformer(
            image_size=image.size,
            patch_size=image.patch_size,
            width=image.width,
            layers=image.layers,
            heads=image.heads,
            mlp_ratio=image.mlp_ratio,
            output_dim=config.embed_dim,
            activation=config.activation,
            dtype=dtype,
        )
    elif image.kind == "resnet":
        image_tower = ModifiedResNet(
            image_size=image.size,
            layers=tuple(image.layers),
            width=image.width,
            heads=image.heads,
            output_dim=config.embed_dim,
            batch_norm_group_size=image.batch_norm_group_size,
            dtype=dtype,
        )
    else:
        raise ValueError(f"unknown image tower kind {image.kind!r}")
    text_tower = TextTransformer(
        context_length=text.context_length,
        vocab_size=text.vocab_size,
        width=text.width,
        layers=text.layers,
        heads=text.heads,
        output_dim=config.embed_dim,
        activation=config.activation,
        dtype=dtype,
    )
    return CLIP(
        image_tower=image_tower, text_tower=text_tower, siglip_bias=config.siglip_bias, dtype=dtype
    )


# --------------------------------------------------------------------------- variables


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def init_variables(
    model: CLIP, rng: jax.Array, image_size: int, context_length: int
) -> dict[str, Any]:
    """Fresh variables as a plain dict: {'params'} (ViT) or {'params', 'batch_stats'} (ResNet).

    Jitted, with the model static, so re-initialising the same model reuses the compiled
    program; call it inside `jax.jit(..., out_shardings=...)` to place the variables or
    `jax.eval_shape` to only shape them.
    """
    images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
    tokens = jnp.zeros((1, context_length), jnp.int32)
    return dict(model.init({"params": rng}, images, tokens, train=False))


def apply_model(
    model: CLIP,
    variables: dict[str, Any],
    images: jax.Array,
    tokens: jax.Array,
    train: bool = False,
) -> tuple[tuple[jax.Array, jax.Array], dict[str, Any]]:
    """Forward pass for any tower kind.

    images uint8 [B, H, W, 3], tokens int [B, L] -> ((image_emb [B, D], text_emb [B, D]),
    model_state), where model_state holds the non-param collections after the pass:
    {'batch_stats': ...} for ResNets (updated when train=True), {} for ViTs.
    """
    model_state = {name: value for name, value in variables.items() if name != "params"}
    if not train or not model_state:
        return model.apply(variables, images, tokens, train=train), model_state
    embeddings, updates = model.apply(
        variables, images, tokens, train=True, mutable=list(model_state)
    )
    return embeddings, {**model_state, **updates}


def count_params(config: ml_collections.ConfigDict) -> int:
    """Number of trainable parameters (batch statistics excluded), without allocating them."""
    model = build_model(config)
    shapes = jax.eval_shape(
        lambda rng: init_variables(model, rng, config.image.size, config.text.context_length),
        jax.random.key(0),
    )
    return sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))


# --------------------------------------------------------------------------- FLOPs
# Forward FLOPs count matmuls and convolutions only, at 2 FLOPs per multiply-accumulate.


def _transformer_macs(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
    per_layer = (
        4 * tokens * width**2  # qkv and output projections
        + 2 * tokens * width * mlp_ratio * width  # MLP in and out
        + 2 * tokens**2 * width  # logits and weighted sum of values
    )
    return layers * per_layer


def _resnet_macs(image: ml_collections.ConfigDict, embed_dim: int) -> float:
    width, resolution = image.width, image.size // 2
    macs = resolution**2 * 9 * (3 * width // 2 + (width // 2) ** 2 + width // 2 * width)
    resolution //= 2
    channels = width
    for stage, num_blocks in enumerate(image.layers):
        planes = width * 2**stage
        for block in range(num_blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            macs += resolution**2 * (channels * planes + 9 * planes**2)
            resolution //= stride
            macs += resolution**2 * planes * 4 * planes
            if stride > 1 or channels != 4 * planes:
                macs += resolution**2 * channels * 4 * planes
            channels = 4 * planes
    tokens = resolution**2 + 1
    # Attention pool: keys and values over all tokens, query and readout for one.
    macs += 2 * tokens * channels**2 + channels**2 + 2 * tokens * channels + channels * embed_dim
    return macs


def image_tower_flops(config: ml_collections.ConfigDict) -> float:
    """Forward FLOPs of the image tower for one image (model config)."""
    image = config.image
    if image.kind == "resnet":
        return 2.0 * _resnet_macs(image, config.embed_dim)
    patches = (image.size // image.patch_size) ** 2
    macs = patches * 3 * image.patch_size**2 * image.width
    macs += _transformer_macs(patches + 1, image.width, image.layers, image.mlp_ratio)
    macs += image.width * config.embed_dim
    return 2.0 * macs


def text_tower_flops(config: ml_collections.ConfigDict) -> float:
    """Forward FLOPs of the text tower for one full-length caption (model config)."""
    text = config.text
    macs = _transformer_macs(text.context_length, text.width, text.layers, 4.0)
    macs += text.width * config.embed_dim
    return 2.0 * macs


def forward_flops_per_pair(config: ml_collections.ConfigDict) -> float:
    """Approximate forward FLOPs for one image and one caption (model config); a training
    step costs about three times this."""
    return image_tower_flops(config) + text_tower_flops(config)
