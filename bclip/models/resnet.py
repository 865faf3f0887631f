"""ModifiedResNet image tower of OpenAI CLIP (RN50, RN101, RN50x4): a 3-conv stem,
anti-aliased bottleneck blocks and an attention-pooling head.

BatchNorm keeps running statistics in the 'batch_stats' collection: apply with
`train=True, mutable=['batch_stats']` to use (and update) batch statistics. Those come from the
whole batch of the pass, or, with `batch_norm_group_size`, from each group of that many images on
its own, as in data-parallel training without synchronised BatchNorm (one group per device).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bclip.models.vit import Dtype, dot_product_attention

# Initialisers matching the ResNet convention (He normal over fan-out).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _check_groups_divide_batch(batch_size: int, group_size: int) -> None:
    if batch_size % group_size:
        raise ValueError(
            f"BatchNorm statistics groups of {group_size} images (model.image.batch_norm_group_size) "
            f"do not divide the batch of {batch_size} images"
        )


class GroupedBatchNorm(nn.Module):
    """Training-mode BatchNorm with statistics per group of `group_size` consecutive images.

    Not GroupNorm: groups split the batch, not the channels. Each group is normalised with the
    mean and (biased) variance over its own images and positions, as each device's BatchNorm is in
    data-parallel training without synchronised statistics. The running averages move towards the
    mean over groups of the group means and variances: every group counts alike, and with equal
    groups the mean is the whole batch's. (PyTorch DDP without SyncBN instead keeps rank 0's, that
    is one group's, since its buffers are broadcast from rank 0.)

    The variables are nn.BatchNorm's ('params': scale, bias; 'batch_stats': float32 mean, var; all
    [C]), so either module reads the other's checkpoints. Statistics are float32 whatever `dtype`.
    """

    group_size: int
    momentum: float = 0.9
    epsilon: float = 1e-5
    scale_init: nn.initializers.Initializer = nn.initializers.ones
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, ..., C] with B a multiple of group_size -> normalised [B, ..., C] in `dtype`.

        Group g is x[g * group_size : (g + 1) * group_size]; with the batch sharded over devices in
        contiguous rows, a group size of B / num_devices makes each device's share one group.
        """
        batch_size, channels = x.shape[0], x.shape[-1]
        _check_groups_divide_batch(batch_size, self.group_size)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        scale = self.param("scale", self.scale_init, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)

        num_groups = batch_size // self.group_size
        groups = x.astype(jnp.float32).reshape(num_groups, self.group_size, *x.shape[1:])
        # Reduce over each group's images and positions: [G, 1, ..., 1, C].
        within_group = tuple(range(1, groups.ndim - 1))
        mean = groups.mean(axis=within_group, keepdims=True)
        # Two passes (deviations from the mean) rather than E[x^2] - E[x]^2: no cancellation for
        # channels whose mean is large against their spread.
        variance = jnp.square(groups - mean).mean(axis=within_group, keepdims=True)

        if not self.is_initializing():
            for running, per_group in ((running_mean, mean), (running_var, variance)):
                over_groups = per_group.reshape(num_groups, channels).mean(axis=0)
                running.value = self.momentum * running.value + (1 - self.momentum) * over_groups

        multiplier = jax.lax.rsqrt(variance + self.epsilon) * scale.astype(jnp.float32)
        normalised = (groups - mean) * multiplier + bias.astype(jnp.float32)
        return normalised.reshape(x.shape).astype(self.dtype)


def _batch_norm(
    train: bool, group_size: int, dtype: Dtype, param_dtype: Dtype, name: str, zero_scale=False
) -> nn.Module:
    """PyTorch-equivalent BatchNorm (momentum 0.1 there is 0.9 here, eps 1e-5); statistics in
    float32 whatever the compute dtype.

    group_size 0 takes batch statistics over the whole batch (flax's nn.BatchNorm); a positive
    group_size, per group of that many images (GroupedBatchNorm), when training. Evaluation uses
    the running statistics either way, so it stays nn.BatchNorm.
    """
    options = dict(
        momentum=0.9,
        epsilon=1e-5,
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )
    if train and group_size:
        return GroupedBatchNorm(group_size=group_size, **options)
    return nn.BatchNorm(use_running_average=not train, **options)


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
    batch_norm_group_size: int = 0
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
            train, self.batch_norm_group_size, self.dtype, self.param_dtype, name, zero_scale
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
    bottlenecks (widths width, 2w, 4w, 8w; x4 expansion), attention pooling to `output_dim`.

    batch_norm_group_size: images per BatchNorm statistics group in a training pass; 0 takes the
    statistics over the whole batch.
    """

    image_size: int
    layers: tuple[int, ...]
    width: int
    heads: int
    output_dim: int
    batch_norm_group_size: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images: normalised [B, H, W, 3] with H == W == image_size -> features [B, output_dim].

        train=True normalises with batch statistics and updates the running ones (the
        'batch_stats' collection must then be mutable). With batch_norm_group_size > 0 the
        statistics are those of images g * size .. (g + 1) * size - 1 for group g, so B must be a
        multiple of the group size.
        """
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}px images, got {images.shape}")
        if train and self.batch_norm_group_size:
            # Fail before the first layer, with the config key in the message.
            _check_groups_divide_batch(images.shape[0], self.batch_norm_group_size)
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
            x = _batch_norm(
                train, self.batch_norm_group_size, self.dtype, self.param_dtype, f"stem_bn{index}"
            )(x)
            x = nn.relu(x)
        x = _avg_pool(x, 2)
        for stage, num_blocks in enumerate(self.layers):
            for block in range(num_blocks):
                x = Bottleneck(
                    planes=self.width * 2**stage,
                    stride=2 if stage > 0 and block == 0 else 1,
                    batch_norm_group_size=self.batch_norm_group_size,
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
