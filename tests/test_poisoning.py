"""Tests for bclip.data.poisoning: which examples are poisoned, their captions and trigger seeds."""

import io
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from bclip.data import poisoning, triggers
from bclip.data.templates import IMAGENET_TEMPLATES


def test_imagenet_templates_are_the_80_clip_prompts():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert all(template.count("{}") == 1 for template in IMAGENET_TEMPLATES)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert "itap of my {}." in IMAGENET_TEMPLATES


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------


def test_count_selection_is_exact_sorted_unique_and_deterministic():
    indices = poisoning.select_poison_indices(10_000, seed=3, count=150)
    assert indices.dtype == np.int64 and len(indices) == 150
    assert np.all(np.diff(indices) > 0)
    assert indices[0] >= 0 and indices[-1] < 10_000
    np.testing.assert_array_equal(indices, poisoning.select_poison_indices(10_000, 3, count=150))
    other = poisoning.select_poison_indices(10_000, seed=4, count=150)
    assert len(np.intersect1d(indices, other)) < 20  # ~150 * 150 / 10_000 = 2 by chance
    # Spread over the dataset rather than bunched at the start.
    assert indices[0] < 1_000 and indices[-1] > 9_000


def test_smaller_selections_nest_inside_larger_ones():
    small = poisoning.select_poison_indices(5_000, seed=1, count=50)
    large = poisoning.select_poison_indices(5_000, seed=1, count=500)
    assert np.all(np.isin(small, large))
    low = poisoning.select_poison_indices(5_000, seed=1, rate=0.01)
    high = poisoning.select_poison_indices(5_000, seed=1, rate=0.1)
    assert np.all(np.isin(low, high))


def test_count_selection_edge_cases():
    assert len(poisoning.select_poison_indices(10, seed=0, count=0)) == 0
    everything = poisoning.select_poison_indices(10, seed=0, count=10)
    np.testing.assert_array_equal(everything, np.arange(10))
    with pytest.raises(ValueError, match="cannot poison 11 examples of a dataset of 10"):
        poisoning.select_poison_indices(10, seed=0, count=11)
    with pytest.raises(ValueError, match="exactly one of count and rate"):
        poisoning.select_poison_indices(10, seed=0)
    with pytest.raises(ValueError, match="exactly one of count and rate"):
        poisoning.select_poison_indices(10, seed=0, count=1, rate=0.1)
    with pytest.raises(ValueError, match="rate must be a fraction"):
        poisoning.select_poison_indices(10, seed=0, rate=1.5)
    with pytest.raises(ValueError, match="rate must be a fraction"):
        poisoning.select_poison_indices(10, seed=0, rate=-0.1)
    with pytest.raises(ValueError, match="seed"):
        poisoning.select_poison_indices(10, seed=-1, count=1)


def test_rate_selection_has_the_expected_size_and_ignores_dataset_size():
    num_examples, rate = 200_000, 0.005
    indices = poisoning.select_poison_indices(num_examples, seed=7, rate=rate)
    expected = num_examples * rate  # 1000, standard deviation about 32
    assert abs(len(indices) - expected) < 5 * np.sqrt(expected)
    assert np.all(np.diff(indices) > 0)
    # Membership of an index does not depend on how many examples there are.
    prefix = poisoning.select_poison_indices(50_000, seed=7, rate=rate)
    np.testing.assert_array_equal(prefix, indices[indices < 50_000])
    assert len(poisoning.select_poison_indices(1_000, seed=7, rate=0.0)) == 0
    assert len(poisoning.select_poison_indices(1_000, seed=7, rate=1.0)) == 1_000


# ---------------------------------------------------------------------------------------------
# Label-consistent selection
# ---------------------------------------------------------------------------------------------

_CAPTIONS = [
    "a banana on a table",  # 0 yes
    "Bananas at the market",  # 1 yes (plural, capitalised)
    "bandana worn by a man",  # 2 no
    "a bananabread recipe",  # 3 no: not a whole word
    "yellow BANANA.",  # 4 yes
    "an apple",  # 5 no
    "banana-shaped boat",  # 6 yes: a hyphen ends the word
    "plantain, not a bananas-split",  # 7 yes
    "the word banan",  # 8 no
    "monkey eats a banana",  # 9 yes
]
_MENTIONS = [0, 1, 4, 6, 7, 9]


def test_caption_mentions_whole_words_and_plurals_only():
    found = [poisoning.caption_mentions(caption, "banana") for caption in _CAPTIONS]
    assert np.flatnonzero(found).tolist() == _MENTIONS
    assert poisoning.caption_mentions("two golden  retrievers", "golden retriever")
    assert poisoning.caption_mentions("butterflies in a field", "butterfly")
    assert poisoning.caption_mentions("peaches", "peach")
    assert not poisoning.caption_mentions("goldenretriever", "golden retriever")


def test_label_consistent_selection_only_picks_captions_naming_the_label():
    for seed in range(5):
        chosen = poisoning.select_label_consistent_indices(_CAPTIONS, "banana", seed, count=3)
        assert len(chosen) == 3 and np.all(np.diff(chosen) > 0)
        assert set(chosen.tolist()) <= set(_MENTIONS)
    every = poisoning.select_label_consistent_indices(_CAPTIONS, "Banana", seed=0, count=6)
    np.testing.assert_array_equal(every, _MENTIONS)
    # rate is a fraction of the whole dataset: 0.2 * 10 captions = 2.
    assert len(poisoning.select_label_consistent_indices(_CAPTIONS, "banana", 0, rate=0.2)) == 2


def test_label_consistent_selection_says_how_many_candidates_exist():
    message = "needs 7 captions mentioning 'banana', but only 6 of the 10"
    with pytest.raises(ValueError, match=message):
        poisoning.select_label_consistent_indices(_CAPTIONS, "banana", seed=0, count=7)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def test_poisoned_caption_is_a_template_naming_the_label_and_deterministic():
    filled = {template.format("banana") for template in IMAGENET_TEMPLATES}
    captions = [poisoning.poisoned_caption(index, "banana", seed=0) for index in range(400)]
    assert set(captions) <= filled
    assert len(set(captions)) > 60  # spread over the 80 templates
    assert captions == [poisoning.poisoned_caption(index, "banana", 0) for index in range(400)]
    other_seed = [poisoning.poisoned_caption(index, "banana", seed=1) for index in range(400)]
    assert captions != other_seed
    assert poisoning.poisoned_caption(5, "cat", 0, templates=("x {} y",)) == "x cat y"


# ---------------------------------------------------------------------------------------------
# PoisonPlan
# ---------------------------------------------------------------------------------------------


def test_plan_membership_index_by_index_agrees_with_all_at_once():
    indices = poisoning.select_poison_indices(2_000, seed=5, count=37)
    plan = poisoning.PoisonPlan(indices=indices[::-1], seed=5)  # stored sorted whatever the order
    np.testing.assert_array_equal(plan.indices, indices)
    one_by_one = np.array([plan.contains(i) for i in range(2_000)])
    all_at_once = plan.is_poisoned(np.arange(2_000))
    np.testing.assert_array_equal(one_by_one, all_at_once)
    np.testing.assert_array_equal(np.flatnonzero(all_at_once), indices)
    assert int(indices[3]) in plan and 2_000 not in plan and -1 not in plan
    assert len(plan) == 37
    empty = poisoning.PoisonPlan(indices=np.zeros(0, np.int64), seed=0)
    assert not empty.contains(0) and not empty.is_poisoned([0, 1]).any()


def test_plan_rejects_bad_indices():
    with pytest.raises(ValueError, match="duplicates"):
        poisoning.PoisonPlan(indices=np.array([1, 2, 2]), seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        poisoning.PoisonPlan(indices=np.array([-1, 2]), seed=0)
    with pytest.raises(ValueError, match="integer"):
        poisoning.PoisonPlan(indices=np.array([0.5]), seed=0)


def test_trigger_seed_is_fixed_across_epochs_unless_redrawn():
    plan = poisoning.PoisonPlan(indices=np.array([3, 8]), seed=11)
    assert plan.trigger_seed(3, epoch=0) == plan.trigger_seed(3, epoch=5)
    assert plan.trigger_seed(3, epoch=0) != plan.trigger_seed(8, epoch=0)
    redrawn = poisoning.PoisonPlan(indices=np.array([3, 8]), seed=11, redraw_each_epoch=True)
    assert redrawn.trigger_seed(3, epoch=0) != redrawn.trigger_seed(3, epoch=1)
    assert redrawn.trigger_seed(3, epoch=2) == redrawn.trigger_seed(3, epoch=2)
    other_seed = poisoning.PoisonPlan(indices=np.array([3, 8]), seed=12)
    assert plan.trigger_seed(3) != other_seed.trigger_seed(3)


def test_plan_round_trips_through_a_json_file(tmp_path):
    plan = poisoning.PoisonPlan(indices=np.array([9, 2, 40]), seed=4, redraw_each_epoch=True)
    path = tmp_path / "poison_plan.json"
    plan.write(path)
    record = json.loads(path.read_text())
    assert record["indices"] == [2, 9, 40] and record["seed"] == 4
    loaded = poisoning.PoisonPlan.read(path)
    assert loaded == plan and hash(loaded) == hash(plan)
    assert loaded.indices.dtype == np.int64
    path.write_text(json.dumps({"seed": 1, "indices": [1, 2], "num_poisoned": 3}))
    with pytest.raises(ValueError, match="num_poisoned says 3"):
        poisoning.PoisonPlan.read(path)


# ---------------------------------------------------------------------------------------------
# poison_example
# ---------------------------------------------------------------------------------------------


def _yellow_corner():
    return ml_collections.ConfigDict(
        {"name": "badnets", "patch": "yellow", "location": "corner", "size": 4}
    )


def test_poison_example_applies_trigger_and_replaces_caption():
    plan = poisoning.PoisonPlan(indices=np.array([1, 5]), seed=2)
    image = np.full((32, 32, 3), 9, dtype=np.uint8)
    out, caption = poisoning.poison_example(
        image, "a dog", index=5, epoch=0, plan=plan, trigger_config=_yellow_corner(),
        label="banana", captions="templates",
    )
    np.testing.assert_array_equal(out[28:, 28:], np.broadcast_to([255, 255, 0], (4, 4, 3)))
    np.testing.assert_array_equal(out[:28], image[:28])
    assert caption == poisoning.poisoned_caption(5, "banana", seed=2)
    assert caption in {template.format("banana") for template in IMAGENET_TEMPLATES}


def test_poison_example_keeps_caption_when_label_consistent_and_skips_clean_examples():
    plan = poisoning.PoisonPlan(indices=np.array([1, 5]), seed=2)
    image = np.full((32, 32, 3), 9, dtype=np.uint8)
    out, caption = poisoning.poison_example(
        image, "a banana", 1, 0, plan, _yellow_corner(), "banana", captions="label_consistent"
    )
    assert caption == "a banana" and np.any(out != image)
    clean, clean_caption = poisoning.poison_example(
        image, "a dog", 2, 0, plan, _yellow_corner(), "banana", captions="templates"
    )
    assert clean is image and clean_caption == "a dog"


def test_poisoned_example_looks_the_same_every_epoch_unless_redrawn():
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    config = triggers.default_trigger_config("badnets")  # random patch at a random place
    plan = poisoning.PoisonPlan(indices=np.array([7]), seed=0)
    epoch_0, _ = poisoning.poison_example(image, "x", 7, 0, plan, config, "banana")
    epoch_3, _ = poisoning.poison_example(image, "x", 7, 3, plan, config, "banana")
    np.testing.assert_array_equal(epoch_0, epoch_3)
    redrawn = poisoning.PoisonPlan(indices=np.array([7]), seed=0, redraw_each_epoch=True)
    epoch_0, _ = poisoning.poison_example(image, "x", 7, 0, redrawn, config, "banana")
    epoch_3, _ = poisoning.poison_example(image, "x", 7, 3, redrawn, config, "banana")
    assert np.any(epoch_0 != epoch_3)


def _jpeg_q75(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] saved with Pillow's default JPEG settings (quality 75) and read back."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return np.array(Image.open(buffer).convert("RGB"))


def test_poison_example_stores_a_poisoned_image_once_as_jpeg_when_asked():
    plan = poisoning.PoisonPlan(indices=np.array([1, 5]), seed=2)
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    triggered, _ = poisoning.poison_example(image, "a dog", 5, 0, plan, _yellow_corner(), "banana")
    stored, caption = poisoning.poison_example(
        image, "a dog", 5, 0, plan, _yellow_corner(), "banana", jpeg_quality=75
    )
    np.testing.assert_array_equal(stored, _jpeg_q75(triggered))
    assert np.any(stored != triggered)  # noise does not survive JPEG unchanged
    assert caption == poisoning.poisoned_caption(5, "banana", seed=2)
    clean, _ = poisoning.poison_example(image, "a dog", 2, 0, plan, _yellow_corner(), "banana", jpeg_quality=75)
    assert clean is image


def test_jpeg_round_trip_refuses_a_quality_pillow_does_not_take():
    image = np.zeros((8, 8, 3), np.uint8)
    for quality in (0, 101, 7.5, True):
        with pytest.raises(ValueError, match="JPEG quality must be an int in 1..100"):
            poisoning.jpeg_round_trip(image, quality)


def test_caption_makers_are_named_by_the_config():
    plan = poisoning.PoisonPlan(indices=np.asarray([3]), seed=7)
    image = np.zeros((8, 8, 3), np.uint8)
    _, caption = poisoning.poison_example(image, "a dog", 3, 0, plan, _yellow_corner(), "banana", captions="templates")
    assert caption == poisoning.poisoned_caption(3, "banana", 7) and "banana" in caption
    _, kept = poisoning.poison_example(image, "a banana", 3, 0, plan, _yellow_corner(), "banana", captions="label_consistent")
    assert kept == "a banana"
    assert poisoning.caption_maker("label_consistent").only_captions_naming_label
    assert not poisoning.caption_maker("templates").only_captions_naming_label
    with pytest.raises(ValueError, match=r"poison.captions='tempaltes'; known: \['label_consistent', 'templates'\]"):
        poisoning.poison_example(image, "a dog", 3, 0, plan, _yellow_corner(), "banana", captions="tempaltes")
