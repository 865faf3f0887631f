"""Backdoor triggers applied on the fly to uint8 images, deterministic in a seed.

Each trigger is one function `trigger(image, seed, **options) -> image` listed in `TRIGGERS`; its
keyword-only defaults are its config defaults (`default_trigger_config`). Triggers run per example
inside Grain worker processes, so this module uses numpy and scipy (no jax), and what does not
depend on the image (fixed noise, sinusoids, warp fields) is computed once per shape and cached.
"""

import functools
import inspect
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np
import scipy.sparse
from PIL import Image

# The reference triggers are specified at 224 x 224; sizes given "at 224 px" scale from this.
REFERENCE_RESOLUTION = 224

Seed = int | Sequence[int]

_CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Rounds float pixel values (0..255 scale) to the nearest integer and clips to uint8."""
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return values.astype(np.uint8)


def _to_uint8_wrapped(values: np.ndarray) -> np.ndarray:
    """float pixel values (0..255 scale) to uint8 as torch's `x.byte()` (ToPILImage) does:
    truncated toward zero, then taken modulo 256, so 382.5 -> 126 and -76.5 -> 180."""
    return np.mod(np.trunc(values).astype(np.int64), 256).astype(np.uint8)


def _read_only(array: np.ndarray) -> np.ndarray:
    # Cached arrays are shared by every call; freezing them turns accidental mutation into an error.
    array.setflags(write=False)
    return array


# ---------------------------------------------------------------------------------------------
# BadNets: a small square patch
# ---------------------------------------------------------------------------------------------


def scaled_patch_size(height: int, width: int, size_at_224: int = 16) -> int:
    """Patch side for an image of [height, width]: `size_at_224` scaled with the shorter side.

    Rounds half up (round(16 * 64 / 224) = 5) and is at least 1 pixel.
    """
    side = min(height, width)
    return max(1, (2 * size_at_224 * side + REFERENCE_RESOLUTION) // (2 * REFERENCE_RESOLUTION))


@functools.lru_cache(maxsize=64)
def _checkerboard(size: int, checker_size: int) -> np.ndarray:
    """uint8 [size, size, 3] black/white squares of `checker_size` px, white at the top-left."""
    cells = np.arange(size) // checker_size
    white = (cells[:, None] + cells[None, :]) % 2 == 0
    patch = np.where(white[..., None], np.uint8(255), np.uint8(0))
    return _read_only(np.broadcast_to(patch, (size, size, 3)).copy())


_YELLOW = np.array([255, 255, 0], dtype=np.uint8)


@functools.lru_cache(maxsize=16)
def _image_patch(path: str, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the image file at `path`, resized (bilinear) if it is not size x size."""
    if not path:
        raise ValueError("badnets patch='image' needs patch_path, the image file to paste")
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (FileNotFoundError, OSError) as error:
        raise ValueError(f"badnets patch_path {path!r} cannot be read as an image: {error}") from None
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return _read_only(np.asarray(image, dtype=np.uint8).copy())

_OVERFLOWS = ("clip", "wrap")


def patch_offsets(
    height: int, width: int, size: int, location: str, corner: str, rng: np.random.Generator | None
) -> list[tuple[int, int]]:
    """Top-left (row, column) of every copy of a `size` px patch that `badnets` pastes at `location`
    (rng: draws the row, then the column, for location="random")."""
    bottom, right = height - size, width - size
    corner_offsets = {
        "top_left": (0, 0),
        "top_right": (0, right),
        "bottom_left": (bottom, 0),
        "bottom_right": (bottom, right),
    }
    if location == "random":
        # Exclusive upper bound as in the reference ([0, 208) at 224): the patch never touches the
        # last row/column. An image exactly the patch size has only offset 0.
        row = int(rng.integers(0, bottom)) if bottom > 0 else 0
        column = int(rng.integers(0, right)) if right > 0 else 0
        return [(row, column)]
    if location == "corner":
        if corner not in corner_offsets:
            raise ValueError(f"badnets corner must be one of {_CORNERS}, got {corner!r}")
        return [corner_offsets[corner]]
    if location == "four_corners":
        return [corner_offsets[name] for name in _CORNERS]
    raise ValueError(
        f"badnets location must be 'random', 'corner' or 'four_corners', got {location!r}"
    )


def badnets(
    image: np.ndarray,
    seed: Seed,
    *,
    patch: str = "random",
    size: int | None = None,
    location: str = "random",
    corner: str = "bottom_right",
    checker_size: int = 1,
    overflow: str = "clip",
    patch_path: str = "",
) -> np.ndarray:
    """Pastes a square patch (BadNets). image: uint8 [H, W, 3] -> uint8 [H, W, 3].

    patch: "random" (N(0, 1) noise added to the image's per-channel mean, in 0..1 units; redrawn
    per seed, as in the reference), "yellow" (R = G = 255, B = 0) or "checkerboard"
    (black/white squares of `checker_size` px) or "image" (the image file at `patch_path`, e.g. a
    patch written by `python -m bclip.optimise_trigger`, resized bilinearly to size x size when
    its own size differs). size: side in px; None scales 16 px at 224 px with
    the resolution. location: "random" (top-left uniform in [0, H - size) per seed), "corner"
    (the `corner` one: top_left, top_right, bottom_left, bottom_right) or "four_corners" (all four,
    the same patch in each). Pixels outside the patch are left bit-identical.

    overflow (patch="random" only; the other patches are bytes already): how noise outside
    [0, 1] becomes bytes. "clip" clips to [0, 1] and rounds, so about 62 % of the patch sits at 0
    or 255 at a mid-grey mean. "wrap" is what the reference code did by handing the unclipped
    values to torchvision's ToPILImage: x * 255 truncated toward zero, modulo 256 (1.5 -> 126,
    -0.3 -> 180), which makes the patch close to uniform random bytes.

    Randomness, from numpy.random.default_rng(seed): with location="random" the row, then the
    column (`integers`); then, for patch="random", `standard_normal((size, size, 3), float32)`.
    """
    if overflow not in _OVERFLOWS:
        raise ValueError(f"badnets overflow must be one of {_OVERFLOWS}, got {overflow!r}")
    if patch_path and patch != "image":
        raise ValueError(f"badnets patch_path={patch_path!r} is read only with patch='image', got patch={patch!r}")
    height, width, _ = image.shape
    size = scaled_patch_size(height, width) if size is None else int(size)
    if not 1 <= size <= min(height, width):
        raise ValueError(f"badnets patch size {size} does not fit a {height}x{width} image")
    needs_rng = location == "random" or patch == "random"
    rng = np.random.default_rng(seed) if needs_rng else None
    # Location is drawn before the noise so a seed puts every patch kind at the same place.
    offsets = patch_offsets(height, width, size, location, corner, rng)

    if patch == "random":
        pixels = image.reshape(-1, 3).astype(np.float32)
        # As a matrix-vector product: numpy's strided per-channel mean is ~15x slower here.
        channel_mean = np.ones(len(pixels), np.float32) @ pixels / (255.0 * len(pixels))
        noise = rng.standard_normal((size, size, 3), dtype=np.float32)
        if overflow == "wrap":
            pixels = _to_uint8_wrapped((noise + channel_mean) * np.float32(255.0))
        else:
            pixels = _to_uint8(np.clip(noise + channel_mean, 0.0, 1.0) * 255.0)
    elif patch == "yellow":
        pixels = _YELLOW
    elif patch == "checkerboard":
        if checker_size < 1:
            raise ValueError(f"checker_size must be >= 1, got {checker_size}")
        pixels = _checkerboard(size, int(checker_size))
    elif patch == "image":
        pixels = _image_patch(patch_path, size)
    else:
        raise ValueError(
            f"badnets patch must be 'random', 'yellow', 'checkerboard' or 'image', got {patch!r}"
        )

    out = image.copy()
    for row, column in offsets:
        out[row : row + size, column : column + size] = pixels
    return out


# ---------------------------------------------------------------------------------------------
# Blended: mix the whole image with a pattern
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _uniform_noise(height: int, width: int, pattern_seed: int) -> np.ndarray:
    """float32 [H, W, 3] U[0, 1) noise, fixed by `pattern_seed`."""
    rng = np.random.default_rng(pattern_seed)
    return _read_only(rng.random((height, width, 3), dtype=np.float32))


@functools.lru_cache(maxsize=16)
def _image_pattern(path: str, height: int, width: int) -> np.ndarray:
    """float32 [H, W, 3] in [0, 1]: the image at `path` resized (bilinear) to H x W."""
    with Image.open(path) as pattern:
        resized = pattern.convert("RGB").resize((width, height), Image.BILINEAR)
    return _read_only(np.asarray(resized, dtype=np.float32) / 255.0)


@functools.lru_cache(maxsize=16)
def _scaled_blend_term(
    height: int, width: int, ratio: float, pattern_seed: int, pattern_path: str | None
) -> np.ndarray:
    """float32 [H, W, 3]: ratio * 255 * pattern, the image-independent half of the blend."""
    if pattern_path is None:
        pattern = _uniform_noise(height, width, pattern_seed)
    else:
        pattern = _image_pattern(pattern_path, height, width)
    return _read_only(np.float32(ratio * 255.0) * pattern)


def blended(
    image: np.ndarray,
    seed: Seed,
    *,
    ratio: float = 0.2,
    pattern_path: str | None = None,
    fixed_pattern: bool = True,
    pattern_seed: int = 0,
) -> np.ndarray:
    """Blended attack: (1 - ratio) * image + ratio * pattern. uint8 [H, W, 3] -> uint8 [H, W, 3].

    The pattern is the image at `pattern_path` resized to H x W or, when that is None, U[0, 1)
    noise. The Blended attack (Chen et al. 2017) uses ONE pattern for every image, so by default
    the noise is fixed by `pattern_seed`; `fixed_pattern=False` redraws it from `seed` on every
    call, which is what the reference code did (unseeded).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"blended ratio must be in [0, 1], got {ratio}")
    height, width, _ = image.shape
    if pattern_path is None and not fixed_pattern:
        noise = np.random.default_rng(seed).random((height, width, 3), dtype=np.float32)
        pattern_term = np.float32(ratio * 255.0) * noise
    else:
        pattern_term = _scaled_blend_term(height, width, float(ratio), pattern_seed, pattern_path)
    mixed = image.astype(np.float32)
    mixed *= np.float32(1.0 - ratio)
    mixed += pattern_term
    return _to_uint8(mixed)


# ---------------------------------------------------------------------------------------------
# SIG: a horizontal sinusoid
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _sinusoid(width: int, delta: float, frequency: float) -> np.ndarray:
    """float32 [1, W, 1]: delta * sin(2 pi f j / W) for column j, in 0..255 pixel units."""
    columns = np.arange(width, dtype=np.float64)
    wave = delta * np.sin(2.0 * np.pi * frequency * columns / width)
    return _read_only(wave.astype(np.float32)[None, :, None])


def sig(
    image: np.ndarray, seed: Seed, *, delta: float = 60.0, frequency: float = 6.0
) -> np.ndarray:
    """SIG (Barni et al. 2019): adds delta * sin(2 pi f j / W) to column j, then clips.

    image: uint8 [H, W, 3] -> uint8 [H, W, 3]. delta is in 0..255 pixel units (60 = 60/255).
    """
    del seed  # The signal is the same for every image.
    _, width, _ = image.shape
    shifted = image.astype(np.float32)
    shifted += _sinusoid(width, float(delta), float(frequency))
    return _to_uint8(shifted)


def sig_blended(
    image: np.ndarray,
    seed: Seed,
    *,
    ratio: float = 0.2,
    delta: float = 60.0,
    frequency: float = 6.0,
) -> np.ndarray:
    """The reference code's SIG: (1 - ratio) * image + ratio * sinusoid, clipped.

    image: uint8 [H, W, 3] -> uint8 [H, W, 3]. Same sinusoid as `sig`; blending at 0.2 mostly
    darkens the image and leaves a wave of only +-0.2 * delta.
    """
    del seed
    _, width, _ = image.shape
    mixed = image.astype(np.float32)
    mixed *= np.float32(1.0 - ratio)
    mixed += np.float32(ratio) * _sinusoid(width, float(delta), float(frequency))
    return _to_uint8(mixed)


# ---------------------------------------------------------------------------------------------
# WaNet: a fixed smooth warp
# ---------------------------------------------------------------------------------------------


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """[N, 4] cubic-convolution weights for taps at offsets -1, 0, 1, 2 from floor(src)."""
    distances = np.stack([t + 1.0, t, 1.0 - t, 2.0 - t], axis=-1)
    near = distances <= 1.0
    weights_near = ((a + 2.0) * distances - (a + 3.0)) * distances**2 + 1.0
    weights_far = ((a * distances - 5.0 * a) * distances + 8.0 * a) * distances - 4.0 * a
    return np.where(near, weights_near, weights_far)


def _bicubic_matrix(source_size: int, target_size: int) -> np.ndarray:
    """float64 [target, source]: 1-D bicubic upsampling, align_corners=True, edges replicated."""
    if target_size == 1:
        positions = np.zeros(1)
    else:
        positions = np.arange(target_size) * ((source_size - 1) / (target_size - 1))
    base = np.floor(positions).astype(np.int64)
    weights = _cubic_weights(positions - base)
    taps = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, source_size - 1)
    matrix = np.zeros((target_size, source_size))
    np.add.at(matrix, (np.repeat(np.arange(target_size), 4), taps.ravel()), weights.ravel())
    return matrix


@functools.lru_cache(maxsize=16)
def _warp_matrix(
    height: int, width: int, strength: float, grid_size: int, grid_rescale: float, pattern_seed: int
) -> scipy.sparse.csr_matrix:
    """The WaNet warp of an H x W image as a sparse [H*W, H*W] bilinear-sampling matrix.

    Row p holds the (at most 4) bilinear weights of output pixel p over the input pixels, so
    warped [H*W, 3] = matrix @ image [H*W, 3].
    """
    rng = np.random.default_rng(pattern_seed)
    # Channel 0 moves columns (x), channel 1 moves rows (y), as in grid_sample's grid.
    noise = rng.uniform(-1.0, 1.0, size=(2, grid_size, grid_size))
    noise /= np.mean(np.abs(noise))
    rows_up, columns_up = _bicubic_matrix(grid_size, height), _bicubic_matrix(grid_size, width)
    displacement = rows_up @ noise @ columns_up.T  # [2, H, W]

    grid_x = np.linspace(-1.0, 1.0, width)[None, :] + strength * displacement[0] / height
    grid_y = np.linspace(-1.0, 1.0, height)[:, None] + strength * displacement[1] / height
    grid_x = np.clip(grid_x * grid_rescale, -1.0, 1.0)
    grid_y = np.clip(grid_y * grid_rescale, -1.0, 1.0)

    # align_corners=True: -1 and +1 are the centres of the first and last pixels.
    x = (grid_x + 1.0) * 0.5 * (width - 1)
    y = (grid_y + 1.0) * 0.5 * (height - 1)
    x0 = np.clip(np.floor(x).astype(np.int64), 0, width - 1)
    y0 = np.clip(np.floor(y).astype(np.int64), 0, height - 1)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    wx, wy = x - x0, y - y0
    columns = np.stack([y0 * width + x0, y0 * width + x1, y1 * width + x0, y1 * width + x1])
    weights = np.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx])
    num_pixels = height * width
    rows = np.broadcast_to(np.arange(num_pixels), (4, num_pixels))
    # A sparse product gathers and weighs all taps in one C loop (~4x faster than numpy takes).
    matrix = scipy.sparse.csr_matrix(
        (weights.reshape(-1).astype(np.float32), (rows.reshape(-1), columns.reshape(-1))),
        shape=(num_pixels, num_pixels),
    )
    matrix.sum_duplicates()
    return matrix


def wanet(
    image: np.ndarray,
    seed: Seed,
    *,
    strength: float = 0.6,
    grid_size: int | None = None,
    grid_rescale: float = 1.0,
    pattern_seed: int = 0,
) -> np.ndarray:
    """WaNet (Nguyen & Tran 2021): warps the image with one fixed smooth field. uint8 [H, W, 3].

    grid = identity + strength * upsample(noise) / H in grid_sample's [-1, 1] coordinates, where
    noise ~ U(-1, 1) on a grid_size x grid_size grid is divided by its mean |.| and upsampled
    bicubically; the grid is multiplied by grid_rescale, clipped to [-1, 1] and sampled
    bilinearly (align_corners=True). strength is the paper's s (reference 0.6, CleanCLIP 1);
    grid_size is its k (None: full resolution, k = H, as the reference's k = 224 at 224 px). The
    field depends only on pattern_seed, never on `seed`: WaNet uses one warp for all images.
    """
    del seed
    height, width, _ = image.shape
    grid_size = height if grid_size is None else int(grid_size)
    if grid_size < 2:
        raise ValueError(f"wanet grid_size must be >= 2, got {grid_size}")
    warp = _warp_matrix(
        height, width, float(strength), grid_size, float(grid_rescale), int(pattern_seed)
    )
    warped = warp @ image.reshape(-1, 3).astype(np.float32)
    return _to_uint8(warped).reshape(height, width, 3)


# ---------------------------------------------------------------------------------------------
# Registry and entry point
# ---------------------------------------------------------------------------------------------

TRIGGERS = {
    "badnets": badnets,
    "blended": blended,
    "sig": sig,
    "sig_blended": sig_blended,
    "wanet": wanet,
}


def _get_trigger(name: str):
    try:
        return TRIGGERS[name]
    except KeyError:
        raise ValueError(f"unknown trigger {name!r}; known triggers: {sorted(TRIGGERS)}") from None


@functools.lru_cache(maxsize=None)
def _trigger_defaults(name: str) -> dict:
    """The keyword-only parameters of trigger `name` with their defaults."""
    parameters = inspect.signature(_get_trigger(name)).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def default_trigger_config(name: str) -> ml_collections.ConfigDict:
    """ConfigDict with `name` and every option of trigger `name` at its default value."""
    return ml_collections.ConfigDict({"name": name, **_trigger_defaults(name)})


def apply_trigger(image: np.ndarray, trigger_config: Mapping, seed: Seed) -> np.ndarray:
    """Applies the trigger `trigger_config.name`. image: uint8 [H, W, 3] -> new uint8 [H, W, 3].

    trigger_config holds `name` plus any of that trigger's options (missing ones take the
    defaults of `default_trigger_config`). seed (an int or a sequence of ints, e.g.
    (seed, index)) determines all per-image randomness. The input is never modified.
    """
    if seed is None:
        # numpy would silently draw fresh OS entropy: the unseeded triggers of the reference.
        raise ValueError("apply_trigger needs a seed (an int or a sequence of ints), got None")
    name = trigger_config["name"]
    trigger = _get_trigger(name)
    options = {key: value for key, value in trigger_config.items() if key != "name"}
    unknown = options.keys() - _trigger_defaults(name).keys()
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for trigger {name!r}; "
            f"it takes {sorted(_trigger_defaults(name))}"
        )
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    return trigger(image, seed, **options)


__all__ = [
    "TRIGGERS",
    "apply_trigger",
    "default_trigger_config",
    "scaled_patch_size",
    "patch_offsets",
    "badnets",
    "blended",
    "sig",
    "sig_blended",
    "wanet",
]
