"""AutoAugment views (the ImageNet policy) made inside the jitted train step, on the accelerator.

With `config.data.views_on_device`, the input pipeline sends each example's view key instead of
an augmented image (bclip.data.pipeline.view_keys: a pure function of the data seed, the example
index and the epoch) and the train step makes the view from the (possibly triggered) image it
already has. The host then decodes each image once and augments no pixels: on a CPU-bound host an
AutoAugment view costs about as much as decoding the image, and the SSL pipeline runs at about
half the single-view rate (`python -m bclip.bench data` measures both ways side by side, and
`python -m bclip.bench views` the step-side cost).

The policy, probabilities and magnitudes are bclip.data.image_augment's; only the random stream
differs (JAX's instead of numpy's), so the views are as deterministic but not the same images as
the host's. Per operation, the pixels are Pillow's (as image_augment makes them), except that
blends and AutoContrast may be one level off where float rounding falls differently, and a
rotation may take the neighbouring source pixel where a coordinate lies on a pixel boundary (its
cos and sin may round differently from C's; shears and translations use Pillow's fixed-point
integers exactly). tests/test_device_augment.py compares every operation. Under `jax.vmap` over a batch every
operation the policy uses is computed for every image and the drawn one selected, which costs
little on an accelerator next to the model and a lot on a CPU: views on device are for GPU/TPU.
"""

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bclip.data import image_augment

# Every operation takes (image float32 [H, W, 3] of integer values 0..255, signed magnitude) and
# returns the same kind of image.
Operation = Callable[[jax.Array, jax.Array], jax.Array]


def _blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
    """Image.blend(degenerate, image, factor): float arithmetic truncated to 0..255, as Pillow."""
    return jnp.clip(jnp.trunc(degenerate + factor * (image - degenerate)), 0.0, 255.0)


def _grey(image: jax.Array) -> jax.Array:
    """[H, W, 1]: Pillow's convert("L"), (19595 R + 38470 G + 7471 B + 2^15) >> 16 in integers."""
    pixels = image.astype(jnp.int32)
    weighted = 19595 * pixels[..., 0] + 38470 * pixels[..., 1] + 7471 * pixels[..., 2] + 32768
    return (weighted >> 16).astype(jnp.float32)[..., None]


def _channel_histograms(image: jax.Array) -> jax.Array:
    """int32 [3, 256]: pixel counts of each value in each channel."""
    values = image.astype(jnp.int32).reshape(-1, 3)
    return jax.vmap(lambda channel: jnp.bincount(channel, length=256), in_axes=1)(values)


def _look_up(image: jax.Array, tables: jax.Array) -> jax.Array:
    """Channel c's value v replaced by tables[c, v] (tables [3, 256])."""
    values = image.astype(jnp.int32)
    return jnp.stack([tables[c][values[..., c]] for c in range(3)], axis=-1).astype(jnp.float32)


def _identity(image, magnitude):
    return image


def _posterize(image, magnitude):
    shift = 8 - magnitude.astype(jnp.int32)
    return ((image.astype(jnp.int32) >> shift) << shift).astype(jnp.float32)


def _solarize(image, magnitude):
    return jnp.where(image < jnp.ceil(magnitude), image, 255.0 - image)


def _invert(image, magnitude):
    return 255.0 - image


def _brightness(image, magnitude):
    return _blend(jnp.zeros_like(image), image, 1.0 + magnitude)


def _color(image, magnitude):
    return _blend(jnp.broadcast_to(_grey(image), image.shape), image, 1.0 + magnitude)


def _contrast(image, magnitude):
    # The grey mean rounded to an integer, as ImageEnhance.Contrast takes it.
    mean = jnp.floor(jnp.sum(_grey(image)) / (image.shape[0] * image.shape[1]) + 0.5)
    return _blend(jnp.full_like(image, mean), image, 1.0 + magnitude)


def _sharpness(image, magnitude):
    # ImageFilter.SMOOTH ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded) inside a one-pixel
    # border, which Pillow leaves as it is.
    padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)))
    height, width = image.shape[:2]
    total = sum(
        padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)
    ) + 4.0 * image
    smooth = jnp.floor(total / 13.0 + 0.5)
    rows, cols = jnp.arange(height)[:, None, None], jnp.arange(width)[None, :, None]
    interior = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
    return _blend(jnp.where(interior, smooth, image), image, 1.0 + magnitude)


def _equalize(image, magnitude):
    return _look_up(image, image_augment.equalize_table(_channel_histograms(image), jnp))


def _autocontrast(image, magnitude):
    lowest = jnp.min(image, axis=(0, 1))
    highest = jnp.max(image, axis=(0, 1))
    stretches = highest > lowest  # otherwise Pillow leaves the channel alone
    scale = 255.0 / jnp.where(stretches, highest - lowest, 1.0)
    stretched = jnp.clip(jnp.trunc((image - lowest) * scale), 0.0, 255.0)
    return jnp.where(stretches, stretched, image)


def _fixed(value: jax.Array) -> jax.Array:
    """`value` in 16.16 fixed point, rounded as Pillow rounds it."""
    return jnp.floor(value * 65536.0 + 0.5).astype(jnp.int32)


def _affine(image: jax.Array, matrix: Sequence[jax.Array]) -> jax.Array:
    """Pillow's AFFINE transform with NEAREST sampling and black fill: output pixel (x, y) takes
    the input pixel at floor(a X + b Y + c, d X + e Y + f) for its centre (X, Y) = (x + .5, y + .5),
    computed as Pillow computes it, in 16.16 fixed point: integer sums leave no rounding to the
    compiler, so the pixels do not depend on how XLA fuses or contracts the arithmetic."""
    a, b, c, d, e, f = matrix
    height, width = image.shape[:2]
    x = jnp.arange(width, dtype=jnp.int32)[None, :]
    y = jnp.arange(height, dtype=jnp.int32)[:, None]
    source_x = (_fixed(c + 0.5 * a + 0.5 * b) + x * _fixed(a) + y * _fixed(b)) >> 16
    source_y = (_fixed(f + 0.5 * d + 0.5 * e) + x * _fixed(d) + y * _fixed(e)) >> 16
    inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
    moved = image[jnp.clip(source_y, 0, height - 1), jnp.clip(source_x, 0, width - 1)]
    return jnp.where(inside[..., None], moved, 0.0)


def _shear_x(image, magnitude):
    return _affine(image, (1.0, magnitude, 0.0, 0.0, 1.0, 0.0))


def _shear_y(image, magnitude):
    return _affine(image, (1.0, 0.0, 0.0, magnitude, 1.0, 0.0))


def _translate_x(image, magnitude):
    return _affine(image, (1.0, 0.0, magnitude, 0.0, 1.0, 0.0))


def _translate_y(image, magnitude):
    return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, magnitude))


def _rotate(image, magnitude):
    # Image.rotate(degrees): counter-clockwise about the centre, the inverse map as Pillow builds it.
    height, width = image.shape[:2]
    angle = -jnp.deg2rad(magnitude)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    centre_x, centre_y = width / 2.0, height / 2.0
    c = -cos * centre_x - sin * centre_y + centre_x
    f = sin * centre_x - cos * centre_y + centre_y
    return _affine(image, (cos, sin, c, -sin, cos, f))


OPERATIONS: dict[str, Operation] = {
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": _invert,
}
assert OPERATIONS.keys() == image_augment.AUTOAUGMENT_OPERATIONS.keys()


class _PolicyTables:
    """A policy as arrays: per sub-policy and step, the branch to run and its unsigned magnitude."""

    def __init__(self, subpolicies, height: int, width: int):
        # Only the operations the policy uses become branches; branch 0 is "no operation".
        names = sorted({operation for subpolicy in subpolicies for operation, _, _ in subpolicy})
        self.branches = [_identity] + [OPERATIONS[name] for name in names]
        self.branch = np.array([[1 + names.index(op) for op, _, _ in sub] for sub in subpolicies], np.int32)
        self.magnitude = np.array(
            [[_device_magnitude(op, m, height, width) for op, _, m in sub] for sub in subpolicies], np.float32
        )


def _device_magnitude(operation: str, magnitude_bin, height: int, width: int) -> float:
    """A step's magnitude as the device gets it. Solarize's threshold is rounded up here, in float64
    as the host policy rounds it: bin 3 is 255 * (1 - 1/3) = 170.00000000000003, threshold 171 on
    the host, which float32 would make 170 (pixels of 170 inverted on the device only)."""
    magnitude = image_augment.autoaugment_magnitude(operation, magnitude_bin, height, width)
    return float(math.ceil(magnitude)) if operation == "Solarize" else magnitude


def autoaugment_choices(
    key: jax.Array, subpolicies=image_augment.AUTOAUGMENT_IMAGENET_SUBPOLICIES
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The random choices of one view, from its key alone: (sub-policy index int32 [], drawn
    uniformly; applied bool [2], each step with its probability; mirrored bool [2], with
    probability 1/2 where the step's operation has a direction, else False). autoaugment_view
    makes its view from exactly these."""
    probability = np.array([[p for _, p, _ in sub] for sub in subpolicies], np.float32)
    signed = np.array([[op in image_augment.SIGNED_OPERATIONS for op, _, _ in sub] for sub in subpolicies], bool)
    choose, apply_key, mirror_key = jax.random.split(key, 3)
    subpolicy = jax.random.randint(choose, (), 0, len(subpolicies))
    applied = jax.random.uniform(apply_key, (2,)) < jnp.asarray(probability)[subpolicy]
    mirrored = (jax.random.uniform(mirror_key, (2,)) < 0.5) & jnp.asarray(signed)[subpolicy]
    return subpolicy, applied, mirrored


def autoaugment_view(
    image: jax.Array, key: jax.Array, subpolicies=image_augment.AUTOAUGMENT_IMAGENET_SUBPOLICIES
) -> jax.Array:
    """AutoAugment view of one uint8 [H, W, 3] image: a sub-policy drawn uniformly, each of its two
    steps applied with its probability and its magnitude mirrored with probability 1/2 where the
    operation has a direction (as image_augment.autoaugment_view; the draws are
    autoaugment_choices'). Black fill."""
    height, width = image.shape[:2]
    tables = _PolicyTables(subpolicies, height, width)
    subpolicy, applies, mirrored = autoaugment_choices(key, subpolicies)
    magnitudes = jnp.where(mirrored, -1.0, 1.0) * jnp.asarray(tables.magnitude)[subpolicy]
    branches = jnp.where(applies, jnp.asarray(tables.branch)[subpolicy], 0)
    view = image.astype(jnp.float32)
    for step in range(2):
        view = jax.lax.switch(branches[step], tables.branches, view, magnitudes[step])
    return view.astype(jnp.uint8)


def autoaugment_views(images: jax.Array, keys: jax.Array) -> jax.Array:
    """Views of a batch: uint8 [B, H, W, 3] images, uint32 [B, 2] threefry key data (a batch's
    view_key, from bclip.data.pipeline.view_keys)."""
    return jax.vmap(autoaugment_view)(images, jax.random.wrap_key_data(keys, impl="threefry2x32"))
