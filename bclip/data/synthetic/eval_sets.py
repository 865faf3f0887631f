"""The world's sets for the standard evaluations beside zero-shot: a retrieval split (several
captions per image, in the Karpathy JSON format Flickr30k and MSCOCO ship in) and a labelled train
folder for linear probes (tested on the world's test split).

They live in their own directories next to a written world, each with its own parameters file, and
draw from their own seed streams ("retrieval", "probe_train"), so writing them changes none of the
world's files.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
from PIL import Image

from bclip.data.synthetic import writer
from bclip.data.synthetic.captions import _caption, scene_and_caption
from bclip.data.synthetic.scenes import SPLIT_IDS, render_scene
from bclip.data.synthetic.shapes import NUM_CLASSES

RETRIEVAL_DIR = "retrieval"
RETRIEVAL_FILE = "karpathy.json"  # in RETRIEVAL_DIR; its images under RETRIEVAL_DIR/images
PROBE_TRAIN_DIR = "probe_train"
PARAMETERS_FILE = "eval_set.json"  # in each directory, written last: the directory is complete


def retrieval_captions(seed: int, index: int, captions_per_image: int, num_classes: int = NUM_CLASSES) -> tuple:
    """The scene of retrieval image `index` and its captions: the first as any split's, the rest
    drawn from further streams of the same (seed, split, index), each describing the same scene."""
    scene, first = scene_and_caption(seed, "retrieval", index, num_classes)
    more = [
        _caption(scene, np.random.default_rng([seed, SPLIT_IDS["retrieval"], index, extra]))
        for extra in range(1, captions_per_image)
    ]
    return scene, [first, *more]


def _complete(directory: pathlib.Path, parameters: dict) -> bool:
    try:
        return json.loads((directory / PARAMETERS_FILE).read_text()) == parameters
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return False


def _write_unless_complete(directory: pathlib.Path, parameters: dict, fill) -> None:
    """Writes `directory` with `fill` and its parameters file, atomically, unless it already holds a
    set written with these parameters."""
    if _complete(directory, parameters):
        return

    def fill_with_parameters(staging: pathlib.Path) -> None:
        fill(staging)
        (staging / PARAMETERS_FILE).write_text(json.dumps(parameters, indent=2) + "\n")

    writer.write_directory_atomically(directory, lambda d: _complete(d, parameters), fill_with_parameters)


def write_eval_sets(
    world_dir: str | pathlib.Path,
    *,
    seed: int = 0,
    image_size: int = 64,
    num_retrieval: int = 96,
    captions_per_image: int = 5,
    num_probe_train: int = 480,
    jpeg_quality: int = 90,
    num_classes: int = NUM_CLASSES,
) -> pathlib.Path:
    """Writes world_dir/retrieval (karpathy.json, images/) and world_dir/probe_train (an image
    folder as the world's test split: images/, labels.csv, classnames.txt, templates.txt), each
    skipped when already written with these parameters. Returns world_dir."""
    if captions_per_image < 1 or num_retrieval < 1 or num_probe_train < 1:
        raise ValueError(
            f"write_eval_sets needs at least one retrieval image, caption per image and probe image; got "
            f"num_retrieval={num_retrieval}, captions_per_image={captions_per_image}, num_probe_train={num_probe_train}"
        )
    world_dir = pathlib.Path(world_dir)
    common = {"seed": seed, "image_size": image_size, "jpeg_quality": jpeg_quality, "num_classes": num_classes}

    def fill_retrieval(staging: pathlib.Path) -> None:
        (staging / "images").mkdir()
        images, sentence_id = [], 0
        for index in range(num_retrieval):
            scene, captions = retrieval_captions(seed, index, captions_per_image, num_classes)
            filename = f"{index:08d}.jpg"
            Image.fromarray(render_scene(scene, image_size)).save(
                staging / "images" / filename, quality=jpeg_quality, subsampling=0
            )
            ids = list(range(sentence_id, sentence_id + len(captions)))
            sentence_id += len(captions)
            images.append({
                "filepath": "images",
                "filename": filename,
                "imgid": index,
                "split": "test",
                "sentids": ids,
                "sentences": [
                    {"raw": caption, "tokens": re.findall(r"\w+", caption.lower()), "imgid": index, "sentid": i}
                    for caption, i in zip(captions, ids)
                ],
            })
        (staging / RETRIEVAL_FILE).write_text(json.dumps({"dataset": "synthetic", "images": images}) + "\n")

    retrieval = {**common, "num_images": num_retrieval, "captions_per_image": captions_per_image}
    _write_unless_complete(world_dir / RETRIEVAL_DIR, retrieval, fill_retrieval)

    def fill_probe(staging: pathlib.Path) -> None:
        staging.rmdir()  # _write_split makes it
        parameters = {**common, "classes": writer.class_names(num_classes), "templates": writer.prompt_templates()}
        writer._write_split(staging, "probe_train", num_probe_train, parameters, None, 1)

    _write_unless_complete(world_dir / PROBE_TRAIN_DIR, {**common, "num_images": num_probe_train}, fill_probe)
    return world_dir
