"""Tests for the SSL views: image policies (AutoAugment, SimCLR, none) and EDA caption views."""

import collections
import itertools
import math
import sys
import types

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from bclip.data import image_augment, text_augment
from bclip.data.image_augment import (AUTOAUGMENT_IMAGENET_SUBPOLICIES, AUTOAUGMENT_OPERATIONS,
                                      POLICIES, augment_image, autoaugment_imagenet,
                                      autoaugment_magnitude, random_resized_crop_box)
from bclip.data.text_augment import (STOP_WORDS, TextAugmentationError, caption_words, eda,
                                     lexicon_synonyms, random_deletion, random_insertion,
                                     random_swap, synonym_replacement, wordnet_synonyms)

NO_COLOUR = dict(jitter_probability=0.0, grayscale_probability=0.0)


def textured_image(height=40, width=48, seed=0):
    """[H, W, 3] uint8: a colour ramp plus noise, so that every op visibly changes it."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:height, 0:width]
    ramp = np.stack([columns * 200 // width, rows * 200 // height, (rows + columns) % 50], -1)
    return np.clip(ramp + rng.integers(0, 50, (height, width, 3)), 0, 255).astype(np.uint8)


def ramp_image(size=64):
    """[S, S, 3] uint8 with red = 3 * column, green = 3 * row, blue = 0."""
    rows, columns = np.mgrid[0:size, 0:size]
    return np.stack([3 * columns, 3 * rows, np.zeros_like(rows)], -1).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Image policies
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policy_keeps_shape_and_dtype(policy):
    image = textured_image()
    for seed in range(12):
        view = augment_image(image, policy, [seed, 3])
        assert view.shape == (40, 48, 3)
        assert view.dtype == np.uint8


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policy_is_deterministic_per_seed(policy):
    image = textured_image()
    for seed in (0, 7, [5, 123]):
        np.testing.assert_array_equal(augment_image(image, policy, seed),
                                      augment_image(image, policy, seed))


@pytest.mark.parametrize("policy", ["autoaugment_imagenet", "simclr"])
def test_random_policies_differ_across_seeds(policy):
    image = textured_image()
    views = {augment_image(image, policy, [0, index]).tobytes() for index in range(10)}
    # A few AutoAugment sub-policies can be no-ops for a draw; most seeds must still differ.
    assert len(views) >= 6


def test_none_policy_is_an_identity_copy():
    image = textured_image()
    original = image.copy()
    view = augment_image(image, "none", 0)
    np.testing.assert_array_equal(view, image)
    view[...] = 0
    np.testing.assert_array_equal(image, original)


def test_bad_inputs_are_refused():
    with pytest.raises(KeyError, match="unknown image augmentation policy"):
        augment_image(textured_image(), "randaugment", 0)
    with pytest.raises(TypeError, match="uint8"):
        augment_image(textured_image().astype(np.float32), "simclr", 0)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        augment_image(np.zeros((8, 8), np.uint8), "autoaugment_imagenet", 0)


def test_autoaugment_imagenet_policy_has_25_valid_subpolicies():
    assert len(AUTOAUGMENT_IMAGENET_SUBPOLICIES) == 25
    used = set()
    for subpolicy in AUTOAUGMENT_IMAGENET_SUBPOLICIES:
        assert len(subpolicy) == 2
        for operation, probability, magnitude_bin in subpolicy:
            assert operation in AUTOAUGMENT_OPERATIONS
            assert 0.0 <= probability <= 1.0
            if operation in ("AutoContrast", "Equalize", "Invert"):
                assert magnitude_bin is None
            else:
                assert 0 <= magnitude_bin <= 9
            used.add(operation)
    assert used == {"Posterize", "Rotate", "Solarize", "AutoContrast", "Equalize", "Color",
                    "Contrast", "Sharpness", "ShearX", "Invert"}
    assert AUTOAUGMENT_IMAGENET_SUBPOLICIES[0] == (("Posterize", 0.4, 8), ("Rotate", 0.6, 9))
    assert AUTOAUGMENT_IMAGENET_SUBPOLICIES[16] == (("Color", 0.8, 8), ("Solarize", 0.8, 7))


def test_autoaugment_magnitude_bins():
    assert [autoaugment_magnitude("Posterize", b, 10, 10) for b in range(10)] == [
        8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert autoaugment_magnitude("Rotate", 9, 10, 10) == pytest.approx(30.0)
    assert autoaugment_magnitude("ShearX", 9, 10, 10) == pytest.approx(0.3)
    assert autoaugment_magnitude("Color", 0, 10, 10) == 0.0
    assert autoaugment_magnitude("Contrast", 9, 10, 10) == pytest.approx(0.9)
    assert autoaugment_magnitude("Solarize", 0, 10, 10) == pytest.approx(255.0)
    assert autoaugment_magnitude("Solarize", 9, 10, 10) == pytest.approx(0.0)
    assert autoaugment_magnitude("TranslateX", 9, 100, 331) == pytest.approx(150.0)
    assert autoaugment_magnitude("TranslateY", 9, 331, 100) == pytest.approx(150.0)
    assert autoaugment_magnitude("Equalize", None, 10, 10) == 0.0
    with pytest.raises(ValueError, match="needs a magnitude"):
        autoaugment_magnitude("Rotate", None, 10, 10)


def test_autoaugment_operations_compute_the_expected_pixels():
    image = textured_image()
    pil = Image.fromarray(image)

    def apply(operation, magnitude):
        return np.asarray(AUTOAUGMENT_OPERATIONS[operation](pil, magnitude, 0))

    np.testing.assert_array_equal(apply("Invert", 0.0), 255 - image)
    np.testing.assert_array_equal(apply("Posterize", 4), image & 0xF0)
    np.testing.assert_array_equal(apply("Solarize", 127.5),
                                  np.where(image >= 128, 255 - image, image))
    for operation in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Color",
                      "Brightness", "Contrast", "Sharpness"):
        np.testing.assert_array_equal(apply(operation, 0.0), image)
    # A whole-pixel translation moves columns and fills the vacated ones with the fill value.
    moved = apply("TranslateX", 5.0)
    np.testing.assert_array_equal(moved[:, :-5], image[:, 5:])
    assert (moved[:, -5:] == 0).all()
    equalized = apply("Equalize", 0.0)
    assert equalized.min() == 0 and equalized.max() == 255
    grey = apply("Color", -1.0)
    np.testing.assert_array_equal(grey[..., 0], grey[..., 1])


def test_autoaugment_applies_the_drawn_subpolicy_steps():
    image = textured_image()
    rng = np.random.default_rng(0)
    always_invert_once = [(("Invert", 1.0, None), ("Invert", 0.0, None))]
    np.testing.assert_array_equal(
        autoaugment_imagenet(image, rng, subpolicies=always_invert_once), 255 - image)
    always_invert_twice = [(("Invert", 1.0, None), ("Invert", 1.0, None))]
    np.testing.assert_array_equal(
        autoaugment_imagenet(image, rng, subpolicies=always_invert_twice), image)


def test_autoaugment_rotation_fills_corners():
    image = np.full((32, 32, 3), 200, np.uint8)
    rotate_30 = [(("Rotate", 1.0, 9), ("Invert", 0.0, None))]
    view = autoaugment_imagenet(image, np.random.default_rng(0), subpolicies=rotate_30, fill=7)
    assert view[0, 0].tolist() == [7, 7, 7]
    assert view[16, 16].tolist() == [200, 200, 200]


# The operations as Pillow's ImageOps / ImageEnhance compute them, one call per step.
PILLOW_REFERENCE = {
    "Posterize": lambda image, magnitude: ImageOps.posterize(image, int(magnitude)),
    "Solarize": lambda image, magnitude: image.point(
        [v if v < math.ceil(magnitude) else 255 - v for v in range(256)] * 3),
    "Invert": lambda image, magnitude: ImageOps.invert(image),
    "AutoContrast": lambda image, magnitude: ImageOps.autocontrast(image),
    "Equalize": lambda image, magnitude: ImageOps.equalize(image),
    "Brightness": lambda image, magnitude: ImageEnhance.Brightness(image).enhance(1 + magnitude),
    "Contrast": lambda image, magnitude: ImageEnhance.Contrast(image).enhance(1 + magnitude),
    "Color": lambda image, magnitude: ImageEnhance.Color(image).enhance(1 + magnitude),
    "Rotate": lambda image, magnitude: image.rotate(magnitude, fillcolor=(0, 0, 0)),
}


def _edge_case_images():
    rng = np.random.default_rng(1)
    return [
        textured_image(),
        rng.integers(0, 256, (21, 17, 3), dtype=np.uint8),
        np.full((9, 9, 3), 77, np.uint8),  # one value per channel: equalize/autocontrast do nothing
        (rng.integers(0, 2, (12, 12, 3)) * 200 + 20).astype(np.uint8),  # two values
        np.clip(rng.normal(120, 6, (16, 16, 3)), 0, 255).astype(np.uint8),  # narrow histogram
    ]


def test_runs_of_operations_match_pillow_applied_one_by_one():
    # Runs of per-value operations are folded into one lookup table; that must not change a pixel.
    magnitudes = {"Posterize": [4, 7], "Solarize": [28.3, 255.0], "Invert": [0.0],
                  "AutoContrast": [0.0], "Equalize": [0.0], "Brightness": [-0.6, 0.9],
                  "Contrast": [-0.9, 0.4], "Color": [0.5], "Rotate": [12.0]}
    for image in _edge_case_images():
        pil = Image.fromarray(image)
        for operations in itertools.product(PILLOW_REFERENCE, repeat=2):
            for steps in itertools.product(*([(op, m) for m in magnitudes[op]] for op in operations)):
                steps = list(steps) + [("Equalize", 0.0), ("Posterize", 6)]
                expected = pil
                for operation, magnitude in steps:
                    expected = PILLOW_REFERENCE[operation](expected, magnitude)
                view = image_augment.apply_autoaugment_steps(pil, steps)
                np.testing.assert_array_equal(np.asarray(view), np.asarray(expected), err_msg=str(steps))


# The geometric and sharpening operations of the ImageNet policy, as the reference AutoAugment calls
# Pillow for them: an x-shear through Image.transform's affine map (output (x, y) samples input
# (x + m y, y)), a rotation by m degrees counter-clockwise about the centre, both nearest-neighbour
# with black brought in; sharpness blends with Pillow's smoothed image by the factor 1 + m.
PILLOW_POLICY_REFERENCE = {
    **PILLOW_REFERENCE,
    "ShearX": lambda image, magnitude: image.transform(
        image.size, Image.Transform.AFFINE, (1, magnitude, 0, 0, 1, 0),
        resample=Image.Resampling.NEAREST, fillcolor=(0, 0, 0)),
    "Rotate": lambda image, magnitude: image.rotate(
        magnitude, resample=Image.Resampling.NEAREST, fillcolor=(0, 0, 0)),
    "Sharpness": lambda image, magnitude: ImageEnhance.Sharpness(image).enhance(1 + magnitude),
}


def test_autoaugment_imagenet_matches_pillow_applied_one_by_one():
    image = textured_image()
    applied = collections.Counter()
    for seed in range(300):
        rng = np.random.default_rng(seed)
        expected = Image.fromarray(image)
        subpolicy = AUTOAUGMENT_IMAGENET_SUBPOLICIES[int(rng.integers(25))]
        for operation, probability, magnitude_bin in subpolicy:
            applies, mirrored = rng.random() < probability, rng.random() < 0.5
            if applies:
                magnitude = autoaugment_magnitude(operation, magnitude_bin, 40, 48)
                if mirrored and operation not in ("Posterize", "Solarize", "Equalize", "AutoContrast", "Invert"):
                    magnitude = -magnitude
                expected = PILLOW_POLICY_REFERENCE[operation](expected, magnitude)
                applied[operation, magnitude > 0] += 1
        np.testing.assert_array_equal(augment_image(image, "autoaugment_imagenet", seed), np.asarray(expected))
    # The seeds reach every operation of the policy, the signed ones in both directions.
    for operation in ("ShearX", "Rotate", "Sharpness", "Color", "Contrast"):
        assert applied[operation, True] and applied[operation, False], operation
    for operation in ("Posterize", "Solarize", "AutoContrast", "Equalize", "Invert"):
        assert applied[operation, True] + applied[operation, False], operation


def test_pil_views_leave_their_input_alone_and_match_the_array_api():
    image = textured_image()
    for policy in sorted(POLICIES):
        for seed in range(8):
            pil = Image.fromarray(image)
            view = image_augment.augment_pil_image(pil, policy, seed)
            np.testing.assert_array_equal(np.asarray(pil), image)
            np.testing.assert_array_equal(np.asarray(view), augment_image(image, policy, seed))


def test_simclr_full_crop_is_image_or_its_mirror():
    image = ramp_image(32)
    options = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **NO_COLOUR)
    flipped = 0
    for seed in range(16):
        view = augment_image(image, "simclr", seed, **options)
        if np.array_equal(view, image[:, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(view, image)
    assert 0 < flipped < 16
    np.testing.assert_array_equal(
        augment_image(image, "simclr", 0, flip_probability=1.0, **options), image[:, ::-1])


@pytest.mark.parametrize("flip", [False, True])
def test_simclr_crop_is_a_resized_window_of_the_image(flip):
    size = 64
    image = ramp_image(size)
    for seed in range(6):
        top, left, crop_height, crop_width = random_resized_crop_box(
            np.random.default_rng(seed), size, size, scale=(0.2, 0.5))
        view = augment_image(image, "simclr", seed, crop_scale=(0.2, 0.5),
                             flip_probability=float(flip), **NO_COLOUR).astype(float)
        # Output pixel k samples input coordinate left + (k + 0.5) * crop_width / size - 0.5;
        # on a linear ramp bilinear resampling is exact away from the crop border.
        centres = np.arange(size) + 0.5
        expected_red = 3 * (left + centres * crop_width / size - 0.5)
        expected_green = 3 * (top + centres * crop_height / size - 0.5)
        if flip:
            expected_red = expected_red[::-1]
        inner = slice(4, size - 4)
        np.testing.assert_allclose(view[inner, inner, 0], np.broadcast_to(
            expected_red[inner], view[inner, inner, 0].shape), atol=1.5)
        np.testing.assert_allclose(view[inner, inner, 1], np.broadcast_to(
            expected_green[inner, None], view[inner, inner, 1].shape), atol=1.5)
        assert crop_height * crop_width <= 0.5 * size * size + 2 * size


def test_random_resized_crop_box_stays_inside_the_image():
    for seed in range(50):
        top, left, height, width = random_resized_crop_box(np.random.default_rng(seed), 30, 50)
        assert 0 <= top and top + height <= 30 and 0 <= left and left + width <= 50
        assert 0.2 * 1500 - 60 <= height * width <= 1500
    # A 1x100 strip fits no 3/4..4/3 crop: fall back to the centred crop of the widest ratio.
    assert random_resized_crop_box(np.random.default_rng(0), 1, 100) == (0, 49, 1, 1)


def test_simclr_grayscale_and_colour_jitter():
    image = textured_image()
    gray = augment_image(image, "simclr", 0, jitter_probability=0.0, grayscale_probability=1.0)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 1], gray[..., 2])
    geometry_only = dict(crop_scale=(1.0, 1.0), crop_ratio=(0.75, 4 / 3), flip_probability=0.0,
                         grayscale_probability=0.0)
    no_jitter = augment_image(image, "simclr", 1, jitter_probability=1.0,
                              jitter_strength=(0.0, 0.0, 0.0, 0.0), **geometry_only)
    np.testing.assert_array_equal(no_jitter, image)
    brighter_or_darker = augment_image(image, "simclr", 1, jitter_probability=1.0,
                                       jitter_strength=(0.4, 0.0, 0.0, 0.0), **geometry_only)
    ratio = brighter_or_darker[image > 100] / image[image > 100]
    assert np.ptp(ratio) < 0.02 and 0.6 - 0.01 <= ratio.mean() <= 1.4 + 0.01
    assert abs(ratio.mean() - 1.0) > 0.005


def test_hue_shift_rotates_the_colour_wheel():
    colours = np.array([[[255, 0, 0], [0, 255, 0], [40, 40, 40], [200, 100, 100]]], np.uint8)
    np.testing.assert_array_equal(image_augment.shift_hue(colours, 0.0), colours)
    np.testing.assert_array_equal(image_augment.shift_hue(colours, 1 / 3)[0, :3],
                                  [[0, 255, 0], [0, 0, 255], [40, 40, 40]])
    np.testing.assert_array_equal(image_augment.shift_hue(colours, -1 / 6)[0, 0], [255, 0, 255])
    # Half a turn gives the complementary colour with the same saturation and value.
    np.testing.assert_array_equal(image_augment.shift_hue(colours, 0.5)[0, 3], [100, 200, 200])
    image = textured_image()
    turned = image_augment.shift_hue(image, 0.1)
    np.testing.assert_array_equal(turned.max(-1), image.max(-1))
    np.testing.assert_array_equal(turned.min(-1), image.min(-1))
    assert (turned != image).any()


def test_colour_jitter_with_hue_only_keeps_a_flat_image_flat():
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    shifted = np.asarray(image_augment.color_jitter(Image.fromarray(red), np.random.default_rng(3),
                                                    0.0, 0.0, 0.0, 0.5))
    assert (shifted == shifted[0, 0]).all()
    assert shifted[0, 0].max() == 255 and shifted[0, 0].tolist() != [255, 0, 0]


# ------------------------------------------------------------------------------------------------
# EDA
# ------------------------------------------------------------------------------------------------

LEXICON = {
    "dog": ["puppy", "hound"],
    "red": ["crimson"],
    "car": ["automobile"],
    "photo": ["picture", "snapshot"],
    "a": ["one"],  # a stop word: must never be replaced nor used as an insertion source
}
CAPTION = "A photo of a red dog next to the car."
WORDS = ["a", "photo", "of", "a", "red", "dog", "next", "to", "the", "car"]


def is_subsequence(short, long):
    remaining = iter(long)
    return all(word in remaining for word in short)


def test_caption_words_normalises_like_eda():
    assert caption_words(CAPTION) == WORDS
    assert caption_words("The dog's 2 BALLS,  well-worn_café") == [
        "the", "dogs", "2", "balls", "well", "worn", "café"]


def test_synonym_replacement_replaces_only_words_with_synonyms():
    synonyms = lexicon_synonyms(LEXICON)
    replaced_counts = set()
    for seed in range(20):
        new_words = synonym_replacement(WORDS, synonyms, 2, np.random.default_rng(seed))
        assert len(new_words) == len(WORDS)
        replaced = {old for old, new in zip(WORDS, new_words) if old != new}
        for old, new in zip(WORDS, new_words):
            if old != new:
                assert old not in STOP_WORDS and new in LEXICON[old]
        # Every occurrence of a replaced word gets the same synonym.
        assert len(replaced) == 2
        replaced_counts.add(frozenset(replaced))
    assert len(replaced_counts) > 2
    # Fewer replaceable words than asked: replace those there are.
    only_dog = synonym_replacement(["the", "dog", "runs"], synonyms, 3, np.random.default_rng(0))
    assert only_dog[0] == "the" and only_dog[1] in ("puppy", "hound") and only_dog[2] == "runs"


def test_synonym_replacement_splits_multi_word_synonyms():
    synonyms = lexicon_synonyms({"sofa": ["couch", "Love-Seat"]})
    outputs = {tuple(synonym_replacement(["red", "sofa"], synonyms, 1, np.random.default_rng(s)))
               for s in range(20)}
    assert outputs == {("red", "couch"), ("red", "love", "seat")}


def test_random_insertion_adds_synonyms_of_present_words():
    synonyms = lexicon_synonyms(LEXICON)
    allowed = {"puppy", "hound", "crimson", "automobile", "picture", "snapshot"}
    for seed in range(20):
        new_words = random_insertion(WORDS, synonyms, 3, np.random.default_rng(seed))
        assert len(new_words) == len(WORDS) + 3
        assert is_subsequence(WORDS, new_words)
        added = collections.Counter(new_words) - collections.Counter(WORDS)
        assert sum(added.values()) == 3 and set(added) <= allowed
    assert random_insertion(["the", "sky"], synonyms, 2, np.random.default_rng(0)) == ["the", "sky"]


def test_random_swap_keeps_the_multiset_of_words():
    orders = set()
    for seed in range(20):
        new_words = random_swap(WORDS, 2, np.random.default_rng(seed))
        assert sorted(new_words) == sorted(WORDS)
        orders.add(tuple(new_words))
    assert len(orders) > 10
    assert random_swap(["alone"], 3, np.random.default_rng(0)) == ["alone"]


def test_random_deletion_only_removes_and_never_empties():
    for seed in range(20):
        new_words = random_deletion(WORDS, 0.3, np.random.default_rng(seed))
        assert 1 <= len(new_words) <= len(WORDS) and is_subsequence(new_words, WORDS)
        everything_deleted = random_deletion(WORDS, 1.0, np.random.default_rng(seed))
        assert len(everything_deleted) == 1 and everything_deleted[0] in WORDS
    assert random_deletion(["alone"], 1.0, np.random.default_rng(0)) == ["alone"]
    assert random_deletion(WORDS, 0.0, np.random.default_rng(0)) == WORDS


def test_eda_with_a_single_operation_enabled():
    synonyms = lexicon_synonyms(LEXICON)
    only = dict(alpha_sr=0.0, alpha_ri=0.0, alpha_rs=0.0, p_rd=0.0)
    long_caption = " ".join(["dog"] * 25)
    for seed in range(10):
        swapped = eda(CAPTION, synonyms, seed, **{**only, "alpha_rs": 0.1}).split()
        assert sorted(swapped) == sorted(WORDS) and swapped != WORDS
        deleted = eda(CAPTION, synonyms, seed, **{**only, "p_rd": 0.5}).split()
        assert is_subsequence(deleted, WORDS) and deleted
        # n = max(1, int(0.1 * 25)) = 2 insertions.
        inserted = eda(long_caption, synonyms, seed, **{**only, "alpha_ri": 0.1}).split()
        assert len(inserted) == 27 and set(inserted) - {"dog"} <= {"puppy", "hound"}
        replaced = eda(CAPTION, synonyms, seed, **{**only, "alpha_sr": 0.1}).split()
        assert len(replaced) == len(WORDS) and sum(a != b for a, b in zip(replaced, WORDS)) == 1
    assert eda(CAPTION, synonyms, 0, **only) == " ".join(WORDS)


def test_eda_draws_one_operation_per_call_and_is_deterministic():
    synonyms = lexicon_synonyms(LEXICON)
    outputs = [eda(CAPTION, synonyms, [seed, 9]) for seed in range(40)]
    assert outputs == [eda(CAPTION, synonyms, [seed, 9]) for seed in range(40)]
    assert len(set(outputs)) > 10
    kinds = set()
    for output in outputs:
        words = output.split()
        if len(words) > len(WORDS):
            kinds.add("insertion")
        elif len(words) < len(WORDS):
            kinds.add("deletion")
        elif sorted(words) == sorted(WORDS):
            kinds.add("swap")
        else:
            kinds.add("replacement")
    assert kinds == {"insertion", "deletion", "swap", "replacement"}


def test_eda_never_returns_an_empty_caption():
    synonyms = lexicon_synonyms(LEXICON)
    for caption in ("dog", "the", "a red car", CAPTION):
        for seed in range(10):
            assert eda(caption, synonyms, seed, p_rd=1.0).strip()
    with pytest.raises(ValueError, match="no words"):
        eda(" ... ", synonyms, 0)


def test_eda_failures_name_the_caption_and_seed():
    def broken_source(word):
        raise KeyError(word)

    with pytest.raises(TextAugmentationError) as raised:
        eda(CAPTION, broken_source, [4, 2], alpha_ri=0.0, alpha_rs=0.0, p_rd=0.0)
    message = str(raised.value)
    assert CAPTION in message and "[4, 2]" in message and "synonym_replacement" in message
    assert isinstance(raised.value.__cause__, KeyError)
    with pytest.raises(TextAugmentationError, match="list of strings"):
        eda(CAPTION, lambda word: "puppy", 0, alpha_sr=0.0, alpha_rs=0.0, p_rd=0.0)
    with pytest.raises(ValueError, match="p_rd"):
        eda(CAPTION, lexicon_synonyms(LEXICON), 0, p_rd=1.5)


def test_lexicon_synonyms():
    synonyms = lexicon_synonyms({"Dog": ["puppy"], "cat": ()})
    assert synonyms("dog") == ["puppy"] and synonyms("DOG") == ["puppy"]
    assert synonyms("cat") == [] and synonyms("unknown") == []
    with pytest.raises(TypeError, match="str -> list"):
        lexicon_synonyms({"dog": "puppy"})


def test_wordnet_without_nltk_gives_install_instructions(monkeypatch):
    # None in sys.modules makes `import nltk` fail, whether or not nltk is installed.
    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.setitem(sys.modules, "nltk.corpus", None)
    with pytest.raises(ImportError, match="pip install nltk"):
        wordnet_synonyms()


def test_wordnet_without_corpus_gives_download_instructions(monkeypatch):
    def missing_corpus(word):
        raise LookupError("Resource wordnet not found.")

    fake_corpus = types.ModuleType("nltk.corpus")
    fake_corpus.wordnet = types.SimpleNamespace(synsets=missing_corpus)
    fake_nltk = types.ModuleType("nltk")
    fake_nltk.corpus = fake_corpus
    monkeypatch.setitem(sys.modules, "nltk", fake_nltk)
    monkeypatch.setitem(sys.modules, "nltk.corpus", fake_corpus)
    with pytest.raises(LookupError, match=r"nltk\.downloader wordnet"):
        wordnet_synonyms()


def test_wordnet_synonyms_from_lemma_names(monkeypatch):
    synsets = {"dog": [types.SimpleNamespace(lemma_names=lambda: ["dog", "domestic_dog"]),
                       types.SimpleNamespace(lemma_names=lambda: ["frump", "Dog", "hot-dog"])]}
    fake_corpus = types.ModuleType("nltk.corpus")
    fake_corpus.wordnet = types.SimpleNamespace(synsets=lambda word: synsets.get(word, []))
    fake_nltk = types.ModuleType("nltk")
    fake_nltk.corpus = fake_corpus
    monkeypatch.setitem(sys.modules, "nltk", fake_nltk)
    monkeypatch.setitem(sys.modules, "nltk.corpus", fake_corpus)
    synonyms = wordnet_synonyms()
    assert synonyms("dog") == ["domestic dog", "frump", "hot dog"]
    assert synonyms("zebra") == []
    assert text_augment.eda("dog", synonyms, 0, alpha_ri=0.0, alpha_rs=0.0, p_rd=0.0) in (
        "domestic dog", "frump", "hot dog")
