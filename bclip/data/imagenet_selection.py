"""A held-out selection split drawn from ImageNet TRAIN, written as an eval folder.

Cleaning runs choose their epoch on this split, so the validation set stays a test set that nothing
is tuned on. The folder has the layout `python -m bclip.data.imagenet` gives the validation set:
<wnid>/<image> copies, labels.csv (image,label), classnames.txt (CLIP's names) and templates.txt
(the 80 prompts), plus selection.json recording where and how the images were drawn.

  python -m bclip.data.imagenet_selection /data/imagenet/train /data/imagenet/selection \
      [--per_class 10] [--seed 0]

The training folder must have the standard per-WordNet-id layout (train/n01440764/*.JPEG, ...);
class i is the i-th WordNet id in sorted order, as for the validation labels. The draw depends only
on the seed, the class and the sorted file names of that class.
"""

import argparse
import concurrent.futures
import json
import re
import sys
from collections.abc import Sequence

import numpy as np
from etils import epath

from bclip.data.imagenet import CLASSNAMES_FILE, IMAGENET_CLASSNAMES, LABELS_FILE, TEMPLATES_FILE
from bclip.data.templates import IMAGENET_TEMPLATES

DEFAULT_PER_CLASS = 10  # 10,000 images, about 1.1 GB of ImageNet train JPEGs
MANIFEST_FILE = "selection.json"
_WORDNET_ID = re.compile(r"n\d{8}")
_COPY_THREADS = 16  # file copies wait on storage, not on the CPU


def class_folders(train_folder: epath.Path) -> list[str]:
    """The WordNet-id folder names of an ImageNet train layout, in label order (sorted)."""
    wnids = sorted(entry.name for entry in train_folder.iterdir() if _WORDNET_ID.fullmatch(entry.name) and entry.is_dir())
    if len(wnids) != len(IMAGENET_CLASSNAMES):
        raise ValueError(
            f"{train_folder}: found {len(wnids)} WordNet-id folders (n########), expected {len(IMAGENET_CLASSNAMES)}"
        )
    return wnids


def choose_images(file_names: Sequence[str], per_class: int, seed: int, label: int) -> list[str]:
    """`per_class` distinct names out of one class's image files, drawn by (seed, label) from the
    sorted names: the listing order does not matter, and each class's draw is independent of the
    others. Returned in sorted order."""
    names = sorted(set(file_names))
    if len(names) < per_class:
        raise ValueError(f"class {label} has {len(names)} images, fewer than the {per_class} per class asked for")
    picked = np.random.default_rng([seed, label]).choice(len(names), size=per_class, replace=False)
    return [names[i] for i in sorted(picked)]


def write_selection_split(
    train_folder: str | epath.PathLike,
    out_folder: str | epath.PathLike,
    per_class: int = DEFAULT_PER_CLASS,
    seed: int = 0,
) -> epath.Path:
    """Copy `per_class` images of every ImageNet class from `train_folder` into the new eval folder
    `out_folder` (which must be absent or empty); returns the path of its labels.csv."""
    train, out = epath.Path(train_folder), epath.Path(out_folder)
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    if not train.is_dir():
        raise FileNotFoundError(f"ImageNet train folder not found: {train}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; the selection split goes into a new folder")
    wnids = class_folders(train)

    rows, copies = [], []
    for label, wnid in enumerate(wnids):
        names = [entry.name for entry in (train / wnid).iterdir() if entry.is_file()]
        try:
            chosen = choose_images(names, per_class, seed, label)
        except ValueError as error:
            raise ValueError(f"{train / wnid}: {error}") from None
        for name in chosen:
            if "," in name or "\n" in name:
                raise ValueError(f"{train / wnid / name}: file name cannot be written to a CSV row")
            rows.append(f"{wnid}/{name},{label}")
            copies.append((train / wnid / name, out / wnid / name))
    # Every class is drawn before anything is written, so a class short of images leaves no output.
    for wnid in wnids:
        (out / wnid).mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(_COPY_THREADS) as pool:
        list(pool.map(lambda pair: pair[1].write_bytes(pair[0].read_bytes()), copies))

    (out / CLASSNAMES_FILE).write_text("\n".join(IMAGENET_CLASSNAMES) + "\n")
    (out / TEMPLATES_FILE).write_text("\n".join(IMAGENET_TEMPLATES) + "\n")
    manifest = {"source": str(train), "split": "train", "per_class": per_class, "seed": seed, "num_images": len(rows)}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    # Written last: an interrupted copy leaves no labels.csv, so it is never read as a finished set.
    labels = out / LABELS_FILE
    labels.write_text("image,label\n" + "\n".join(rows) + "\n")
    return labels


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bclip.data.imagenet_selection",
        description="Write a held-out selection split of ImageNet TRAIN (N images per class, seeded) as an eval folder.",
    )
    parser.add_argument("train_folder", help="ImageNet train, one folder per WordNet id.")
    parser.add_argument("out_folder", help="The new eval folder (absent or empty).")
    parser.add_argument("--per_class", type=int, default=DEFAULT_PER_CLASS, help="Images per class (default 10: 10,000 in all).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        labels = write_selection_split(args.train_folder, args.out_folder, args.per_class, args.seed)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.per_class * len(IMAGENET_CLASSNAMES)} images; eval folder {args.out_folder} ({labels.name} written)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
