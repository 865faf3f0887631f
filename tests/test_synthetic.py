"""Tests for bclip.data.synthetic: determinism, classes and captions, lexicon, on-disk world."""

import csv
import dataclasses
import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from bclip.data.synthetic import __main__ as command
from bclip.data.synthetic import captions, scenes, shapes, writer
from bclip.data.templates import IMAGENET_TEMPLATES
from bclip.data.tokenizer import WordTokenizer

SMALL_WORLD = dict(image_size=32, num_train=30, num_test=24, num_selection=12, seed=3)


def _words(text):
    return re.findall(r"\w+|[^\w\s]+", text)


def test_examples_are_a_pure_function_of_seed_split_index():
    first = writer.example(0, "train", 5, image_size=32)
    again = writer.example(0, "train", 5, image_size=32)
    assert first.image.dtype == np.uint8 and first.image.shape == (32, 32, 3)
    assert first.image.flags["C_CONTIGUOUS"]
    assert first.image.tobytes() == again.image.tobytes()
    assert (first.caption, first.label) == (again.caption, again.label)
    assert not np.array_equal(first.image, writer.example(0, "train", 6, image_size=32).image)
    assert not np.array_equal(first.image, writer.example(1, "train", 5, image_size=32).image)
    assert not np.array_equal(first.image, writer.example(0, "test", 5, image_size=32).image)
    world = writer.SyntheticWorld(seed=0, image_size=32)
    np.testing.assert_array_equal(world.image("train", 5), first.image)
    assert (world.caption("train", 5), world.label("train", 5)) == (first.caption, first.label)


def test_one_scene_renders_at_every_size():
    small, large = (writer.example(2, "train", 11, image_size=size) for size in (32, 224))
    assert large.image.shape == (224, 224, 3)
    assert (small.caption, small.label) == (large.caption, large.label)
    # Downsampling the large rendering gives roughly the small one.
    pooled = large.image.astype(np.float32).reshape(32, 7, 32, 7, 3).mean((1, 3))
    assert np.abs(pooled - small.image).mean() < 20


def test_classes_include_the_target_banana():
    names = shapes.class_names()
    assert len(names) == shapes.NUM_CLASSES >= 20
    assert len(set(names)) == len(names)
    assert names[shapes.TARGET_LABEL] == "banana" == shapes.TARGET_CLASS_NAME
    assert shapes.class_names(10)[shapes.TARGET_LABEL] == "banana"
    with pytest.raises(ValueError):
        shapes.class_names(shapes.TARGET_LABEL)  # too few classes to hold the target
    templates = shapes.prompt_templates()
    assert len(templates) >= 5 and all(template.count("{}") == 1 for template in templates)


def test_captions_name_their_class_and_no_other():
    names = shapes.class_names()
    seen_labels = set()
    for index in range(400):
        scene, caption = captions.scene_and_caption(0, "train", index)
        seen_labels.add(scene.label)
        nouns = shapes.CLASSES[scene.label].nouns
        assert any(noun in caption for noun in nouns), caption
        other_names = set(names) - {names[scene.label]}
        assert not other_names & set(_words(caption)), caption
    assert seen_labels == set(range(len(names)))


def test_evaluation_splits_are_balanced_and_disjoint_from_train():
    labels = [captions.scene_and_caption(0, "test", index)[0].label for index in range(48)]
    assert labels == [index % shapes.NUM_CLASSES for index in range(48)]

    def digests(split):
        images = (writer.example(0, split, index, image_size=32).image for index in range(150))
        return {hashlib.sha1(image.tobytes()).digest() for image in images}

    train, test, selection = digests("train"), digests("test"), digests("selection")
    assert len(train) == len(test) == len(selection) == 150
    assert not (train & test) and not (train & selection) and not (test & selection)


@pytest.mark.parametrize("label", range(shapes.NUM_CLASSES))
def test_every_class_draws_a_visible_object(label):
    for index in range(label, 4 * shapes.NUM_CLASSES, shapes.NUM_CLASSES):
        scene, _ = captions.scene_and_caption(0, "test", index)
        assert scene.label == label
        scene = dataclasses.replace(scene, distractor=None, noise_std=0.0)
        background = dataclasses.replace(scene, radius=1e-6)  # an object too small to cover a pixel
        changed = np.any(scenes.render_scene(scene, 64) != scenes.render_scene(background, 64), axis=-1)
        # Objects span 0.15-0.36 of the image side.
        assert 0.015 < changed.mean() < 0.6, (shapes.CLASSES[label].name, changed.mean())


def test_lexicon_covers_captions_prompts_and_synonyms():
    lexicon = captions.lexicon()
    vocabulary = set(lexicon.words)
    assert list(lexicon.words) == sorted(vocabulary)
    for index in range(300):
        assert set(_words(captions.scene_and_caption(0, "train", index)[1])) <= vocabulary
    for template in shapes.prompt_templates():
        for name in shapes.class_names():
            assert set(_words(template.format(name))) <= vocabulary
    # Poisoned captions are CLIP's ImageNet prompts filled with the target's name.
    for template in IMAGENET_TEMPLATES:
        assert set(_words(template.format("banana"))) <= vocabulary, template
    assert "tiny" in captions.synonyms("small") and "small" in captions.synonyms("Tiny")
    assert captions.synonyms("banana") == []
    for word, others in lexicon.synonyms.items():
        assert word in vocabulary and set(others) <= vocabulary and word not in others


def test_write_world_formats(tmp_path):
    out_dir = writer.write_world(tmp_path / "world", **SMALL_WORLD)
    with open(out_dir / "train" / "train.csv", newline="") as csv_file:
        train_rows = list(csv.reader(csv_file))
    assert train_rows[0] == ["image", "caption"]
    assert len(train_rows) == 1 + SMALL_WORLD["num_train"]
    for index, (relative_path, caption) in enumerate(train_rows[1:]):
        assert relative_path == f"images/{index:08d}.jpg"
        expected = writer.example(3, "train", index, image_size=32)
        assert caption == expected.caption
        with Image.open(out_dir / "train" / relative_path) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
            assert np.abs(np.asarray(image, np.float32) - expected.image).mean() < 6  # JPEG at quality 90

    names = shapes.class_names()
    for split, count in (("test", 24), ("selection", 12)):
        split_dir = out_dir / split
        with open(split_dir / "labels.csv", newline="") as csv_file:
            rows = list(csv.reader(csv_file))
        assert rows[0] == ["image", "label"] and len(rows) == 1 + count
        assert [int(label) for _, label in rows[1:]] == [i % len(names) for i in range(count)]
        assert all((split_dir / path).is_file() for path, _ in rows[1:])
        assert (split_dir / "classnames.txt").read_text().splitlines() == names
        assert (split_dir / "templates.txt").read_text().splitlines() == shapes.prompt_templates()

    assert (out_dir / "vocab.txt").read_text().splitlines() == list(captions.lexicon().words)
    world = json.loads((out_dir / "world.json").read_text())
    assert world["target_label"] == names.index("banana") and world["classes"] == names
    assert (world["seed"], world["image_size"], world["num_train"]) == (3, 32, 30)

    tokenizer = WordTokenizer.from_file(out_dir / "vocab.txt", vocab_size=1000)
    tokens = tokenizer.encode_batch([caption for _, caption in train_rows[1:]], context_length=32)
    assert not (tokens == WordTokenizer.UNK_ID).any()
    assert (tokens.max(axis=1) == tokenizer.eot_id).all()


def test_write_world_skips_a_complete_world_and_guards_others(tmp_path, monkeypatch):
    out_dir = tmp_path / "world"
    writer.write_world(out_dir, **SMALL_WORLD)
    original_json = (out_dir / "world.json").read_text()

    def must_not_render(*args, **kwargs):
        raise AssertionError("a complete world was rewritten")

    with monkeypatch.context() as patch:
        patch.setattr(writer, "_write_images", must_not_render)
        assert writer.write_world(out_dir, **SMALL_WORLD) == out_dir
        with pytest.raises(FileExistsError):
            writer.write_world(out_dir, **{**SMALL_WORLD, "num_train": 31})

    writer.write_world(out_dir, **{**SMALL_WORLD, "num_train": 5}, overwrite=True)
    assert json.loads((out_dir / "world.json").read_text())["num_train"] == 5
    assert (out_dir / "world.json").read_text() != original_json
    assert len(list((out_dir / "train" / "images").iterdir())) == 5
    assert [path.name for path in tmp_path.iterdir()] == ["world"]  # no staging leftovers


def test_interrupted_write_leaves_no_world(tmp_path, monkeypatch):
    out_dir = tmp_path / "world"
    real_write_images = writer._write_images

    def fail_on_test_split(directory, seed, split, *args, **kwargs):
        if split == "test":
            raise KeyboardInterrupt
        return real_write_images(directory, seed, split, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(writer, "_write_images", fail_on_test_split)
        with pytest.raises(KeyboardInterrupt):
            writer.write_world(out_dir, **SMALL_WORLD)
    assert list(tmp_path.iterdir()) == []
    writer.write_world(out_dir, **SMALL_WORLD)
    assert writer.is_complete_world(out_dir, writer.world_parameters(
        **{key: SMALL_WORLD[key] for key in SMALL_WORLD}, jpeg_quality=90, num_classes=shapes.NUM_CLASSES))


def test_command_line_writes_a_world(tmp_path, capsys):
    out_dir = tmp_path / "cli_world"
    command.main(["--out", str(out_dir), "--image_size", "32", "--num_train", "6", "--num_test", "4",
                  "--num_selection", "2", "--num_classes", "12", "--seed", "1"])
    world = json.loads((out_dir / "world.json").read_text())
    assert (world["num_train"], world["num_classes"], len(world["classes"])) == (6, 12, 12)
    assert (out_dir / "test" / "classnames.txt").read_text().splitlines() == shapes.class_names(12)
    assert "world ready" in capsys.readouterr().out
