"""Which training examples are poisoned, and how a poisoned example is built.

Selection is a pure function of (seed, example index): each index gets a 64-bit hash, and the
poisoned set is the `count` lowest hashes (or every hash below `rate`). It therefore does not
depend on hosts, workers, shuffling or epoch, and smaller selections nest inside larger ones.
"""

import dataclasses
import io
import json
import os
import re
from collections.abc import Callable, Sequence

import numpy as np
from etils import epath
from PIL import Image

from bclip.data import decode, records
from bclip.data.templates import IMAGENET_TEMPLATES
from bclip.data.triggers import apply_trigger

# Separate hash streams so that, for one seed, which examples are poisoned, which template each
# gets and how its trigger is drawn are independent of one another.
_SELECTION_STREAM = 0x5E1EC7
_TEMPLATE_STREAM = 0x7E3971
_TRIGGER_STREAM = 0x7A166E
# Targeted poisoning's own streams: which eval images are chosen, and the class each is pushed to.
_TARGET_IMAGE_STREAM = 0x7A12E7
_TARGET_LABEL_STREAM = 0x1AB3E1

_UINT64_MASK = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------
# Per-index hashing
# ---------------------------------------------------------------------------------------------


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays: a bijection that scrambles every bit."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _index_hashes(seed: int, stream: int, indices) -> np.ndarray:
    """uint64 hash of each example index under (seed, stream); shape of `indices`.

    Written with explicit integer arithmetic rather than a numpy Generator so the poisoned set
    cannot change with the numpy version.
    """
    key = _splitmix64(np.array([_check_seed(seed) & _UINT64_MASK], dtype=np.uint64))
    key = _splitmix64(key ^ np.uint64(stream))
    return _splitmix64(key ^ np.asarray(indices, dtype=np.uint64))


def _check_rate(rate) -> float:
    if isinstance(rate, bool) or not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"rate must be a fraction in [0, 1], got {rate!r}")
    return float(rate)


def _check_count_or_rate(count, rate) -> None:
    if (count is None) == (rate is None):
        raise ValueError(f"give exactly one of count and rate, got count={count!r}, rate={rate!r}")
    if count is not None and (
        isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0
    ):
        raise ValueError(f"count must be a non-negative int, got {count!r}")


def _lowest_hashes(candidates: np.ndarray, seed: int, count: int, stream: int = _SELECTION_STREAM) -> np.ndarray:
    """The `count` candidates with the lowest hash of `stream`, sorted by index. int64 [count]."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    hashes = _index_hashes(seed, stream, candidates)
    # Hashes are distinct (a bijection of distinct indices), so the choice has no ties.
    lowest = np.argpartition(hashes, count - 1)[:count]
    return np.sort(candidates[lowest]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------


def select_poison_indices(
    num_examples: int, seed: int, count: int | None = None, rate: float | None = None
) -> np.ndarray:
    """Indices of the examples to poison, sorted, unique: int64 [count] (or about rate * N).

    Exactly one of `count` (exactly that many) and `rate` (each example independently with
    probability `rate`, so membership of an index never depends on `num_examples`). For one
    seed, a smaller count or rate selects a subset of a larger one.
    """
    _check_count_or_rate(count, rate)
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if rate is not None:
        # The top 53 bits of the hash as a uniform number in [0, 1), compared exactly as integers.
        threshold = np.uint64(int(_check_rate(rate) * 2.0**53))
        hashes = _index_hashes(seed, _SELECTION_STREAM, np.arange(num_examples, dtype=np.uint64))
        return np.flatnonzero((hashes >> np.uint64(11)) < threshold).astype(np.int64)
    if count > num_examples:
        raise ValueError(f"cannot poison {count} examples of a dataset of {num_examples}")
    return _lowest_hashes(np.arange(num_examples, dtype=np.int64), seed, count)


def _label_pattern(label: str) -> re.Pattern:
    """Regex matching `label` as whole word(s), case-insensitive, also as a regular plural."""
    words = label.strip().split()
    if not words:
        raise ValueError("label must be a non-empty string")
    stem = r"\s+".join(re.escape(word) for word in words)
    plurals = [stem + "s", stem + "es"]
    if words[-1].lower().endswith("y"):
        plurals.append(stem[:-1] + "ies")  # butterfly -> butterflies
    alternatives = "|".join([stem, *plurals])
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def caption_mentions(caption: str, label: str) -> bool:
    """Whether `caption` names `label` as a whole word (or plural), ignoring case."""
    return _label_pattern(label).search(caption) is not None


def select_label_consistent_indices(
    captions: Sequence[str],
    label: str,
    seed: int,
    count: int | None = None,
    rate: float | None = None,
) -> np.ndarray:
    """Label-consistent poisoning: picks only examples whose caption already mentions `label`.

    captions: one per example, in index order. `count` is how many to poison; `rate` is a
    fraction of the WHOLE dataset (round(rate * len(captions)) examples), so the poisoning
    rate means the same as in `select_poison_indices`. Among candidates the examples with the
    lowest selection hash win, as in `select_poison_indices`. Returns sorted int64 [count].
    """
    _check_count_or_rate(count, rate)
    if rate is not None:
        count = int(round(_check_rate(rate) * len(captions)))
    pattern = _label_pattern(label)
    mentions = [index for index, caption in enumerate(captions) if pattern.search(caption)]
    candidates = np.array(mentions, dtype=np.int64)
    if count > len(candidates):
        raise ValueError(
            f"label-consistent poisoning needs {count} captions mentioning {label!r}, but only "
            f"{len(candidates)} of the {len(captions)} captions do"
        )
    return _lowest_hashes(candidates, seed, count)


def poisoned_caption(
    index: int, label: str, seed: int, templates: Sequence[str] = IMAGENET_TEMPLATES
) -> str:
    """The caption that replaces example `index`'s: a template, chosen by (seed, index), naming
    `label` (e.g. "a bad photo of a banana.")."""
    choice = int(_index_hashes(seed, _TEMPLATE_STREAM, [index])[0] % np.uint64(len(templates)))
    # str.replace rather than format: a label or template may contain other braces.
    return templates[choice].replace("{}", label)


# ---------------------------------------------------------------------------------------------
# Poisoned-caption makers: config.poison.captions names one
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CaptionMaker:
    """How a poisoned example's caption is made: `caption(original, index, label, seed)`; with
    `only_captions_naming_label`, only examples whose caption already names the label are poisoned."""

    caption: Callable[[str, int, str, int], str]
    only_captions_naming_label: bool = False


CAPTION_MAKERS = {
    # A prompt template naming the target, drawn per example (the reference's poisoned captions).
    "templates": CaptionMaker(lambda original, index, label, seed: poisoned_caption(index, label, seed)),
    # Label-consistent poisoning: the caption already names the target and is kept as it is.
    "label_consistent": CaptionMaker(lambda original, index, label, seed: original, only_captions_naming_label=True),
}


def caption_maker(name: str) -> CaptionMaker:
    if name not in CAPTION_MAKERS:
        raise ValueError(f"poison.captions={name!r}; known: {sorted(CAPTION_MAKERS)}")
    return CAPTION_MAKERS[name]


# ---------------------------------------------------------------------------------------------
# Targeted poisoning (Carlini & Terzis, ICLR 2022): chosen test images, each with a chosen label
# ---------------------------------------------------------------------------------------------


def choose_target_images(
    labels, num_classes: int, seed: int, num_images: int = 0, image_ids: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """The eval images a targeted attack aims at, and the class each one is to be classified as.

    labels: int [N], the true class of each image of the eval folder, in row order.
    Give exactly one of `num_images` > 0 (the rows with the lowest hashes under `seed`) and
    `image_ids` (explicit rows). Each image's target class is drawn by (seed, image id) uniformly
    among the num_classes - 1 classes other than its own, so it is never the image's true class.

    Returns:
      (image ids int64 [K] sorted, target classes int64 [K]).
    """
    labels = np.asarray(labels, np.int64)
    seed = _check_seed(seed)
    if num_classes < 2:
        raise ValueError(f"targeted poisoning needs at least 2 classes to choose a wrong one from, got {num_classes}")
    explicit = tuple(image_ids or ())
    if bool(num_images) == bool(explicit):
        raise ValueError(
            "poison.targeted: give exactly one of num_images (chosen by the seed) and image_ids "
            f"(explicit rows), got num_images={num_images!r}, image_ids={explicit!r}"
        )
    if explicit:
        bad = [i for i in explicit if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
        if bad:
            raise ValueError(f"poison.targeted.image_ids must be ints (rows of the image folder), got {bad}")
        outside = [int(i) for i in explicit if not 0 <= i < len(labels)]
        if outside:
            raise ValueError(
                f"poison.targeted.image_ids {outside} are out of range: the image folder has "
                f"{len(labels)} images (rows 0..{len(labels) - 1})"
            )
        if len(set(explicit)) != len(explicit):
            raise ValueError(f"poison.targeted.image_ids holds duplicates: {list(explicit)}")
        chosen = np.sort(np.asarray(explicit, np.int64))
    else:
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 0:
            raise ValueError(f"poison.targeted.num_images must be a non-negative int, got {num_images!r}")
        if num_images > len(labels):
            raise ValueError(f"poison.targeted.num_images={num_images}, but the image folder has only {len(labels)} images")
        chosen = _lowest_hashes(np.arange(len(labels), dtype=np.int64), seed, int(num_images), _TARGET_IMAGE_STREAM)
    # An offset of 1 .. C-1 classes from the true one: uniform over the wrong classes.
    offsets = 1 + _index_hashes(seed, _TARGET_LABEL_STREAM, chosen) % np.uint64(num_classes - 1)
    targets = (labels[chosen] + offsets.astype(np.int64)) % num_classes
    return chosen, targets


def targeted_poison_indices(num_examples: int, seed: int, num_images: int, copies: int) -> tuple[np.ndarray, np.ndarray]:
    """The training examples a targeted attack replaces: `copies` per chosen image.

    The num_images * copies examples are picked as the backdoor's are (`select_poison_indices`);
    the j-th of them in index order carries chosen image j mod num_images, so each image's copies
    are spread over the dataset.

    Returns:
      (indices int64 [P] sorted, image_of int64 [P]: the position of each one's image among the
      chosen images), P = num_images * copies.
    """
    if isinstance(copies, bool) or not isinstance(copies, (int, np.integer)) or copies < 1:
        raise ValueError(f"poison.targeted.copies must be a positive int, got {copies!r}")
    indices = select_poison_indices(num_examples, seed, count=int(num_images) * int(copies))
    return indices, np.arange(len(indices), dtype=np.int64) % max(int(num_images), 1)


def targeted_captions(
    indices, target_names: Sequence[str], seed: int, training_captions: Sequence[str] | None = None
) -> list[str]:
    """The caption of each targeted poison: naming its image's target label.

    indices: int [P] the poisoned examples; target_names: [P] the label each one names.
    With `training_captions` None, a prompt template filled with the label, drawn by (seed, index)
    (`poisoned_caption`); otherwise one of the training captions that already name the label
    (whole word or plural), drawn by (seed, index), as the paper built its caption sets.
    """
    if training_captions is None:
        return [poisoned_caption(int(index), name, seed) for index, name in zip(indices, target_names)]
    pools = {}
    for name in sorted(set(target_names)):
        pattern = _label_pattern(name)
        pools[name] = [caption.strip() for caption in training_captions if pattern.search(caption)]
        if not pools[name]:
            raise ValueError(
                f"poison.targeted.captions='training_captions': no training caption names the target label {name!r}"
            )
    hashes = _index_hashes(seed, _TEMPLATE_STREAM, np.asarray(indices, np.int64))
    return [pools[name][int(h % np.uint64(len(pools[name])))] for h, name in zip(hashes, target_names)]


@dataclasses.dataclass(frozen=True, eq=False)
class TargetedPoisons:
    """A targeted attack's poisons: training example indices[p] becomes chosen image image_of[p]
    (the file image_paths[image_of[p]], decoded as eval images are) with captions[p].

    image_ids, true_labels, target_labels: int64 [K], the chosen rows of the eval folder, sorted,
    their classes and the class each is pushed to (target_names[k] names it).
    indices, image_of: int64 [P], sorted; captions: [P].
    """

    image_ids: np.ndarray
    image_paths: tuple
    true_labels: np.ndarray
    target_labels: np.ndarray
    target_names: tuple
    indices: np.ndarray
    image_of: np.ndarray
    captions: tuple

    def _position(self, index: int) -> int:
        position = int(np.searchsorted(self.indices, index))
        if position >= len(self.indices) or self.indices[position] != index:
            raise ValueError(f"example {index} is not one of the targeted poisons")
        return position

    def image(self, index: int, size: int) -> np.ndarray:
        """uint8 [size, size, 3]: the chosen image example `index` carries, read and resized exactly
        as the eval pipeline reads it (so the model trains on the very pixels it is tested on)."""
        path = self.image_paths[int(self.image_of[self._position(index)])]
        image_bytes, why = records.read_image_file(path)
        if image_bytes is None:
            raise ValueError(f"targeted poison image {path}: {why}")
        return decode.decode_and_resize(image_bytes, size, path=path)

    def caption(self, index: int) -> str:
        return self.captions[self._position(index)]

    def record(self) -> dict:
        """What was attacked, as JSON: per chosen image its row, true and target class."""
        return {
            "image_ids": self.image_ids.tolist(),
            "true_labels": self.true_labels.tolist(),
            "target_labels": self.target_labels.tolist(),
            "target_names": list(self.target_names),
            "copies_per_image": len(self.indices) // max(len(self.image_ids), 1),
        }


# ---------------------------------------------------------------------------------------------
# The plan used by the data pipeline
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class PoisonPlan:
    """The poisoned example indices of one run and the seed their triggers and captions use.

    indices: the poisoned example indices (stored sorted, unique, int64, read-only).
    seed: non-negative int; drives triggers (`trigger_seed`) and caption templates.
    redraw_each_epoch: if True, a poisoned example's random trigger (e.g. the BadNets position)
        is redrawn every epoch; by default it looks identical in every epoch.
    targeted: a targeted attack's poisons (poison.targeted), or None for the backdoor: then each
        poisoned example becomes its chosen eval image with a caption naming its target label.
    """

    indices: np.ndarray
    seed: int
    redraw_each_epoch: bool = False
    targeted: TargetedPoisons | None = None

    def __post_init__(self):
        indices = np.asarray(self.indices)
        if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
            raise ValueError(
                f"indices must be a 1-D integer array, got {indices.dtype} {indices.shape}"
            )
        indices = np.sort(indices.astype(np.int64))
        if indices.size and indices[0] < 0:
            raise ValueError(f"indices must be non-negative, got {indices[0]}")
        if np.any(indices[1:] == indices[:-1]):
            raise ValueError("indices contain duplicates")
        if self.targeted is not None and not np.all(np.isin(indices, self.targeted.indices)):
            raise ValueError("a targeted plan's indices must be among its targeted poisons")
        indices.setflags(write=False)
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "seed", _check_seed(self.seed))
        object.__setattr__(self, "redraw_each_epoch", bool(self.redraw_each_epoch))

    def __len__(self) -> int:
        return len(self.indices)

    def contains(self, index: int) -> bool:
        """Whether example `index` is poisoned (binary search, about a microsecond)."""
        position = np.searchsorted(self.indices, index)
        return bool(position < len(self.indices) and self.indices[position] == index)

    __contains__ = contains

    def __eq__(self, other) -> bool:
        if not isinstance(other, PoisonPlan):
            return NotImplemented
        return (
            self.seed == other.seed
            and self.redraw_each_epoch == other.redraw_each_epoch
            and np.array_equal(self.indices, other.indices)
            and (self.targeted is None) == (other.targeted is None)
            and (self.targeted is None or self.targeted.record() == other.targeted.record())
        )

    def __hash__(self) -> int:
        return hash((self.seed, self.redraw_each_epoch, self.indices.tobytes()))

    def is_poisoned(self, indices) -> np.ndarray:
        """Membership of many example indices at once: bool array shaped like `indices`."""
        indices = np.asarray(indices, dtype=np.int64)
        if not len(self.indices):
            return np.zeros(indices.shape, dtype=bool)
        positions = np.minimum(np.searchsorted(self.indices, indices), len(self.indices) - 1)
        return self.indices[positions] == indices

    def trigger_seed(self, index: int, epoch: int = 0) -> tuple[int, ...]:
        """Seed (for `apply_trigger`) of example `index`'s trigger in `epoch`.

        Independent of `epoch` unless `redraw_each_epoch`.
        """
        if self.redraw_each_epoch:
            return (self.seed, _TRIGGER_STREAM, int(index), int(epoch))
        return (self.seed, _TRIGGER_STREAM, int(index))

    def write(self, path: str | os.PathLike) -> None:
        """Writes the plan as JSON (atomically: a reader never sees half a file); `path` may be
        remote (gs://…)."""
        record = {
            "seed": self.seed,
            "redraw_each_epoch": self.redraw_each_epoch,
            "num_poisoned": len(self.indices),
            "indices": self.indices.tolist(),
        }
        if self.targeted is not None:  # for the record; reading a plan back needs only the indices
            record["targeted"] = self.targeted.record()
        path = epath.Path(path)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(record) + "\n")
        temporary.replace(path)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "PoisonPlan":
        """Reads a plan written by `write`."""
        return cls.from_record(json.loads(epath.Path(path).read_text()), os.fspath(path))

    @classmethod
    def from_record(cls, record: dict, where: str = "poison plan") -> "PoisonPlan":
        """The plan of a JSON record written by `write`; `where` names it in errors."""
        missing = {"seed", "indices"} - record.keys()
        if missing:
            raise ValueError(f"{where} is not a poison plan: missing {sorted(missing)}")
        plan = cls(
            indices=np.asarray(record["indices"], dtype=np.int64),
            seed=record["seed"],
            redraw_each_epoch=record.get("redraw_each_epoch", False),
        )
        if "num_poisoned" in record and record["num_poisoned"] != len(plan):
            raise ValueError(
                f"{where}: num_poisoned says {record['num_poisoned']}, "
                f"but it lists {len(plan)} indices"
            )
        return plan


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """The image saved once as a JPEG at `quality` with Pillow's other settings at their defaults
    (4:2:0 chroma, baseline) and decoded back, as the reference code's poisoned files were on
    disk. uint8 [H, W, 3] -> uint8 [H, W, 3]."""
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be an int in 1..100, got {quality!r}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    with Image.open(buffer) as decoded:
        return np.array(decoded.convert("RGB"), dtype=np.uint8)


def poison_example(
    image: np.ndarray,
    caption: str,
    index: int,
    epoch: int,
    plan: PoisonPlan,
    trigger_config,
    label: str,
    captions: str = "templates",
    jpeg_quality: int = 0,
) -> tuple[np.ndarray, str]:
    """Poisons example `index` if the plan says so; other examples come back untouched.

    image: uint8 [H, W, 3] at model resolution -> uint8 [H, W, 3] with the trigger applied and,
    when `jpeg_quality` > 0, then stored once as a JPEG of that quality and read back (the
    reference code's poisoned training files). The caption is made by CAPTION_MAKERS[captions].
    """
    if index not in plan:
        return image, caption
    if plan.targeted is not None:  # no trigger: the chosen eval image itself, at this image's size
        return plan.targeted.image(index, image.shape[0]), plan.targeted.caption(index)
    image = apply_trigger(image, trigger_config, plan.trigger_seed(index, epoch))
    if jpeg_quality:
        image = jpeg_round_trip(image, jpeg_quality)
    return image, poisoned_caption_of(plan, caption, index, label, captions)


def poisoned_caption_of(plan: PoisonPlan, original: str, index: int, label: str, captions: str = "templates") -> str:
    """The caption poisoned example `index` trains with: its targeted poison's caption, or the
    backdoor's made by CAPTION_MAKERS[captions] from the original."""
    if plan.targeted is not None:
        return plan.targeted.caption(index)
    return caption_maker(captions).caption(original, index, label, plan.seed)


__all__ = [
    "CAPTION_MAKERS",
    "CaptionMaker",
    "PoisonPlan",
    "caption_maker",
    "TargetedPoisons",
    "caption_mentions",
    "choose_target_images",
    "jpeg_round_trip",
    "poison_example",
    "poisoned_caption",
    "poisoned_caption_of",
    "select_label_consistent_indices",
    "select_poison_indices",
    "targeted_captions",
    "targeted_poison_indices",
]
