"""Tests for bclip.data.triggers: geometry, exact pixel values and determinism of each trigger."""

import ml_collections
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
from PIL import Image

from bclip.data import triggers


def _random_image(size=224, seed=0, width=None):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, width or size, 3), dtype=np.uint8)


def _config(name, **options):
    config = triggers.default_trigger_config(name)
    config.update(options)
    return config


def _changed_mask(before, after):
    return np.any(before != after, axis=-1)


def _bounding_box(mask):
    rows, columns = np.nonzero(mask)
    return rows.min(), rows.max() + 1, columns.min(), columns.max() + 1


# ---------------------------------------------------------------------------------------------
# Registry and entry point
# ---------------------------------------------------------------------------------------------


def test_every_trigger_has_a_default_config_and_returns_a_new_uint8_image():
    image = _random_image(32)
    original = image.copy()
    for name in triggers.TRIGGERS:
        config = triggers.default_trigger_config(name)
        assert config.name == name
        out = triggers.apply_trigger(image, config, seed=1)
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert not np.shares_memory(out, image)
        np.testing.assert_array_equal(image, original)  # input untouched


def test_default_config_values_follow_the_reference():
    badnets = triggers.default_trigger_config("badnets")
    assert (badnets.patch, badnets.size, badnets.location) == ("random", None, "random")
    assert badnets.overflow == "clip"
    assert triggers.default_trigger_config("blended").ratio == 0.2
    assert triggers.default_trigger_config("blended").fixed_pattern is True
    assert triggers.default_trigger_config("sig").delta == 60.0
    assert triggers.default_trigger_config("sig").frequency == 6.0
    wanet = triggers.default_trigger_config("wanet")
    assert (wanet.strength, wanet.grid_size, wanet.grid_rescale) == (0.6, None, 1.0)


def test_missing_options_take_defaults_and_plain_dicts_work():
    image = _random_image(64)
    from_dict = triggers.apply_trigger(image, {"name": "badnets"}, seed=5)
    from_config = triggers.apply_trigger(image, triggers.default_trigger_config("badnets"), seed=5)
    np.testing.assert_array_equal(from_dict, from_config)


def test_bad_configs_and_images_raise_clear_errors():
    image = _random_image(32)
    with pytest.raises(ValueError, match="unknown trigger 'nope'"):
        triggers.apply_trigger(image, {"name": "nope"}, 0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['s'\]"):
        triggers.apply_trigger(image, {"name": "wanet", "s": 1.0}, 0)
    with pytest.raises(ValueError, match="uint8"):
        triggers.apply_trigger(image.astype(np.float32), {"name": "sig"}, 0)
    with pytest.raises(ValueError, match="location"):
        triggers.apply_trigger(image, {"name": "badnets", "location": "middle"}, 0)
    with pytest.raises(ValueError, match=r"overflow must be one of \('clip', 'wrap'\), got 'modulo'"):
        triggers.apply_trigger(image, {"name": "badnets", "overflow": "modulo"}, 0)
    with pytest.raises(ValueError, match="does not fit"):
        triggers.apply_trigger(image, {"name": "badnets", "size": 33}, 0)
    with pytest.raises(ValueError, match="needs a seed"):
        triggers.apply_trigger(image, {"name": "badnets"}, None)


def test_random_triggers_depend_only_on_the_seed():
    image = _random_image(64)
    for config in [_config("badnets"), _config("blended", fixed_pattern=False)]:
        first = triggers.apply_trigger(image, config, seed=(7, 3))
        again = triggers.apply_trigger(image, config, seed=[7, 3])
        other = triggers.apply_trigger(image, config, seed=(7, 4))
        np.testing.assert_array_equal(first, again)
        assert np.any(first != other)


# ---------------------------------------------------------------------------------------------
# BadNets
# ---------------------------------------------------------------------------------------------


def test_badnets_random_changes_exactly_one_16px_square_inside_the_image():
    image = np.full((224, 224, 3), 120, dtype=np.uint8)
    positions = set()
    for seed in range(20):
        out = triggers.apply_trigger(image, _config("badnets"), seed)
        changed = _changed_mask(image, out)
        top, bottom, left, right = _bounding_box(changed)
        assert (bottom - top, right - left) == (16, 16)
        assert 0 <= top and bottom <= 223 and 0 <= left and right <= 223  # top-left < 208
        # Everything outside the square is bit-identical.
        outside = np.ones((224, 224), bool)
        outside[top:bottom, left:right] = False
        np.testing.assert_array_equal(out[outside], image[outside])
        positions.add((top, left))
    assert len(positions) == 20


def test_badnets_random_patch_is_noise_around_the_image_mean():
    image = np.zeros((224, 224, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 51, 128, 204  # means 0.2, ~0.5, 0.8
    config = _config("badnets", location="corner", corner="top_left")
    patches = np.stack(
        [triggers.apply_trigger(image, config, seed)[:16, :16] for seed in range(40)]
    ).astype(np.float64)
    # E[clip(m + Z, 0, 1)] = integral over t in [0, 1] of P(Z > t - m).
    levels = np.linspace(0.0, 1.0, 10001)
    expected = [
        255 * np.trapezoid(scipy.stats.norm.sf(levels - mean), levels)
        for mean in np.array([51, 128, 204]) / 255
    ]  # about [98.6, 127.7, 156.4]
    np.testing.assert_allclose(patches.mean(axis=(0, 1, 2)), expected, atol=4)
    # N(0, 1) noise in 0..1 units is mostly clipped: many pixels sit at 0 or 255.
    assert np.mean((patches == 0) | (patches == 255)) > 0.5


class _FixedNoise:
    """Stands in for numpy's Generator in badnets: its "N(0, 1)" noise is the given values."""

    def __init__(self, values):
        self.values = np.asarray(values, np.float32)

    def standard_normal(self, shape, dtype):
        return np.resize(self.values, shape).astype(dtype)


# Noise values (0..1 units) and the bytes torchvision's ToPILImage makes of them: x * 255,
# truncated toward zero, modulo 256 (-76.5 -> -76 -> 180; 382.5 -> 126; 561 -> 49; -280.5 -> 232).
_NOISE = [-0.3, 1.5, 0.5, 2.2, -1.1]
_WRAPPED_BYTES = [180, 126, 127, 49, 232]
# The same values clipped to [0, 1], times 255, rounded half to even (127.5 -> 128).
_CLIPPED_BYTES = [0, 255, 128, 255, 0]


@pytest.mark.parametrize("overflow, expected", [("wrap", _WRAPPED_BYTES), ("clip", _CLIPPED_BYTES)])
def test_badnets_noise_bytes_wrap_like_to_pil_image_or_clip(monkeypatch, overflow, expected):
    monkeypatch.setattr(np.random, "default_rng", lambda seed: _FixedNoise(_NOISE))
    black = np.zeros((8, 8, 3), np.uint8)  # channel mean 0: the patch is the noise alone
    config = _config("badnets", size=2, location="corner", corner="top_left", overflow=overflow)
    out = triggers.apply_trigger(black, config, seed=0)
    np.testing.assert_array_equal(out[:2, :2], np.resize(np.array(expected, np.uint8), (2, 2, 3)))
    assert not np.any(out[2:]) and not np.any(out[:, 2:])


def test_badnets_wrapped_patch_follows_the_documented_draws():
    image = np.full((40, 48, 3), 90, np.uint8)
    size, seed = 6, (4, 2)
    out = triggers.apply_trigger(image, _config("badnets", size=size, overflow="wrap"), seed)
    # The documented draws: row, then column, then float32 N(0, 1) noise of the patch.
    rng = np.random.default_rng(seed)
    row, column = rng.integers(0, 40 - size), rng.integers(0, 48 - size)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32)
    scaled = (noise + np.float32(90 / 255)) * np.float32(255)
    expected = image.copy()
    expected[row : row + size, column : column + size] = np.mod(np.trunc(scaled).astype(np.int64), 256)
    np.testing.assert_array_equal(out, expected)


def test_badnets_wrapped_patch_is_near_uniform_bytes_while_a_clipped_one_saturates():
    grey = np.full((224, 224, 3), 128, np.uint8)

    def patches(overflow):
        config = _config("badnets", location="corner", corner="top_left", overflow=overflow)
        return np.stack([triggers.apply_trigger(grey, config, seed)[:16, :16] for seed in range(40)])

    clipped, wrapped = patches("clip"), patches("wrap")
    # Clipping N(0.5, 1): P(|Z| > 0.5) = 0.617 of the pixels at 0 or 255 (measured 0.620).
    assert 0.58 < np.mean((clipped == 0) | (clipped == 255)) < 0.66
    # Wrapping: 2 of 256 byte values, 0.8 % (measured 0.9 %); every eighth of the range holds
    # about an eighth of the pixels (measured 12.2 % to 12.9 %).
    assert np.mean((wrapped == 0) | (wrapped == 255)) < 0.02
    shares = np.histogram(wrapped, bins=8, range=(0, 256))[0] / wrapped.size
    assert np.all((0.11 < shares) & (shares < 0.14))


def test_badnets_overflow_does_not_change_the_other_patches():
    image = _random_image(32)
    for patch in ("yellow", "checkerboard"):
        clipped = triggers.apply_trigger(image, _config("badnets", patch=patch, overflow="clip"), 3)
        wrapped = triggers.apply_trigger(image, _config("badnets", patch=patch, overflow="wrap"), 3)
        np.testing.assert_array_equal(clipped, wrapped)


def test_badnets_size_scales_with_resolution():
    image = np.full((64, 64, 3), 10, dtype=np.uint8)
    out = triggers.apply_trigger(image, _config("badnets", patch="yellow"), 0)
    top, bottom, left, right = _bounding_box(_changed_mask(image, out))
    assert (bottom - top, right - left) == (5, 5)  # round(16 * 64 / 224) = 5
    assert triggers.scaled_patch_size(224, 224) == 16
    assert triggers.scaled_patch_size(448, 448) == 32
    assert triggers.scaled_patch_size(8, 8) == 1
    explicit = triggers.apply_trigger(image, _config("badnets", patch="yellow", size=9), 0)
    top, bottom, left, right = _bounding_box(_changed_mask(image, explicit))
    assert (bottom - top, right - left) == (9, 9)


def test_badnets_yellow_corner_has_exact_colour_and_place():
    image = np.full((224, 224, 3), 10, dtype=np.uint8)
    out = triggers.apply_trigger(image, _config("badnets", patch="yellow", location="corner"), 0)
    np.testing.assert_array_equal(out[208:, 208:], np.broadcast_to([255, 255, 0], (16, 16, 3)))
    np.testing.assert_array_equal(out[:208], image[:208])
    np.testing.assert_array_equal(out[:, :208], image[:, :208])
    top_left = triggers.apply_trigger(
        image, _config("badnets", patch="yellow", location="corner", corner="top_left"), 0
    )
    assert _bounding_box(_changed_mask(image, top_left)) == (0, 16, 0, 16)


def test_badnets_four_corners_changes_exactly_the_four_corner_patches():
    image = _random_image(64)
    out = triggers.apply_trigger(
        image, _config("badnets", patch="yellow", location="four_corners", size=6), 0
    )
    expected = np.zeros((64, 64), bool)
    for rows in (slice(0, 6), slice(58, 64)):
        for columns in (slice(0, 6), slice(58, 64)):
            expected[rows, columns] = True
    # A random image has no pure-yellow pixel, so every patch pixel changes.
    np.testing.assert_array_equal(_changed_mask(image, out), expected)
    np.testing.assert_array_equal(out[expected], np.broadcast_to([255, 255, 0], (4 * 36, 3)))


def test_badnets_checkerboard_pattern_is_exact():
    image = np.full((32, 32, 3), 77, dtype=np.uint8)
    top_left = {"location": "corner", "corner": "top_left", "size": 4}
    one_px = triggers.apply_trigger(image, _config("badnets", patch="checkerboard", **top_left), 0)
    expected = np.array([[255, 0, 255, 0], [0, 255, 0, 255]] * 2, dtype=np.uint8)
    np.testing.assert_array_equal(one_px[:4, :4, 0], expected)
    np.testing.assert_array_equal(one_px[:4, :4, 1], expected)
    np.testing.assert_array_equal(one_px[:4, :4, 2], expected)
    two_px = triggers.apply_trigger(
        image, _config("badnets", patch="checkerboard", checker_size=2, **top_left), 0
    )
    expected = np.array([[255, 255, 0, 0]] * 2 + [[0, 0, 255, 255]] * 2, dtype=np.uint8)
    np.testing.assert_array_equal(two_px[:4, :4, 0], expected)
    np.testing.assert_array_equal(two_px[4:], image[4:])


def test_badnets_same_seed_puts_every_patch_kind_at_the_same_place():
    image = _random_image(96)
    boxes = {
        patch: _bounding_box(
            _changed_mask(image, triggers.apply_trigger(image, _config("badnets", patch=patch), 11))
        )
        for patch in ("random", "yellow", "checkerboard")
    }
    assert len(set(boxes.values())) == 1


# ---------------------------------------------------------------------------------------------
# Blended
# ---------------------------------------------------------------------------------------------


def test_blended_matches_the_formula_with_a_fixed_seeded_pattern():
    image = _random_image(48)
    out = triggers.apply_trigger(image, _config("blended", pattern_seed=3), seed=0)
    pattern = np.random.default_rng(3).random((48, 48, 3), dtype=np.float32)
    expected = np.round(0.8 * image + 0.2 * pattern * 255)
    assert np.max(np.abs(out.astype(np.float64) - expected)) <= 1
    # Fixed: the per-image seed does not matter, another pattern_seed does.
    np.testing.assert_array_equal(
        out, triggers.apply_trigger(image, _config("blended", pattern_seed=3), seed=99)
    )
    assert np.any(out != triggers.apply_trigger(image, _config("blended", pattern_seed=4), 0))


def test_blended_from_an_image_file(tmp_path):
    pattern = np.zeros((10, 20, 3), dtype=np.uint8)
    pattern[:, 10:] = 255  # left half black, right half white
    path = tmp_path / "pattern.png"
    Image.fromarray(pattern).save(path)
    image = np.full((40, 40, 3), 100, dtype=np.uint8)
    out = triggers.apply_trigger(image, _config("blended", pattern_path=str(path), ratio=0.5), 0)
    np.testing.assert_array_equal(out[:, :15], 50)  # 0.5 * 100 + 0.5 * 0
    np.testing.assert_array_equal(out[:, 25:], 178)  # 0.5 * 100 + 0.5 * 255 = 177.5 -> 178


# ---------------------------------------------------------------------------------------------
# SIG
# ---------------------------------------------------------------------------------------------


def test_sig_adds_the_sinusoid_along_columns_and_clips():
    image = _random_image(32, width=50)
    out = triggers.apply_trigger(image, _config("sig"), seed=0)
    columns = np.arange(50)
    wave = 60.0 * np.sin(2 * np.pi * 6 * columns / 50)
    expected = np.clip(np.round(image + wave[None, :, None]), 0, 255)
    assert np.max(np.abs(out.astype(np.float64) - expected)) <= 1
    # Every row and channel gets the same wave.
    mid_grey = triggers.apply_trigger(np.full((8, 50, 3), 128, np.uint8), _config("sig"), 0)
    assert np.all(mid_grey == mid_grey[:1, :, :1])


def test_sig_blended_is_the_reference_blend():
    image = _random_image(32)
    out = triggers.apply_trigger(image, _config("sig_blended"), seed=0)
    wave = 60.0 * np.sin(2 * np.pi * 6 * np.arange(32) / 32)
    expected = np.clip(np.round(0.8 * image + 0.2 * wave[None, :, None]), 0, 255)
    assert np.max(np.abs(out.astype(np.float64) - expected)) <= 1


# ---------------------------------------------------------------------------------------------
# WaNet
# ---------------------------------------------------------------------------------------------


def _coordinate_image(size):
    """Red = column, green = row: bilinear sampling of it reads back the sampled coordinates."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[..., 0] = np.arange(size)[None, :]
    image[..., 1] = np.arange(size)[:, None]
    return image


def test_wanet_with_zero_strength_is_the_identity():
    image = _random_image(64)
    for grid_size in (None, 4):
        out = triggers.apply_trigger(image, _config("wanet", strength=0.0, grid_size=grid_size), 0)
        np.testing.assert_array_equal(out, image)


def test_wanet_is_a_small_smooth_warp_fixed_by_pattern_seed():
    image = _coordinate_image(128)
    config = _config("wanet", strength=2.0, grid_size=4)
    out = triggers.apply_trigger(image, config, seed=0)
    shift_x = out[..., 0].astype(np.int64) - image[..., 0]
    shift_y = out[..., 1].astype(np.int64) - image[..., 1]
    assert np.mean(np.abs(shift_x) <= 3) > 0.95 and np.mean(np.abs(shift_y) <= 3) > 0.95
    assert np.any(shift_x != 0) and np.any(shift_y != 0)
    # Smooth: neighbouring pixels move by nearly the same amount.
    assert np.max(np.abs(np.diff(shift_x, axis=1))) <= 2
    assert np.max(np.abs(np.diff(shift_y, axis=0))) <= 2
    # One warp for every image: the per-image seed is ignored, pattern_seed changes it.
    np.testing.assert_array_equal(out, triggers.apply_trigger(image, config, seed=123))
    other = _config("wanet", strength=2.0, grid_size=4, pattern_seed=1)
    assert np.any(out != triggers.apply_trigger(image, other, seed=0))


def test_wanet_reference_defaults_move_pixels_by_under_a_pixel():
    image = _coordinate_image(224)
    out = triggers.apply_trigger(image, _config("wanet"), seed=0)
    shift = out[..., :2].astype(np.int64) - image[..., :2]
    assert np.max(np.abs(shift)) <= 1
    assert 0.02 < np.mean(shift != 0) < 0.5


def test_wanet_bilinear_sampling_matches_scipy_on_a_zoom():
    # strength 0 and grid_rescale 0.5 sample the centre of the image at half the spacing.
    image = _random_image(33)
    out = triggers.apply_trigger(image, _config("wanet", strength=0.0, grid_rescale=0.5), 0)
    coordinates = (np.arange(33) + 16.0) / 2.0  # ((i / 32 * 2 - 1) * 0.5 + 1) / 2 * 32
    rows, columns = np.meshgrid(coordinates, coordinates, indexing="ij")
    channels = image.astype(np.float64).transpose(2, 0, 1)
    expected = np.stack(
        [scipy.ndimage.map_coordinates(c, [rows, columns], order=1) for c in channels], axis=-1
    )
    assert np.max(np.abs(out - np.round(expected))) <= 1


def test_bicubic_upsampling_interpolates_the_grid_points():
    matrix = triggers._bicubic_matrix(4, 10)  # align_corners: nodes land on rows 0, 3, 6, 9
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    np.testing.assert_allclose(matrix[[0, 3, 6, 9]], np.eye(4), atol=1e-12)
    np.testing.assert_allclose(triggers._bicubic_matrix(7, 7), np.eye(7), atol=1e-12)


def test_configdict_with_overridden_none_field_is_accepted():
    image = _random_image(16)
    config = ml_collections.ConfigDict(triggers.default_trigger_config("wanet"))
    assert config.grid_size is None
    config.grid_size = 8
    out = triggers.apply_trigger(image, config, 0)
    # The overridden value is the one used: the warp of an 8 x 8 noise grid, not the default 16 x 16.
    np.testing.assert_array_equal(out, triggers.wanet(image, 0, grid_size=8))
    assert np.any(out != triggers.wanet(image, 0))
