"""Random image views for the in-modal SSL term: AutoAugment (ImageNet policy) and SimCLR views.

Runs in Grain worker processes, so it uses numpy and Pillow only. Policies work on Pillow images
(`augment_pil_image`), so the pipeline passes the image it decoded and copies the view once, into
its batch; `augment_image` wraps them for arrays. Every view is a pure function of the input image
and a seed: the same (image, policy, seed) always gives the same view.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance

# An AutoAugment step: (operation name, probability of applying it, magnitude bin in 0..9 or None
# for operations without a magnitude).
AutoAugmentStep = tuple[str, float, int | None]
AutoAugmentSubpolicy = tuple[AutoAugmentStep, AutoAugmentStep]

NUM_MAGNITUDE_BINS = 10

# The 25 ImageNet sub-policies of Cubuk et al. (AutoAugment, 2019), in the order torchvision
# lists them. Repeated entries are in the published policy too: they weight those sub-policies.
AUTOAUGMENT_IMAGENET_SUBPOLICIES: tuple[AutoAugmentSubpolicy, ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise TypeError(f"expected a numpy uint8 image, got {type(image).__name__} "
                        f"{getattr(image, 'dtype', '')}")
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected an image of shape [H, W, 3], got {image.shape}")


# ----------------------------------------------------------------------------------------------
# Per-channel value maps. Most AutoAugment operations change each channel value independently of
# where it is: such an operation is a uint8 [3, 256] table, consecutive ones compose into a single
# table, and the histogram an Equalize or AutoContrast needs follows from the histogram before
# them. So a run of them costs at most one histogram and one lookup pass over the pixels. Each
# table reproduces the Pillow function named in its docstring exactly. Tables that depend only on
# a magnitude are cached: AutoAugment draws magnitudes from 10 bins.
# ----------------------------------------------------------------------------------------------

_VALUES = np.arange(256)


def _histogram(image: Image.Image) -> np.ndarray:
    """int64 [3, 256]: pixel counts of each value in each channel of an RGB image."""
    return np.fromiter(image.histogram(), np.int64, 3 * 256).reshape(3, 256)


def _apply_table(image: Image.Image, table: np.ndarray) -> Image.Image:
    """The RGB image with channel c's values v replaced by table[c, v] (uint8 [3, 256])."""
    # Image.point rounds each of the 768 table entries in Python first, which takes as long as
    # the lookup itself; the table here is uint8 already.
    return image._new(image.im.point(table.tobytes(), None))


def _remapped_histogram(histogram: np.ndarray, table: np.ndarray) -> np.ndarray:
    """int64 [3, 256]: the histogram of an image with `histogram` after `table` is applied."""
    offsets = 256 * np.arange(3)[:, None]
    flat = np.bincount((table.astype(np.int64) + offsets).ravel(), weights=histogram.ravel(),
                       minlength=3 * 256)
    return flat.astype(np.int64).reshape(3, 256)


def _per_channel(table: np.ndarray) -> np.ndarray:
    """uint8 [3, 256] (read-only) from one [256] table of integers, clipped as Image.point does."""
    return np.broadcast_to(np.clip(table, 0, 255).astype(np.uint8), (3, 256))


@functools.lru_cache(maxsize=256)
def _posterize_table(magnitude: float) -> np.ndarray:
    """ImageOps.posterize(image, int(magnitude)): keeps the top `bits` bits."""
    bits = int(magnitude)
    return _per_channel(_VALUES & ~(2 ** (8 - bits) - 1))


@functools.lru_cache(maxsize=256)
def _solarize_table(magnitude: float) -> np.ndarray:
    """Inverts every value >= the (fractional) threshold `magnitude`."""
    threshold = math.ceil(magnitude)
    return _per_channel(np.where(_VALUES < threshold, _VALUES, 255 - _VALUES))


@functools.lru_cache(maxsize=256)
def _invert_table(magnitude: float) -> np.ndarray:
    """ImageOps.invert."""
    return _per_channel(255 - _VALUES)


@functools.lru_cache(maxsize=4096)
def _blend_table(constant: int, factor: float) -> np.ndarray:
    """uint8 [3, 256]: Image.blend(flat image of `constant`, image, factor) on each value.

    Read off Pillow's own blend of a ramp of all 256 values, so its float rounding is matched
    exactly. ImageEnhance's Brightness (constant 0) and Contrast (the grey mean) are such blends.
    """
    ramp = Image.frombytes("RGB", (256, 1), np.repeat(_VALUES.astype(np.uint8), 3).tobytes())
    flat = Image.new("RGB", (256, 1), (constant,) * 3)
    blended = np.asarray(Image.blend(flat, ramp, factor))[0]
    return _read_only(np.ascontiguousarray(blended.T))


def _brightness_table(magnitude: float) -> np.ndarray:
    """ImageEnhance.Brightness(image).enhance(1 + magnitude)."""
    return _blend_table(0, 1.0 + magnitude)


def equalize_table(histogram: np.ndarray, xp=np) -> np.ndarray:
    """ImageOps.equalize, per channel, from the image's integer [3, 256] histogram: uint8 [3, 256].

    `xp` is the array module, numpy here and jax.numpy for views made on device
    (bclip.device_augment), so both compute the same tables.
    """
    below = xp.cumsum(histogram, axis=1) - histogram  # pixels with a smaller value
    # Pillow's step: the pixels below the highest value present, // 255. It leaves a channel
    # alone when the step is 0, which covers a channel of one value.
    step = xp.max(xp.where(histogram > 0, below, 0), axis=1) // 255
    divisor = xp.maximum(step, 1)[:, None]
    # Value v maps to (step // 2 + the pixels below v) // step.
    tables = xp.minimum((divisor // 2 + below) // divisor, 255)
    return xp.where(step[:, None] > 0, tables, _VALUES).astype(xp.uint8)


def _autocontrast_table(histogram: np.ndarray) -> np.ndarray:
    """ImageOps.autocontrast (no cutoff), per channel, from the int64 [3, 256] histogram."""
    present = histogram > 0
    lowest = np.argmax(present, axis=1)
    highest = 255 - np.argmax(present[:, ::-1], axis=1)
    stretches = highest > lowest  # otherwise (one value, or none) Pillow leaves the channel alone
    scale = 255.0 / np.where(stretches, highest - lowest, 1)
    offset = -lowest * scale
    # As Pillow: int(v * scale + offset) (truncation), clipped to 0..255.
    tables = np.clip(np.trunc(_VALUES * scale[:, None] + offset[:, None]), 0, 255)
    return np.where(stretches[:, None], tables, _VALUES).astype(np.uint8)


def _read_only(array: np.ndarray) -> np.ndarray:
    # Cached tables are shared by every call; freezing them turns accidental mutation into an error.
    array.setflags(write=False)
    return array


# Operations that are a table depending only on the magnitude, and those whose table depends on
# the histogram of the image they see.
_MAGNITUDE_TABLES: dict[str, Callable[[float], np.ndarray]] = {
    "Posterize": _posterize_table,
    "Solarize": _solarize_table,
    "Invert": _invert_table,
    "Brightness": _brightness_table,
}
_HISTOGRAM_TABLES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Equalize": equalize_table,
    "AutoContrast": _autocontrast_table,
}


# ----------------------------------------------------------------------------------------------
# AutoAugment operations. Each takes a PIL RGB image, a signed magnitude (already looked up from
# its bin) and a fill value for pixels moved in from outside the frame.
# ----------------------------------------------------------------------------------------------


def _affine(image: Image.Image, coefficients: tuple[float, ...], fill: int) -> Image.Image:
    # Nearest-neighbour resampling as in the reference AutoAugment, so pixel values stay in the
    # input's palette.
    return image.transform(image.size, Image.Transform.AFFINE, coefficients,
                           resample=Image.Resampling.NEAREST, fillcolor=(fill, fill, fill))


def _shear_x(image, magnitude, fill):
    return _affine(image, (1.0, magnitude, 0.0, 0.0, 1.0, 0.0), fill)


def _shear_y(image, magnitude, fill):
    return _affine(image, (1.0, 0.0, 0.0, magnitude, 1.0, 0.0), fill)


def _translate_x(image, magnitude, fill):
    return _affine(image, (1.0, 0.0, magnitude, 0.0, 1.0, 0.0), fill)


def _translate_y(image, magnitude, fill):
    return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, magnitude), fill)


def _rotate(image, magnitude, fill):
    return image.rotate(magnitude, resample=Image.Resampling.NEAREST, fillcolor=(fill, fill, fill))


def _color(image, magnitude, fill):
    return ImageEnhance.Color(image).enhance(1.0 + magnitude)


def _contrast(image, magnitude, fill):
    """ImageEnhance.Contrast(image).enhance(1 + magnitude): a blend with the rounded mean grey."""
    grey_counts = np.asarray(image.convert("L").histogram(), np.int64)
    mean = int(int(grey_counts @ _VALUES) / int(grey_counts.sum()) + 0.5)
    return _apply_table(image, _blend_table(mean, 1.0 + magnitude))


def _sharpness(image, magnitude, fill):
    return ImageEnhance.Sharpness(image).enhance(1.0 + magnitude)


def _table_operation(make_table: Callable[[float], np.ndarray]):
    return lambda image, magnitude, fill: _apply_table(image, make_table(magnitude))


def _histogram_operation(make_table: Callable[[np.ndarray], np.ndarray]):
    return lambda image, magnitude, fill: _apply_table(image, make_table(_histogram(image)))


AUTOAUGMENT_OPERATIONS: dict[str, Callable[[Image.Image, float, int], Image.Image]] = {
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
    "Brightness": _table_operation(_brightness_table),
    "Color": _color,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _table_operation(_posterize_table),
    "Solarize": _table_operation(_solarize_table),
    "AutoContrast": _histogram_operation(_autocontrast_table),
    "Equalize": _histogram_operation(equalize_table),
    "Invert": _table_operation(_invert_table),
}

# Operations with a direction: their magnitude is negated with probability 1/2.
SIGNED_OPERATIONS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                                "Brightness", "Color", "Contrast", "Sharpness"})
_MAGNITUDE_FREE_OPERATIONS = frozenset({"AutoContrast", "Equalize", "Invert"})


def autoaugment_magnitude(operation: str, magnitude_bin: int | None, height: int,
                          width: int) -> float:
    """Unsigned magnitude of `operation` at bin 0..9 for an image of the given size.

    The ranges are the standard AutoAugment ones (as discretised by torchvision): shear 0-0.3,
    translation 0-150/331 of the side, rotation 0-30 degrees, enhancement 0-0.9 around factor 1,
    posterize 8-4 bits, solarize threshold 255-0. Operations without a magnitude take bin None.
    """
    if operation in _MAGNITUDE_FREE_OPERATIONS:
        return 0.0
    if magnitude_bin is None:
        raise ValueError(f"AutoAugment operation {operation!r} needs a magnitude bin")
    if not 0 <= magnitude_bin < NUM_MAGNITUDE_BINS:
        raise ValueError(f"magnitude bin must be in [0, {NUM_MAGNITUDE_BINS}), got {magnitude_bin}")
    fraction = magnitude_bin / (NUM_MAGNITUDE_BINS - 1)
    if operation in ("ShearX", "ShearY"):
        return 0.3 * fraction
    if operation == "TranslateX":
        return 150.0 / 331.0 * width * fraction
    if operation == "TranslateY":
        return 150.0 / 331.0 * height * fraction
    if operation == "Rotate":
        return 30.0 * fraction
    if operation in ("Brightness", "Color", "Contrast", "Sharpness"):
        return 0.9 * fraction
    if operation == "Posterize":
        return float(8 - round(4 * fraction))
    if operation == "Solarize":
        return 255.0 * (1.0 - fraction)
    raise KeyError(f"unknown AutoAugment operation {operation!r}")


def apply_autoaugment_steps(image: Image.Image, steps: Sequence[tuple[str, float]],
                            fill: int = 0) -> Image.Image:
    """`image` (PIL RGB) after each (operation, signed magnitude) step in turn.

    The pixels are those of calling AUTOAUGMENT_OPERATIONS one after the other, but a run of
    per-value operations (Posterize, Solarize, Invert, Brightness, Equalize, AutoContrast) is
    applied as one composed table. Returns `image` itself when `steps` is empty.
    """
    table = None  # uint8 [3, 256] composed so far and not yet applied to `image`
    histogram = None  # int64 [3, 256] of `image`, once an operation has needed it
    for operation, magnitude in steps:
        if operation in _MAGNITUDE_TABLES:
            step_table = _MAGNITUDE_TABLES[operation](magnitude)
        elif operation in _HISTOGRAM_TABLES:
            if histogram is None:
                histogram = _histogram(image)
            seen = histogram if table is None else _remapped_histogram(histogram, table)
            step_table = _HISTOGRAM_TABLES[operation](seen)
        else:
            if table is not None:
                image, table = _apply_table(image, table), None
            image, histogram = AUTOAUGMENT_OPERATIONS[operation](image, magnitude, fill), None
            continue
        if table is None:
            table = step_table
        else:
            table = np.take_along_axis(step_table, table.astype(np.intp), axis=1)
    return image if table is None else _apply_table(image, table)


def autoaugment_view(
        image: Image.Image, rng: np.random.Generator, *,
        subpolicies: Sequence[AutoAugmentSubpolicy] = AUTOAUGMENT_IMAGENET_SUBPOLICIES,
        fill: int = 0) -> Image.Image:
    """AutoAugment view of a PIL RGB image: one sub-policy drawn uniformly, each of its two steps
    applied with its probability. Same size as the input (the model resolution); the input
    itself when no step applies.

    `fill` is the grey level of pixels that rotations and shears bring in (0, black, as in
    torchvision; the original TensorFlow code used 128).
    """
    width, height = image.size
    subpolicy = subpolicies[int(rng.integers(len(subpolicies)))]
    steps = []
    for operation, probability, magnitude_bin in subpolicy:
        # Draw both numbers whether or not the step runs, so one step's outcome never shifts the
        # random stream of the next.
        applies = rng.random() < probability
        mirrored = rng.random() < 0.5
        if not applies:
            continue
        magnitude = autoaugment_magnitude(operation, magnitude_bin, height, width)
        if mirrored and operation in SIGNED_OPERATIONS:
            magnitude = -magnitude
        steps.append((operation, magnitude))
    return apply_autoaugment_steps(image, steps, fill)


def autoaugment_imagenet(
        image: np.ndarray, rng: np.random.Generator, *,
        subpolicies: Sequence[AutoAugmentSubpolicy] = AUTOAUGMENT_IMAGENET_SUBPOLICIES,
        fill: int = 0) -> np.ndarray:
    """`autoaugment_view` on arrays: [H, W, 3] uint8 -> new [H, W, 3] uint8."""
    _check_image(image)
    view = autoaugment_view(Image.fromarray(image), rng, subpolicies=subpolicies, fill=fill)
    return np.array(view, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# SimCLR view: random resized crop, horizontal flip, colour jitter, grayscale.
# ----------------------------------------------------------------------------------------------


def random_resized_crop_box(
        rng: np.random.Generator, height: int, width: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Crop (top, left, crop_height, crop_width) covering a `scale` fraction of the area with
    aspect ratio (w/h) log-uniform in `ratio`.

    Tries 10 draws (the Inception-style sampler); if none fits, falls back to the largest centred
    crop whose aspect ratio is within `ratio`.
    """
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"crop ratio must satisfy 0 < low <= high, got {ratio}")
    area = height * width
    log_ratio_low, log_ratio_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio_low, log_ratio_high))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    image_ratio = width / height
    if image_ratio < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif image_ratio > ratio[1]:
        crop_width, crop_height = int(round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def shift_hue(image: np.ndarray, hue_shift: float) -> np.ndarray:
    """Rotate the HSV hue of a [H, W, 3] uint8 image by `hue_shift` turns, keeping saturation and
    value. Computed in float on channel planes: Pillow's uint8 HSV round trip is both slower and
    lossy (it changes pixels by up to 7 levels even at zero shift).
    """
    red, green, blue = np.moveaxis(image, -1, 0).astype(np.float32)
    value = np.maximum(np.maximum(red, green), blue)
    chroma = value - np.minimum(np.minimum(red, green), blue)
    safe_chroma = np.where(chroma > 0, chroma, np.float32(1.0))
    # Hue in sixths of a turn, [0, 6): which channel is the maximum picks the hexcone sector.
    hue = np.where(value == red, (green - blue) / safe_chroma,
                   np.where(value == green, (blue - red) / safe_chroma + 2.0,
                            (red - green) / safe_chroma + 4.0))
    hue += np.float32(6.0 * hue_shift)
    hue -= 6.0 * np.floor(hue / 6.0)
    shifted = np.empty(image.shape, np.uint8)
    for channel, sector_offset in enumerate((5.0, 3.0, 1.0)):
        position = hue + np.float32(sector_offset)
        position = np.where(position >= 6.0, position - 6.0, position)
        weight = np.clip(np.minimum(position, 4.0 - position), 0.0, 1.0)
        shifted[..., channel] = np.rint(value - chroma * weight)
    return shifted


def color_jitter(image: Image.Image, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float) -> Image.Image:
    """Brightness, contrast and saturation factors uniform in [1-s, 1+s], hue shift uniform in
    [-hue, hue] (fraction of the hue circle), applied in a random order."""
    if not 0 <= hue <= 0.5:
        raise ValueError(f"hue jitter must be in [0, 0.5], got {hue}")
    low_high = [(max(0.0, 1.0 - strength), 1.0 + strength)
                for strength in (brightness, contrast, saturation)]
    brightness_factor, contrast_factor, saturation_factor = (rng.uniform(*bounds)
                                                             for bounds in low_high)
    hue_shift = rng.uniform(-hue, hue)
    adjustments = [
        lambda view: ImageEnhance.Brightness(view).enhance(brightness_factor),
        lambda view: ImageEnhance.Contrast(view).enhance(contrast_factor),
        lambda view: ImageEnhance.Color(view).enhance(saturation_factor),
        lambda view: Image.fromarray(shift_hue(np.asarray(view), hue_shift)),
    ]
    enabled = [brightness > 0, contrast > 0, saturation > 0, hue > 0]
    for index in rng.permutation(len(adjustments)):
        if enabled[index]:
            image = adjustments[index](image)
    return image


def simclr_pil_view(image: Image.Image, rng: np.random.Generator, *,
                    crop_scale: tuple[float, float] = (0.2, 1.0),
                    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    flip_probability: float = 0.5,
                    jitter_probability: float = 0.8,
                    jitter_strength: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
                    grayscale_probability: float = 0.2) -> Image.Image:
    """SimCLR view of a PIL RGB image: random resized crop back to the input size (bilinear),
    horizontal flip, colour jitter (brightness, contrast, saturation, hue) and grayscale."""
    width, height = image.size
    top, left, crop_height, crop_width = random_resized_crop_box(rng, height, width, crop_scale,
                                                                 crop_ratio)
    # Draw the flip/jitter/grayscale decisions before any jitter factor, so the random stream of
    # a decision never depends on whether an earlier step fired.
    flips = rng.random() < flip_probability
    jitters = rng.random() < jitter_probability
    grays = rng.random() < grayscale_probability

    view = image
    box = (left, top, left + crop_width, top + crop_height)
    if box != (0, 0, width, height):
        view = view.resize((width, height), resample=Image.Resampling.BILINEAR, box=box)
    if flips:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if jitters:
        view = color_jitter(view, rng, *jitter_strength)
    if grays:
        view = view.convert("L").convert("RGB")
    return view


def simclr_view(image: np.ndarray, rng: np.random.Generator, **options) -> np.ndarray:
    """`simclr_pil_view` on arrays: [H, W, 3] uint8 -> new [H, W, 3] uint8."""
    _check_image(image)
    return np.array(simclr_pil_view(Image.fromarray(image), rng, **options), dtype=np.uint8)


def identity_pil_view(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """No augmentation: the image itself."""
    return image


# Policies work on PIL RGB images: the training pipeline hands over the image it decoded and
# copies the view straight into its batch. Each takes (image, rng, **options) and returns an
# image of the same size, possibly the input itself, never modifying it.
POLICIES: dict[str, Callable[..., Image.Image]] = {
    "none": identity_pil_view,
    "autoaugment_imagenet": autoaugment_view,
    "simclr": simclr_pil_view,
}


def _policy(policy: str) -> Callable[..., Image.Image]:
    if policy not in POLICIES:
        raise KeyError(f"unknown image augmentation policy {policy!r}; known: {sorted(POLICIES)}")
    return POLICIES[policy]


def augment_pil_image(image: Image.Image, policy: str, seed: int | Sequence[int],
                      **policy_options) -> Image.Image:
    """`augment_image` for a PIL RGB image; the result may be `image` itself (an unchanged
    view), which is never modified."""
    return _policy(policy)(image, np.random.default_rng(seed), **policy_options)


def augment_image(image: np.ndarray, policy: str, seed: int | Sequence[int],
                  **policy_options) -> np.ndarray:
    """Augmented view of a [H, W, 3] uint8 image under `policy` (a key of POLICIES).

    The output is a new [H, W, 3] uint8 array, a pure function of (image, policy, seed,
    policy_options); `seed` is anything np.random.default_rng accepts, e.g.
    [run_seed, example_index]. `policy_options` go to the policy function (e.g.
    crop_scale=(0.08, 1.0) for "simclr").
    """
    policy_function = _policy(policy)
    _check_image(image)
    view = policy_function(Image.fromarray(image), np.random.default_rng(seed), **policy_options)
    return np.array(view, dtype=np.uint8)
