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

from bclip.data.templates import IMAGENET_TEMPLATES
from bclip.data.triggers import apply_trigger

# Separate hash streams so that, for one seed, which examples are poisoned, which template each
# gets and how its trigger is drawn are independent of one another.
_SELECTION_STREAM = 0x5E1EC7
_TEMPLATE_STREAM = 0x7E3971
_TRIGGER_STREAM = 0x7A166E

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


def _lowest_hashes(candidates: np.ndarray, seed: int, count: int) -> np.ndarray:
    """The `count` candidates with the lowest selection hash, sorted by index. int64 [count]."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    hashes = _index_hashes(seed, _SELECTION_STREAM, candidates)
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
# The plan used by the data pipeline
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class PoisonPlan:
    """The poisoned example indices of one run and the seed their triggers and captions use.

    indices: the poisoned example indices (stored sorted, unique, int64, read-only).
    seed: non-negative int; drives triggers (`trigger_seed`) and caption templates.
    redraw_each_epoch: if True, a poisoned example's random trigger (e.g. the BadNets position)
        is redrawn every epoch; by default it looks identical in every epoch.
    """

    indices: np.ndarray
    seed: int
    redraw_each_epoch: bool = False

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
    image = apply_trigger(image, trigger_config, plan.trigger_seed(index, epoch))
    if jpeg_quality:
        image = jpeg_round_trip(image, jpeg_quality)
    return image, caption_maker(captions).caption(caption, index, label, plan.seed)


__all__ = [
    "CAPTION_MAKERS",
    "CaptionMaker",
    "PoisonPlan",
    "caption_maker",
    "caption_mentions",
    "jpeg_round_trip",
    "poison_example",
    "poisoned_caption",
    "select_label_consistent_indices",
    "select_poison_indices",
]
