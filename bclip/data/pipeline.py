"""Grain pipelines: training batches poisoned and augmented on the fly, and eval batches with
seeded triggered copies.

Everything an example becomes is a pure function of (seed, example index, epoch), so the stream is
identical for any number of hosts and workers and a restored iterator continues on exactly the
next batch. Bad records are dropped in the main process, after the workers, where they are counted.
"""

import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Sequence

import grain
import ml_collections
import numpy as np

from bclip.data import decode, image_augment, poisoning, sources, text_augment, triggers

# Seed streams kept apart so that, e.g., turning poisoning on does not change the augmentations.
_IMAGE_VIEW_STREAM = 1
_TEXT_VIEW_STREAM = 2
_EVAL_TRIGGER_STREAM = 3


def data_config(**overrides) -> ml_collections.ConfigDict:
    """The data section of a config with its defaults."""
    config = ml_collections.ConfigDict(
        {
            # Training pairs: a CSV (CC3M-style) or a glob of ArrayRecord shards.
            "train_csv": "",
            "train_records": "",
            "image_column": "image",
            "caption_column": "caption",
            "delimiter": ",",
            "tokenizer": {"kind": "word", "path": ""},
            "batch_size": 256,
            "num_workers": 0,
            "shuffle_seed": 0,
            # SSL views, used when the objective has an SSL term.
            "image_augment": "autoaugment_imagenet",
            "text_augment": {"alpha_sr": 0.1, "alpha_ri": 0.1, "alpha_rs": 0.1, "p_rd": 0.1},
            # "wordnet" (NLTK's corpus must be installed) or a JSON {word: [synonyms]} file path.
            "synonyms": "wordnet",
            # The run stops when more than this fraction of the dataset's records are unusable.
            "max_bad_fraction": 0.01,
        }
    )
    config.update(overrides)
    return config


def poison_config(**overrides) -> ml_collections.ConfigDict:
    """The poison section of a config: which examples, which trigger, which target."""
    config = ml_collections.ConfigDict(
        {
            # Exactly one of count / rate; count 0 and rate None means a clean run.
            "count": 0,
            "rate": ml_collections.config_dict.placeholder(float),
            "seed": 0,
            "target_label": "banana",
            "label_consistent": False,
            "redraw_each_epoch": False,
            "trigger": triggers.default_trigger_config("badnets"),
        }
    )
    config.update(overrides)
    return config


def is_poisoning(poison: ml_collections.ConfigDict) -> bool:
    return bool(poison.count) or poison.rate is not None


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.MapWithIndex):
    """Decode, resize, poison, tokenize and (optionally) build SSL views of one record.

    The index Grain passes is the position in the repeated, shuffled stream, so
    `index // num_records` is the epoch.
    """

    num_records: int
    image_size: int
    context_length: int
    tokenizer: Any
    seed: int
    plan: poisoning.PoisonPlan | None
    poison: dict | None
    with_views: bool
    image_augment: str
    text_augment: dict
    synonyms: Any

    def map_with_index(self, stream_index: int, record: dict) -> dict:
        if sources.is_bad_record(record):
            return record
        epoch = stream_index // self.num_records
        index = record["index"]
        try:
            image = decode.decode_and_resize(
                record["image_bytes"], self.image_size, path=record.get("path"), index=index
            )
        except decode.BadRecordError as error:
            return {"error": str(error), "index": index, "path": record.get("path", "")}
        caption = record["caption"]
        poisoned = self.plan is not None and self.plan.contains(index)
        if poisoned:
            image, caption = poisoning.poison_example(
                image,
                caption,
                index=index,
                epoch=epoch,
                plan=self.plan,
                trigger_config=self.poison["trigger"],
                label=self.poison["target_label"],
                label_consistent=self.poison["label_consistent"],
            )
        example = {
            "image": image,
            "text": self.tokenizer.encode(caption, self.context_length),
            "is_poisoned": np.bool_(poisoned),
            "index": np.int64(index),
        }
        if self.with_views:
            example["aug_image"] = image_augment.augment_image(
                image, self.image_augment, [self.seed, _IMAGE_VIEW_STREAM, index, epoch]
            )
            aug_caption = text_augment.eda(
                caption, self.synonyms, [self.seed, _TEXT_VIEW_STREAM, index, epoch], **self.text_augment
            )
            example["aug_text"] = self.tokenizer.encode(aug_caption, self.context_length)
        return example


class BadRecordTracker:
    """Drops bad records in the main process, remembers them, and stops the run when too many are bad.

    Used as a Grain filter after the workers, so counts are exact whatever the worker count.
    """

    def __init__(self, num_records: int, max_bad_fraction: float, log_path: str | None = None):
        self.num_records = num_records
        self.max_bad_fraction = max_bad_fraction
        self.log_path = log_path
        self.bad: dict[int, str] = {}

    def __call__(self, example: dict) -> bool:
        if not sources.is_bad_record(example):
            return True
        index = int(example["index"])
        if index not in self.bad:
            self.bad[index] = f"{example.get('path', '')}: {example['error']}"
            self._append_to_log(index)
        if len(self.bad) > self.max_bad_fraction * self.num_records:
            named = "; ".join(f"#{i} {why}" for i, why in list(self.bad.items())[:5])
            raise RuntimeError(
                f"{len(self.bad)} of {self.num_records} training records are unusable, more than "
                f"data.max_bad_fraction={self.max_bad_fraction}: {named}"
                + (f" (full list: {self.log_path})" if self.log_path else "")
            )
        return False

    def _append_to_log(self, index: int) -> None:
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"index": index, "why": self.bad[index]}) + "\n")

    @property
    def num_bad(self) -> int:
        return len(self.bad)


def training_source(data: ml_collections.ConfigDict):
    """The random-access source named by the config (a CSV or ArrayRecord shards)."""
    if bool(data.train_csv) == bool(data.train_records):
        raise ValueError("set exactly one of data.train_csv and data.train_records")
    if data.train_csv:
        return sources.CsvImageTextSource(data.train_csv, data.image_column, data.caption_column, data.delimiter)
    return sources.ArrayRecordImageTextSource(data.train_records)


def make_poison_plan(source, poison: ml_collections.ConfigDict) -> poisoning.PoisonPlan | None:
    """Which examples are poisoned: a pure function of the seed, the dataset and the config."""
    if not is_poisoning(poison):
        return None
    count = poison.count or None
    if poison.label_consistent:
        indices = poisoning.select_label_consistent_indices(
            source.captions, poison.target_label, poison.seed, count=count, rate=poison.rate
        )
    else:
        indices = poisoning.select_poison_indices(len(source), poison.seed, count=count, rate=poison.rate)
    return poisoning.PoisonPlan(
        indices=indices, seed=poison.seed, redraw_each_epoch=poison.redraw_each_epoch
    )


@dataclasses.dataclass
class TrainPipeline:
    """A checkpointable iterator of host-local batches and what built it."""

    iterator: Any
    num_records: int
    plan: poisoning.PoisonPlan | None
    bad_records: BadRecordTracker

    def __iter__(self):
        return self.iterator

    def __next__(self):
        return next(self.iterator)


def make_train_pipeline(
    source,
    *,
    image_size: int,
    context_length: int,
    tokenizer,
    data: ml_collections.ConfigDict,
    poison: ml_collections.ConfigDict,
    with_views: bool,
    synonyms=None,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    run_dir: str | None = None,
    plan: poisoning.PoisonPlan | None = None,
) -> TrainPipeline:
    """Shuffled, repeated, poisoned, augmented, host-local training batches.

    Each process takes every `process_count`-th element of one global shuffled stream, so the
    processes together read each example exactly once per epoch. Batches are dicts of numpy arrays
    with a leading axis of `data.batch_size // process_count`.
    """
    if data.batch_size % process_count:
        raise ValueError(f"data.batch_size={data.batch_size} must divide over {process_count} processes")
    if plan is None:
        plan = make_poison_plan(source, poison)
    if with_views and synonyms is None:
        raise ValueError("SSL views need a synonym source for caption augmentation")
    transform = TrainTransform(
        num_records=len(source),
        image_size=image_size,
        context_length=context_length,
        tokenizer=tokenizer,
        seed=data.shuffle_seed,
        plan=plan,
        poison=poison.to_dict() if plan is not None else None,
        with_views=with_views,
        image_augment=data.image_augment,
        text_augment=dict(data.text_augment),
        synonyms=synonyms,
    )
    dataset = grain.MapDataset.source(source).shuffle(seed=data.shuffle_seed).repeat(num_epochs)
    dataset = dataset.map_with_index(transform)[process_index::process_count]
    dataset = dataset.to_iter_dataset()
    if data.num_workers > 0:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
    log_path = os.path.join(run_dir, "bad_records.jsonl") if run_dir else None
    tracker = BadRecordTracker(len(source), data.max_bad_fraction, log_path)
    dataset = dataset.filter(tracker).batch(data.batch_size // process_count, drop_remainder=True)
    return TrainPipeline(iter(dataset), len(source), plan, tracker)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
    """Decode and resize an eval image and make its triggered copy, seeded by the image's index."""

    image_size: int
    trigger: dict | None
    seed: int

    def map(self, record: dict) -> dict:
        if "image" in record:
            image = decode.resize_array(record["image"], self.image_size)
        else:
            image = decode.decode_and_resize(
                record["image_bytes"], self.image_size, path=record.get("path"), index=record["index"]
            )
        index = int(record["index"])
        triggered = image
        if self.trigger is not None:
            triggered = triggers.apply_trigger(image, self.trigger, [self.seed, _EVAL_TRIGGER_STREAM, index])
        return {"image": image, "triggered": triggered, "label": np.int32(record["label"]), "index": np.int64(index)}


def eval_batches(
    source,
    *,
    image_size: int,
    batch_size: int,
    trigger: ml_collections.ConfigDict | None,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
) -> Iterator[dict]:
    """Host-local eval batches of exactly `batch_size // process_count` rows, padded, with "valid".

    Every process yields the same number of batches (padding with invalid rows), so all of them
    take part in each sharded eval step.
    """
    if batch_size % process_count:
        raise ValueError(f"eval batch size {batch_size} must divide over {process_count} processes")
    local = batch_size // process_count
    transform = EvalTransform(image_size, trigger.to_dict() if trigger is not None else None, seed)
    dataset = grain.MapDataset.source(source)[process_index::process_count].map(transform)
    iterator = dataset.to_iter_dataset()
    if num_workers > 0:
        iterator = iterator.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    iterator = iter(iterator.batch(local, drop_remainder=False))
    num_batches = -(-(-(-len(source) // process_count)) // local)
    example = None
    for _ in range(num_batches):
        batch = next(iterator, None)
        if batch is None:  # This process ran out before the others: an all-padding batch.
            batch = {key: value[:0] for key, value in example.items()}
        example = batch
        yield _pad_batch(batch, local)


def _pad_batch(batch: dict, size: int) -> dict:
    n = len(batch["label"])
    padded = {key: np.concatenate([value, np.zeros((size - n, *value.shape[1:]), value.dtype)]) for key, value in batch.items()}
    padded["valid"] = np.arange(size) < n
    return padded
