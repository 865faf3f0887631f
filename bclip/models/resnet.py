"""ModifiedResNet image tower of OpenAI CLIP (RN50, RN101, RN50x4): a 3-conv stem,
anti-aliased bottleneck blocks and an attention-pooling head.

BatchNorm keeps running statistics in the 'batch_stats' collection: apply with
`train=True, mutable=['batch_stats']` to use (and update) batch statistics.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bclip.models.vit import Dtype, dot_product_attention

# Initialisers matching the ResNet convention (He normal over fan-out).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _batch_norm(train: bool, dtype: Dtype, param_dtype: Dtype, name: str, zero_scale=False):
    """PyTorch-equivalent BatchNorm (momentum 0.1 there is 0.9 here, eps 1e-5); statistics in
    float32 whatever the compute dtype."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def _avg_pool(x: jax.Array, stride: int) -> jax.Array:
    """[B, H, W, C] -> [B, H/stride, W/stride, C]."""
    if stride == 1:
        return x
    return nn.avg_pool(x, (stride, stride), strides=(stride, stride))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avg-pool) -> 1x1 bottleneck with 4x expansion. Downsampling averages
    before the strided path (anti-aliasing), in both the main and the shortcut branch."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [B, H, W, C_in] -> [B, H/stride, W/stride, 4 * planes]."""
        conv = lambda features, kernel, name: nn.Conv(  # noqa: E731
            features,
            (kernel, kernel),
            padding="SAME" if kernel > 1 else "VALID",
            use_bias=False,
            kernel_init=_conv_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        norm = lambda name, zero_scale=False: _batch_norm(  # noqa: E731
            train, self.dtype, self.param_dtype, name, zero_scale
        )
        out_features = 4 * self.planes
        out = nn.relu(norm("bn1")(conv(self.planes, 1, "conv1")(x)))
        out = nn.relu(norm("bn2")(conv(self.planes, 3, "conv2")(out)))
        out = _avg_pool(out, self.stride)
        # Zero-initialised last BN: every block starts as the identity (OpenAI's init).
        out = norm("bn3", zero_scale=True)(conv(out_features, 1, "conv3")(out))
        shortcut = x
        if self.stride > 1 or x.shape[-1] != out_features:
            shortcut = _avg_pool(x, self.stride)
            shortcut = conv(out_features, 1, "downsample_conv")(shortcut)
            shortcut = norm("downsample_bn")(shortcut)
        return nn.relu(out + shortcut)


class AttentionPool2d(nn.Module):
    """Multi-head attention pooling: the mean of the feature map, plus a learned positional
    embedding, queries the (position-embedded) grid; c_proj maps to `output_dim`."""

    heads: int
    output_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, output_dim]."""
        batch, height, width, channels = x.shape
        head_dim = channels // self.heads
        tokens = x.reshape(batch, height * width, channels)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        positional_embedding = self.param(
            "positional_embedding",
            nn.initializers.normal(channels**-0.5),
            (height * width + 1, channels),
            self.param_dtype,
        )
        tokens = tokens + positional_embedding.astype(self.dtype)
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features,
            kernel_init=nn.initializers.normal(channels**-0.5),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        # Only the pooled (mean) token is read out, so it is the only query.
        query = dense(channels, "q_proj")(tokens[:, :1]).reshape(batch, 1, self.heads, head_dim)
        key = dense(channels, "k_proj")(tokens).reshape(batch, -1, self.heads, head_dim)
        value = dense(channels, "v_proj")(tokens).reshape(batch, -1, self.heads, head_dim)
        pooled = dot_product_attention(query, key, value).reshape(batch, channels)
        return dense(self.output_dim, "c_proj")(pooled)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: stem of three 3x3 convs (first strided) + 2x avg-pool, four stages of
    bottlenecks (widths width, 2w, 4w, 8w; x4 expansion), attention pooling to `output_dim`."""

    image_size: int
    layers: tuple[int, ...]
    width: int
    heads: int
    output_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images: normalised [B, H, W, 3] with H == W == image_size -> features [B, output_dim].

        train=True normalises with batch statistics and updates the running ones (the
        'batch_stats' collection must then be mutable).
        """
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}px images, got {images.shape}")
        x = images
        stem = ((self.width // 2, 2), (self.width // 2, 1), (self.width, 1))
        for index, (features, stride) in enumerate(stem, start=1):
            x = nn.Conv(
                features,
                (3, 3),
                strides=(stride, stride),
                padding=((1, 1), (1, 1)),
                use_bias=False,
                kernel_init=_conv_init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"stem_conv{index}",
            )(x)
            x = _batch_norm(train, self.dtype, self.param_dtype, f"stem_bn{index}")(x)
            x = nn.relu(x)
        x = _avg_pool(x, 2)
        for stage, num_blocks in enumerate(self.layers):
            for block in range(num_blocks):
                x = Bottleneck(
                    planes=self.width * 2**stage,
                    stride=2 if stage > 0 and block == 0 else 1,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"layer{stage + 1}_block{block}",
                )(x, train=train)
        return AttentionPool2d(
            heads=self.heads,
            output_dim=self.output_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attnpool",
        )(x)
