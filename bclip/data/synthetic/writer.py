"""Whole examples (image, caption, label) and the world written to disk in the formats real data uses:
split directories of JPEGs and CSVs, the vocabulary, the synonyms and world.json."""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from bclip.data.synthetic.captions import lexicon, scene_and_caption
from bclip.data.synthetic.scenes import render_scene
from bclip.data.synthetic.shapes import (
    NUM_CLASSES,
    TARGET_CLASS_NAME,
    TARGET_LABEL,
    _check_num_classes,
    class_names,
    prompt_templates,
)

# Bump whenever rendering or captioning changes, so stale worlds on disk are not reused.
WORLD_VERSION = 2


# ----------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
    image: np.ndarray  # uint8 [S, S, 3]
    caption: str
    label: int


def example(
    seed: int, split: str, index: int, image_size: int = 64, num_classes: int = NUM_CLASSES
) -> Example:
    """Example `index` of `split`: image uint8 [S, S, 3], caption and class label."""
    scene, caption = scene_and_caption(seed, split, index, num_classes)
    return Example(render_scene(scene, image_size), caption, scene.label)


@dataclasses.dataclass(frozen=True)
class SyntheticWorld:
    """The world with its parameters bound; `world.example("train", 7)` and friends."""

    seed: int = 0
    image_size: int = 64
    num_classes: int = NUM_CLASSES

    def __post_init__(self):
        _check_num_classes(self.num_classes)

    def example(self, split: str, index: int) -> Example:
        return example(self.seed, split, index, self.image_size, self.num_classes)

    def image(self, split: str, index: int) -> np.ndarray:
        return self.example(split, index).image

    def caption(self, split: str, index: int) -> str:
        return scene_and_caption(self.seed, split, index, self.num_classes)[1]

    def label(self, split: str, index: int) -> int:
        return scene_and_caption(self.seed, split, index, self.num_classes)[0].label

    @property
    def class_names(self) -> list[str]:
        return class_names(self.num_classes)

    @property
    def target_label(self) -> int:
        return TARGET_LABEL


# ----------------------------------------------------------------------------------------------
# Writing a world to disk in the formats real data uses
# ----------------------------------------------------------------------------------------------

WORLD_FILE = "world.json"
VOCAB_FILE = "vocab.txt"
SYNONYMS_FILE = "synonyms.json"  # {word: [synonyms]}, the caption augmentation's synonym source


def world_parameters(*, image_size: int, num_train: int, num_test: int, num_selection: int, seed: int,
                     jpeg_quality: int, num_classes: int) -> dict:
    """The contents of world.json: everything that determines the files of a written world."""
    return {
        "world_version": WORLD_VERSION,
        "seed": seed,
        "image_size": image_size,
        "num_train": num_train,
        "num_test": num_test,
        "num_selection": num_selection,
        "jpeg_quality": jpeg_quality,
        "num_classes": num_classes,
        "classes": class_names(num_classes),
        "target_class": TARGET_CLASS_NAME,
        "target_label": TARGET_LABEL,
        "templates": prompt_templates(),
    }


def is_complete_world(out_dir: str | pathlib.Path, parameters: dict) -> bool:
    """Whether out_dir holds a fully written world with these parameters."""
    world_file = pathlib.Path(out_dir) / WORLD_FILE
    try:
        return json.loads(world_file.read_text()) == parameters
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return False


def _write_images(split_dir: str, seed: int, split: str, start: int, stop: int, *, image_size: int,
                  num_classes: int, jpeg_quality: int) -> list[tuple[str, str, int]]:
    """Writes images start..stop-1 of a split as JPEGs; returns their (relative path, caption, label)."""
    rows = []
    for index in range(start, stop):
        item = example(seed, split, index, image_size, num_classes)
        relative_path = f"images/{index:08d}.jpg"
        # 4:4:4 chroma: the default 4:2:0 subsampling smears the colours of small objects.
        Image.fromarray(item.image).save(
            os.path.join(split_dir, relative_path), quality=jpeg_quality, subsampling=0
        )
        rows.append((relative_path, item.caption, item.label))
    return rows


def _write_split(split_dir: pathlib.Path, split: str, count: int, parameters: dict,
                 executor: concurrent.futures.Executor | None, num_workers: int) -> None:
    """Writes one split's images and its CSV (and, for evaluation splits, class names and templates)."""
    (split_dir / "images").mkdir(parents=True)
    write = functools.partial(
        _write_images, str(split_dir), parameters["seed"], split, image_size=parameters["image_size"],
        num_classes=parameters["num_classes"], jpeg_quality=parameters["jpeg_quality"],
    )
    if executor is None:
        rows = write(0, count)
    else:
        chunk = max(1, min(2000, math.ceil(count / (4 * num_workers))))
        starts = range(0, count, chunk)
        futures = [executor.submit(write, start, min(start + chunk, count)) for start in starts]
        rows = [row for future in futures for row in future.result()]

    if split == "train":
        captions = [(path, caption) for path, caption, _ in rows]
        _write_csv(split_dir / "train.csv", ("image", "caption"), captions)
        return
    labels = [(path, label) for path, _, label in rows]
    _write_csv(split_dir / "labels.csv", ("image", "label"), labels)
    (split_dir / "classnames.txt").write_text("\n".join(parameters["classes"]) + "\n")
    (split_dir / "templates.txt").write_text("\n".join(parameters["templates"]) + "\n")


def _write_csv(path: pathlib.Path, header: Sequence[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as csv_file:
        writer = csv.writer(csv_file, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_world(
    out_dir: str | pathlib.Path,
    image_size: int = 64,
    num_train: int = 20000,
    num_test: int = 2400,
    num_selection: int = 1200,
    seed: int = 0,
    jpeg_quality: int = 90,
    num_classes: int = NUM_CLASSES,
    num_workers: int = 1,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes the world to out_dir in the on-disk formats real data uses, unless it is already there.

    Layout: train/train.csv (image,caption) + train/images/*.jpg; test/ and selection/ each with
    images/, labels.csv (image,label), classnames.txt and templates.txt; vocab.txt (the word
    tokenizer's vocabulary); synonyms.json (for caption augmentation); world.json (the parameters). Files are written to a temporary sibling
    directory that is renamed into place at the end, so a directory holding world.json is complete.
    An existing complete world with the same parameters is kept as is; any other existing content
    raises FileExistsError unless overwrite=True. num_workers > 1 renders in that many processes.
    """
    out_dir = pathlib.Path(out_dir)
    parameters = world_parameters(
        image_size=image_size, num_train=num_train, num_test=num_test, num_selection=num_selection,
        seed=seed, jpeg_quality=jpeg_quality, num_classes=num_classes,
    )
    if is_complete_world(out_dir, parameters):
        return out_dir
    occupied = out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    if occupied and not overwrite:
        raise FileExistsError(f"{out_dir} holds something other than this world; overwrite=True replaces it")

    def fill(staging: pathlib.Path) -> None:
        executor = None
        try:
            if num_workers > 1:
                # spawn, not fork: the caller may already run multithreaded libraries (JAX, TF).
                executor = concurrent.futures.ProcessPoolExecutor(
                    num_workers, mp_context=multiprocessing.get_context("spawn")
                )
            for split, count in (("train", num_train), ("test", num_test), ("selection", num_selection)):
                _write_split(staging / split, split, count, parameters, executor, num_workers)
        finally:
            if executor is not None:
                executor.shutdown()
        (staging / VOCAB_FILE).write_text("\n".join(lexicon().words) + "\n", encoding="utf-8")
        synonym_map = {word: list(words) for word, words in lexicon().synonyms.items()}
        (staging / SYNONYMS_FILE).write_text(json.dumps(synonym_map, indent=1) + "\n", encoding="utf-8")
        (staging / WORLD_FILE).write_text(json.dumps(parameters, indent=2) + "\n")

    write_directory_atomically(out_dir, lambda directory: is_complete_world(directory, parameters), fill)
    return out_dir


def write_directory_atomically(
    out_dir: pathlib.Path, is_complete: Callable[[pathlib.Path], bool], fill: Callable[[pathlib.Path], None]
) -> None:
    """`fill(staging)` writes a directory's files into a fresh hidden sibling of `out_dir`, which is
    then renamed into place: `out_dir` is never seen half-written, and a failed fill leaves nothing.
    Whatever `out_dir` held is replaced, unless it became complete meanwhile (another process
    writing the same directory, by `is_complete(out_dir)`), which is kept."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        fill(staging)
        _move_into_place(staging, out_dir, is_complete)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _move_into_place(staging: pathlib.Path, out_dir: pathlib.Path, is_complete: Callable[[pathlib.Path], bool]) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if is_complete(out_dir):  # another process finished the same directory first
            return
        retired = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(retired)
        staging.rename(out_dir)
        if retired.is_dir():
            shutil.rmtree(retired)
        else:
            retired.unlink()
        return
    try:
        staging.rename(out_dir)  # also replaces an empty directory
    except OSError:
        if not is_complete(out_dir):  # lost a race to a process writing the same directory
            raise

