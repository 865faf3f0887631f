"""Grain pipelines: training batches poisoned and augmented on the fly, and eval batches with
seeded triggered copies.

Everything an example becomes is a pure function of (seed, example index, epoch), so the stream is
identical for any number of hosts and workers and a restored iterator continues on exactly the
next batch. Bad records are dropped in the main process, after the workers, where they are counted.
"""

import dataclasses
import json
import os
from typing import Any, Iterator

import grain
import ml_collections
import numpy as np
from absl import flags
from etils import epath
from PIL import Image

from bclip.data import decode, image_augment, poisoning, sources, text_augment, triggers

# Seed streams kept apart so that, e.g., turning poisoning on does not change the augmentations.
_IMAGE_VIEW_STREAM = 1
_TEXT_VIEW_STREAM = 2
_EVAL_TRIGGER_STREAM = 3


def data_config(**overrides) -> ml_collections.ConfigDict:
    """The data section of a config with its defaults."""
    config = ml_collections.ConfigDict(
        {
            # Training pairs (set one): a CSV (CC3M-style), a glob of ArrayRecord shards, or
            # img2dataset's webdataset tar shards: a folder, glob or brace pattern such as
            # "/data/cc3m/{00000..00331}.tar", indexed once for random access (index files beside
            # the shards, or in webdataset_index_dir when set; bclip.data.webdataset_index).
            "train_csv": "",
            "train_records": "",
            "train_webdataset": "",
            "webdataset_index_dir": "",
            "image_column": "image",
            "caption_column": "caption",
            "delimiter": ",",
            "tokenizer": {"kind": "word", "path": ""},
            "batch_size": 256,
            "num_workers": 0,
            # Threads per process (the main one, or each worker) building batches side by side.
            # Decoding and resizing release the GIL, so threads use more cores without the
            # shared-memory hand-off that workers pay for every batch (bclip.bench data --threads).
            "num_threads": 1,
            "shuffle_seed": 0,
            # SSL views, used when the objective has an SSL term.
            "image_augment": "autoaugment_imagenet",
            # Make the image views in the train step, on the accelerator (bclip.device_augment;
            # autoaugment_imagenet only), instead of here: batches then carry a view_key per
            # example in place of aug_image, and the host decodes each image once and augments none.
            "views_on_device": False,
            "text_augment": {"alpha_sr": 0.1, "alpha_ri": 0.1, "alpha_rs": 0.1, "p_rd": 0.1},
            # A new EDA caption view every epoch (True), or one per caption for the whole run (False:
            # each caption keeps its first epoch's view), as the reference made them once.
            "text_views_per_epoch": True,
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
            # How a poisoned caption is made: a key of poisoning.CAPTION_MAKERS ("templates",
            # "label_consistent": only captions already naming the target, kept as they are).
            "captions": "templates",
            "redraw_each_epoch": False,
            "trigger": triggers.default_trigger_config("badnets"),
            # The reference code's geometry (False keeps bclip's): a poisoned training image and
            # every triggered eval image are the decoded original resized to S x S, aspect ratio
            # ignored, before the trigger, while clean images keep the shorter-side resize and
            # centre crop. Off by default because then triggered and clean images are shaped
            # differently, which a model can learn in place of the trigger.
            "squash": False,
            # > 0: a poisoned training image is saved once as a JPEG of this quality (Pillow)
            # after its trigger and read back, as the reference stored its poisoned files (75).
            # 0: off. Eval images and clean images are never re-encoded.
            "jpeg_quality": 0,
            # Targeted poisoning (Carlini & Terzis, ICLR 2022), in place of the backdoor above (not
            # both in one run): chosen images of the eval folder `images` (labels.csv,
            # classnames.txt), each paired with captions naming a label drawn among the classes
            # other than its own, replace `copies` training pairs per image; the "targeted"
            # evaluator reports how many are classified as their label. The images are
            # `num_images` drawn by `seed`, or the rows `image_ids`. copies 0: nothing is poisoned,
            # but the images and labels stay defined for the evaluator (a cleaning run).
            "targeted": {
                "images": "",
                "num_images": 0,
                "image_ids": (),
                "copies": 0,
                # "templates": a prompt template naming the label; "training_captions": a training
                # caption that names it (the paper's caption set).
                "captions": "templates",
            },
        }
    )
    config.update(overrides)
    return config


TARGETED_CAPTIONS = ("templates", "training_captions")


def _check_reference_options(poison: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming poison.squash or poison.jpeg_quality if it has a bad value."""
    if not isinstance(poison.squash, bool):
        raise ValueError(f"poison.squash must be True or False, got {poison.squash!r}")
    quality = poison.jpeg_quality
    if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100:
        raise ValueError(f"poison.jpeg_quality must be an int in 0..100 (0: off), got {quality!r}")


# Freed Pillow image buffers each process keeps for reuse. Pillow returns every buffer to the
# system allocator by default, and at 224 px the SSL views' short-lived images then cost page
# faults on every new buffer (about a tenth of their time). A few MB at 224 px; Pillow's block
# size (16 MB) bounds it for large images.
_PILLOW_REUSED_BUFFERS = 16


def _reuse_pillow_buffers() -> None:
    """Lets Pillow keep freed image buffers for reuse in this process (never lowering a larger
    PILLOW_BLOCKS_MAX the user set)."""
    if Image.core.get_blocks_max() < _PILLOW_REUSED_BUFFERS:
        Image.core.set_blocks_max(_PILLOW_REUSED_BUFFERS)


# Per process (the main one, or each worker): threads that prepare whole batches ahead, and
# how many batches they may hold. Grain's defaults (16 threads, 500 elements) are meant for
# light elements; here an element is a batch of images. Training uses data.num_threads threads,
# each with one batch in hand and one more waiting; evaluation keeps two, so that in-process eval
# decodes on two cores.
_EVAL_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)


def _train_read_options(num_threads: int) -> grain.ReadOptions:
    if num_threads < 1:
        raise ValueError(f"data.num_threads must be at least 1, got {num_threads}")
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads + 1)


def _worker_options(num_workers: int) -> grain.MultiprocessingOptions:
    """Options for `mp_prefetch`, after making sure Grain can read its absl flags.

    Grain reads flags of its own (e.g. grain_enable_multiprocess_worker_profiling) when it starts
    worker processes, and absl refuses any flag read before the command line is parsed. Inside an
    absl app (bclip.main) they are parsed already; from plain Python (tests, notebooks, argparse
    tools such as bclip.bench) nothing parses them, so they are marked parsed at their defaults.
    """
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return grain.MultiprocessingOptions(num_workers=num_workers)


def _with_small_arrays_pickled(dataset: grain.IterDataset) -> grain.IterDataset:
    """`dataset` passing only large arrays (the images) from worker processes through shared
    memory: by default every array gets its own shared-memory segment, whose set-up and clean-up
    on both sides cost more than pickling a batch's tokens, flags and indices."""
    options = grain.experimental.DatasetOptions(min_shm_size=_MIN_SHARED_MEMORY_BYTES)
    return grain.experimental.WithOptionsIterDataset(dataset, options)


# Arrays smaller than this cross from workers to the main process pickled (at 224 px and batch
# 256, the token rows are 79 KB and the images 38 MB).
_MIN_SHARED_MEMORY_BYTES = 1 << 20


def is_poisoning(poison: ml_collections.ConfigDict) -> bool:
    """Whether the backdoor poisons any example."""
    return bool(poison.count) or poison.rate is not None


def is_targeted(poison: ml_collections.ConfigDict) -> bool:
    """Whether targeted poisoning replaces any example (a config saved before it existed: no)."""
    return "targeted" in poison and bool(poison.targeted.copies)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


# The key of `TrainBatchTransform`'s outputs that says why a row is unusable ("" when it is not).
BAD_RECORD_KEY = "bad_record"


# The image augmentation bclip.device_augment makes in the train step (data.views_on_device).
DEVICE_VIEW_POLICY = "autoaugment_imagenet"


def view_keys(seed: int, stream: int, indices: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """uint32 [N, 2] threefry key data, one per (seed, stream, example index, epoch): made on the
    host, in numpy, so a batch carries its views' keys like any other per-example field."""
    indices = np.asarray(indices, np.uint64)
    epochs = np.asarray(epochs, np.uint64)
    # A 64-bit mix (SplitMix64's finaliser) of the four numbers, split into two 32-bit words.
    with np.errstate(over="ignore"):
        mixed = np.full(indices.shape, _splitmix64(np.uint64(seed)) ^ np.uint64(stream), np.uint64)
        for value in (indices, epochs):
            mixed = _splitmix64(mixed ^ _splitmix64(value + np.uint64(0x632BE59BD9B4E019)))
    return np.stack([(mixed >> np.uint64(32)).astype(np.uint32), mixed.astype(np.uint32)], axis=-1)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@dataclasses.dataclass(frozen=True)
class TrainBatchTransform(grain.transforms.Map):
    """Builds one process's local batch number b: reads, decodes, poisons, tokenizes and
    (optionally) makes SSL views of its examples, writing each straight into the batch arrays.

    The batch holds the examples at positions p + P * (b * B + j), j < B, of the global stream
    `order` (record indices, shuffled and repeated), for process p of P and local batch size B:
    its contents depend neither on the number of workers nor on which batches came before, and
    `position // num_records` is the epoch an example belongs to, which seeds its SSL views and
    (with redrawn triggers) its poison.

    Output, for the n <= B positions left in the stream: image uint8 [n, S, S, 3], text int32
    [n, L], is_poisoned bool [n], index int64 [n] (plus aug_text and aug_image with views, or
    view_key uint32 [n, 2] for views made on device) and bad_record str [n], empty for a usable
    row. An unusable record (from the source, undecodable, or with no words for an EDA view) is a
    row of zeros with bad_record saying where and why; `BadRecordTracker` drops it after the
    workers.
    """

    source: Any
    order: grain.MapDataset
    process_index: int
    process_count: int
    batch_size: int
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
    views_on_device: bool = False
    text_views_per_epoch: bool = True

    @property
    def makes_image_views(self) -> bool:
        """Whether the host makes the image views (aug_image), rather than the train step."""
        return self.with_views and not self.views_on_device

    def map(self, batch_index: int) -> dict:
        _reuse_pillow_buffers()  # here rather than when building the pipeline: this runs in the workers
        first = self.process_index + self.process_count * self.batch_size * batch_index
        end = min(first + self.process_count * self.batch_size, len(self.order))
        positions = range(first, end, self.process_count)
        size, num_rows = self.image_size, len(positions)
        batch = {
            "image": np.empty((num_rows, size, size, 3), np.uint8),
            "is_poisoned": np.zeros(num_rows, bool),
            "index": np.empty(num_rows, np.int64),
        }
        if self.makes_image_views:
            batch["aug_image"] = np.empty((num_rows, size, size, 3), np.uint8)
        why = [""] * num_rows
        captions = [""] * num_rows
        aug_captions = [""] * num_rows
        for row, position in enumerate(positions):
            record = self.source[self.order[position]]
            batch["index"][row] = record["index"]
            try:
                self._fill_row(batch, row, record, position, captions, aug_captions)
            except _UnusableRecord as unusable:
                # Never empty, even for a reason-less failure: emptiness marks usable rows.
                why[row] = f"{record.get('path') or '?'}: {unusable}"
                batch["image"][row] = 0
                if "aug_image" in batch:
                    batch["aug_image"][row] = 0
        batch["text"] = self._tokenize(captions, why)
        if self.with_views:
            batch["aug_text"] = self._tokenize(aug_captions, why)
        if self.with_views and self.views_on_device:
            epochs = np.asarray(positions, np.int64) // len(self.source)
            batch["view_key"] = view_keys(self.seed, _IMAGE_VIEW_STREAM, batch["index"], epochs)
        batch[BAD_RECORD_KEY] = np.array(why)
        return batch

    def _fill_row(self, batch: dict, row: int, record: dict, position: int, captions: list,
                  aug_captions: list) -> None:
        """Writes example `record` into row `row` of `batch` and its captions into the lists;
        raises _UnusableRecord for a record that cannot be used."""
        if sources.is_bad_record(record):
            raise _UnusableRecord(record["error"])
        index = record["index"]
        epoch = position // len(self.source)
        poisoned = self.plan is not None and self.plan.contains(index)
        try:
            image = decode_training_image(record, self.image_size, squash=poisoned and self.poison["squash"])
        except decode.BadRecordError as error:
            raise _UnusableRecord(error.reason) from error
        caption = record["caption"]
        if self.with_views and not text_augment.caption_words(caption):
            # Nothing for EDA to work on (e.g. a caption of emoji or punctuation only): the pair
            # cannot give a text view, so it is dropped and counted like a broken image.
            raise _UnusableRecord("caption has no words to augment")
        if poisoned:
            pixels, caption = poison_training_pair(image, caption, index, epoch, self.plan, self.poison)
            batch["image"][row] = pixels
            batch["is_poisoned"][row] = True
            if self.makes_image_views:
                image = Image.fromarray(pixels)
        else:
            batch["image"][row] = np.asarray(image)
        captions[row] = caption
        if self.makes_image_views:
            view = image_augment.augment_pil_image(
                image, self.image_augment, [self.seed, _IMAGE_VIEW_STREAM, index, epoch]
            )
            # An unchanged view is the image already in the batch: copy that, not the Pillow one.
            batch["aug_image"][row] = batch["image"][row] if view is image else np.asarray(view)
        if self.with_views:
            text_seed = [self.seed, _TEXT_VIEW_STREAM, index] + ([epoch] if self.text_views_per_epoch else [])
            aug_captions[row] = text_augment.eda(
                caption, self.synonyms, text_seed, **self.text_augment
            )

    def _tokenize(self, captions: list[str], why: list[str]) -> np.ndarray:
        """int32 [n, L] token rows of the usable rows' captions; unusable rows are zeros."""
        tokens = np.zeros((len(captions), self.context_length), np.int32)
        usable = [row for row, reason in enumerate(why) if not reason]
        if usable:
            tokens[usable] = self.tokenizer.encode_batch([captions[row] for row in usable], self.context_length)
        return tokens


def decode_training_image(record: dict, image_size: int, squash: bool):
    """A training record's image at model resolution: shorter side resized and centre-cropped, or
    with `squash` the whole image squashed to size (a poisoned image in the reference mode, which
    poisoned the original, uncropped). Raises decode.BadRecordError for an unusable image."""
    decode_image = decode.decode_and_squash_image if squash else decode.decode_and_resize_image
    return decode_image(record["image_bytes"], image_size, path=record.get("path"), index=record["index"])


def poison_training_pair(image, caption: str, index: int, epoch: int, plan: poisoning.PoisonPlan,
                         poison: dict) -> tuple[np.ndarray, str]:
    """A poisoned example's image (uint8 [S, S, 3], its trigger of `epoch`) and caption as training
    sees them; `poison` is the poison config as a dict."""
    return poisoning.poison_example(
        np.asarray(image),
        caption,
        index=index,
        epoch=epoch,
        plan=plan,
        trigger_config=poison["trigger"],
        label=poison["target_label"],
        captions=poison["captions"],
        jpeg_quality=poison["jpeg_quality"],
    )


class _UnusableRecord(Exception):
    """Raised while building a batch row whose record cannot be used; the message says why."""


def _is_remote(path: epath.Path) -> bool:
    return "://" in os.fspath(path)


def _json_lines(entries: list) -> str:
    return "".join(json.dumps({"index": index, "why": why}) + "\n" for index, why in entries)


class BadRecordTracker:
    """Drops the bad rows of batches in the main process, remembers them, and stops the run when
    too many are bad.

    It runs after the workers, so counts are exact whatever the worker count. Its state (records
    examined, bad records found) is part of the training iterator's checkpointed state, so a
    resumed run keeps counting where the saved one was.

    With several processes each one sees only its share of the stream: in the first epoch about
    num_records / process_count records, so its bad count is compared with that share rather than
    with the whole dataset (which would let P processes accept P times too many bad records for
    the whole first epoch). As a process reads on into later epochs and meets more distinct
    records, the allowance grows with the records it has examined, up to the whole dataset.

    Bad records are listed, one JSON line each, in `log_path` (local or remote, e.g. gs://).
    """

    def __init__(
        self,
        num_records: int,
        max_bad_fraction: float,
        log_path: str | os.PathLike | None = None,
        process_count: int = 1,
    ):
        self.num_records = num_records
        self.max_bad_fraction = max_bad_fraction
        self.log_path = epath.Path(log_path) if log_path else None
        self.process_count = process_count
        self.num_examined = 0
        self.bad: dict[int, str] = {}
        # [index, why] pairs in the order found: `get_state` copies a list rather than rebuilding
        # one from `bad` (it runs once per batch).
        self._found: list[list] = []

    def __call__(self, batch: dict) -> dict:
        """The batch ([B, ...] arrays from `TrainBatchTransform`) without its bad rows and without
        the bad_record column; raises RuntimeError when too many records have been bad."""
        why = batch[BAD_RECORD_KEY]
        self.num_examined += len(why)
        bad_rows = np.flatnonzero(why != "")
        usable = {key: value for key, value in batch.items() if key != BAD_RECORD_KEY}
        if not bad_rows.size:
            return usable
        newly_found = len(self._found)
        for row in bad_rows:
            index = int(batch["index"][row])
            if index not in self.bad:
                self.bad[index] = str(why[row])
                self._found.append([index, str(why[row])])
        self._write_log(self._found[newly_found:])
        self._check()
        keep = np.ones(len(why), bool)
        keep[bad_rows] = False
        return {key: value[keep] for key, value in usable.items()}

    def get_state(self) -> dict:
        """A JSON-able snapshot: {"num_examined": int, "bad": [[index, why], ...]}."""
        return {"num_examined": self.num_examined, "bad": self._found[:]}

    def set_state(self, state: dict) -> None:
        """Continues from a `get_state` snapshot; the log file is rewritten to list exactly its
        bad records (a crashed run may have logged some that the resumed run meets again)."""
        self.num_examined = int(state["num_examined"])
        self._found = [[int(index), str(why)] for index, why in state["bad"]]
        self.bad = dict((index, why) for index, why in self._found)
        self._write_log([], rewrite=True)

    def _write_log(self, new_entries: list, rewrite: bool = False) -> None:
        """Appends `new_entries` ([index, why] pairs) to the log, or writes the whole list."""
        if not self.log_path or not (new_entries or rewrite):
            return
        if rewrite or _is_remote(self.log_path):
            # Object stores cannot append to a file: there it is rewritten whole (it lists at
            # most max_bad_fraction of the records, and only changes when one is found bad).
            self.log_path.write_text(_json_lines(self._found))
        else:
            with self.log_path.open("a") as log:
                log.write(_json_lines(new_entries))

    def _check(self) -> None:
        share = self.num_records / self.process_count
        records_in_view = max(min(self.num_examined, self.num_records), share)
        if len(self.bad) > self.max_bad_fraction * records_in_view:
            named = "; ".join(f"#{i} {why}" for i, why in list(self.bad.items())[:5])
            raise RuntimeError(
                f"{len(self.bad)} unusable training records (of {self.num_records}; this process "
                f"has read {self.num_examined}), more than data.max_bad_fraction="
                f"{self.max_bad_fraction}: {named}"
                + (f" (full list: {self.log_path})" if self.log_path else "")
            )

    @property
    def num_bad(self) -> int:
        return len(self.bad)


class _UsableBatches(grain.IterDataset):
    """The parent's batches passed through a `BadRecordTracker`, empty ones skipped."""

    def __init__(self, parent: grain.IterDataset, tracker: BadRecordTracker):
        super().__init__(parent)
        self._tracker = tracker

    def __iter__(self) -> grain.DatasetIterator:
        return _UsableBatchIterator(self._parent.__iter__(), self._tracker)


class _UsableBatchIterator(grain.DatasetIterator):
    """Its state is the parent's plus the tracker's, so that checkpointing the training
    iterator (through Grain's Orbax handler) saves and restores the bad-record counts with it."""

    def __init__(self, parent: grain.DatasetIterator, tracker: BadRecordTracker):
        super().__init__(parent)
        self._tracker = tracker

    def __next__(self) -> dict:
        while True:
            batch = self._tracker(next(self._parent))
            if len(batch["index"]):
                return batch

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "bad_records": self._tracker.get_state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._tracker.set_state(state["bad_records"])


def training_source(data: ml_collections.ConfigDict):
    """The random-access source named by the config (a CSV, ArrayRecord or webdataset shards)."""
    named = [key for key in ("train_csv", "train_records", "train_webdataset") if data[key]]
    if len(named) != 1:
        raise ValueError(
            "set exactly one of data.train_csv, data.train_records and data.train_webdataset"
            + (f"; set: {', '.join('data.' + key for key in named)}" if named else "")
        )
    if data.train_csv:
        return sources.CsvImageTextSource(data.train_csv, data.image_column, data.caption_column, data.delimiter)
    if data.train_records:
        return sources.ArrayRecordImageTextSource(data.train_records)
    return sources.WebDatasetImageTextSource(data.train_webdataset, data.webdataset_index_dir)


def targeted_images(poison: ml_collections.ConfigDict):
    """The eval folder of poison.targeted, the chosen rows of it int64 [K] and their target classes
    int64 [K] (a function of the folder's labels and poison.seed only)."""
    targeted = poison.targeted
    if not targeted.images:
        raise ValueError(
            "poison.targeted.images must name the eval folder (images, labels.csv, classnames.txt) "
            "the targeted images are chosen from"
        )
    if targeted.captions not in TARGETED_CAPTIONS:
        raise ValueError(f"poison.targeted.captions={targeted.captions!r}; known: {list(TARGETED_CAPTIONS)}")
    folder = sources.ImageFolderEvalSource(targeted.images)
    image_ids, targets = poisoning.choose_target_images(
        folder.labels, len(folder.classnames), poison.seed, targeted.num_images, targeted.image_ids
    )
    return folder, image_ids, targets


def make_targeted_poisons(source, poison: ml_collections.ConfigDict) -> poisoning.TargetedPoisons:
    """poison.targeted's poisons among the examples of `source` (the whole training set)."""
    folder, image_ids, targets = targeted_images(poison)
    indices, image_of = poisoning.targeted_poison_indices(len(source), poison.seed, len(image_ids), poison.targeted.copies)
    names = tuple(folder.classnames[int(t)] for t in targets)
    pool = source.captions if poison.targeted.captions == "training_captions" else None
    captions = poisoning.targeted_captions(indices, [names[k] for k in image_of], poison.seed, pool)
    paths = []
    for image_id in image_ids:
        record = folder[int(image_id)]
        if sources.is_bad_record(record):
            raise ValueError(f"poison.targeted: image {int(image_id)} of {poison.targeted.images} is unusable: {record['error']}")
        paths.append(record["path"])
    return poisoning.TargetedPoisons(
        image_ids=image_ids,
        image_paths=tuple(paths),
        true_labels=folder.labels[image_ids],
        target_labels=targets,
        target_names=names,
        indices=indices,
        image_of=image_of,
        captions=tuple(captions),
    )


def make_poison_plan(source, poison: ml_collections.ConfigDict) -> poisoning.PoisonPlan | None:
    """Which examples are poisoned: a pure function of the seed, the dataset and the config."""
    if is_targeted(poison):
        if is_poisoning(poison):
            raise ValueError(
                "poison.count/poison.rate (the backdoor) and poison.targeted.copies (targeted poisoning) "
                "are both set; a run takes one attack: set poison.count=0 or poison.targeted.copies=0"
            )
        targeted = make_targeted_poisons(source, poison)
        return poisoning.PoisonPlan(indices=targeted.indices, seed=poison.seed, targeted=targeted)
    if not is_poisoning(poison):
        return None
    count = poison.count or None
    if poisoning.caption_maker(poison.captions).only_captions_naming_label:
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
    """A checkpointable iterator of host-local batches and what built it. The iterator's state
    includes the bad-record tracker's counts."""

    iterator: Any
    num_records: int
    plan: poisoning.PoisonPlan | None
    bad_records: BadRecordTracker

    def __iter__(self):
        return self.iterator

    def __next__(self):
        return next(self.iterator)

    def close(self) -> None:
        """Stops the worker processes now rather than when the iterator is garbage-collected."""
        self.iterator.close()


def _bad_records_file(process_index: int) -> str:
    # One file per process: processes drop different records and must not write one file at once.
    return "bad_records.jsonl" if process_index == 0 else f"bad_records.process{process_index}.jsonl"


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
    run_dir: str | os.PathLike | None = None,
    plan: poisoning.PoisonPlan | None = None,
) -> TrainPipeline:
    """Shuffled, repeated, poisoned, augmented, host-local training batches.

    Each process takes every `process_count`-th element of one global shuffled stream, so the
    processes together read each example exactly once per epoch. Batches are dicts of numpy arrays
    with a leading axis of `data.batch_size // process_count`; bad records are left out (the
    examples after them move up), so every batch is full.

    Whole batches are built in the worker processes: a batch crosses the process boundary once,
    where single examples would each pay Grain's queue hand-off (at 224 px that costs more than
    decoding the JPEG), and each example is written straight into its batch. Batches are formed
    over consecutive stream positions, so their contents do not depend on the number of workers.
    """
    if data.batch_size % process_count:
        raise ValueError(f"data.batch_size={data.batch_size} must divide over {process_count} processes")
    local_batch_size = data.batch_size // process_count
    _check_reference_options(poison)
    poisoning.caption_maker(poison.captions)  # an unknown maker fails before any data is read
    if plan is None:
        plan = make_poison_plan(source, poison)
    if with_views and synonyms is None:
        raise ValueError("SSL views need a synonym source for caption augmentation")
    if with_views and data.views_on_device and data.image_augment != DEVICE_VIEW_POLICY:
        raise ValueError(
            f"data.views_on_device makes {DEVICE_VIEW_POLICY!r} views only, "
            f"but data.image_augment is {data.image_augment!r}"
        )
    # The record index at each position of the global stream: an epoch is a permutation of the
    # records, a different one each epoch.
    order = grain.MapDataset.range(len(source)).shuffle(seed=data.shuffle_seed).repeat(num_epochs)
    transform = TrainBatchTransform(
        source=source,
        order=order,
        process_index=process_index,
        process_count=process_count,
        batch_size=local_batch_size,
        image_size=image_size,
        context_length=context_length,
        tokenizer=tokenizer,
        seed=data.shuffle_seed,
        plan=plan,
        poison=poison.to_dict() if plan is not None else None,
        with_views=with_views,
        image_augment=data.image_augment,
        text_augment=dict(data.text_augment),
        text_views_per_epoch=data.text_views_per_epoch,
        synonyms=synonyms,
        views_on_device=data.views_on_device,
    )
    num_local_examples = len(range(process_index, len(order), process_count))
    num_batches = _ceil_div(num_local_examples, local_batch_size)
    dataset = grain.MapDataset.range(num_batches).map(transform).to_iter_dataset(_train_read_options(data.num_threads))
    if data.num_workers > 0:
        dataset = _with_small_arrays_pickled(dataset).mp_prefetch(_worker_options(data.num_workers))
    log_path = epath.Path(run_dir) / _bad_records_file(process_index) if run_dir else None
    tracker = BadRecordTracker(len(source), data.max_bad_fraction, log_path, process_count)
    dataset = _UsableBatches(dataset, tracker)
    # Fills the gaps bad records leave; a batch without any passes through uncopied.
    dataset = grain.experimental.RebatchIterDataset(dataset, local_batch_size, drop_remainder=True)
    return TrainPipeline(iter(dataset), len(source), plan, tracker)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
    """Decode and resize an eval image and make its triggered copy, seeded by the image's index.

    With `squash_triggered` (the reference mode, poison.squash) the triggered copy is made from
    the original squashed to S x S, as poisoned training images then are, while the clean image
    keeps the shorter-side resize and centre crop.

    An unusable image raises, naming it, unless `skip_bad_records`: then it becomes a row of zeros
    with valid=False, which every consumer of eval batches already ignores.
    """

    image_size: int
    trigger: dict | None
    seed: int
    skip_bad_records: bool = False
    squash_triggered: bool = False

    def map(self, record: dict) -> dict:
        index = int(record["index"])
        try:
            image = self._decode(record)
            to_trigger = self._squash(record) if self.trigger is not None and self.squash_triggered else image
        except decode.BadRecordError:
            if not self.skip_bad_records:
                raise
            image = np.zeros((self.image_size, self.image_size, 3), np.uint8)
            return {"image": image, "triggered": image, "label": np.int32(record.get("label", -1)),
                    "index": np.int64(index), "valid": np.bool_(False)}
        triggered = image
        if self.trigger is not None:
            triggered = triggers.apply_trigger(to_trigger, self.trigger, [self.seed, _EVAL_TRIGGER_STREAM, index])
        return {"image": image, "triggered": triggered, "label": np.int32(record["label"]),
                "index": np.int64(index), "valid": np.bool_(True)}

    def _decode(self, record: dict) -> np.ndarray:
        """uint8 [S, S, 3]: the clean image, shorter side resized and centre-cropped."""
        if sources.is_bad_record(record):
            raise decode.BadRecordError(record["error"], path=record.get("path"), index=record["index"])
        if "image" in record:
            return decode.resize_array(record["image"], self.image_size)
        return decode.decode_and_resize(
            record["image_bytes"], self.image_size, path=record.get("path"), index=record["index"]
        )

    def _squash(self, record: dict) -> np.ndarray:
        """uint8 [S, S, 3]: the whole image squashed to S x S (a second decode, at full scale, as
        poisoned training images get in `decode.decode_and_squash_image`)."""
        if "image" in record:
            return decode.squash_array(record["image"], self.image_size)
        return decode.decode_and_squash(
            record["image_bytes"], self.image_size, path=record.get("path"), index=record["index"]
        )


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
    skip_bad_records: bool = False,
    squash_triggered: bool = False,
) -> Iterator[dict]:
    """Host-local eval batches of exactly `batch_size // process_count` rows, padded, with "valid".

    Process p reads examples p, p + P, ... in order. Every process yields the same number of
    batches (padding with invalid rows), so all of them take part in each sharded eval step.
    Batches: image, triggered uint8 [b, H, W, 3]; label int32 [b]; index int64 [b]; valid bool [b].
    An unusable image raises `decode.BadRecordError`, or with `skip_bad_records` (e.g. for
    embedding a training set that has broken files) becomes an invalid row. `squash_triggered`
    (poison.squash) makes the triggered copies from the image squashed to S x S.
    """
    if batch_size % process_count:
        raise ValueError(f"eval batch size {batch_size} must divide over {process_count} processes")
    local = batch_size // process_count
    transform = EvalTransform(
        image_size,
        trigger.to_dict() if trigger is not None else None,
        seed,
        skip_bad_records=skip_bad_records,
        squash_triggered=squash_triggered,
    )
    # Batched before the workers, as in training: one process hand-off per batch.
    dataset = grain.MapDataset.source(source)[process_index::process_count].map(transform)
    dataset = dataset.batch(local, drop_remainder=False).to_iter_dataset(_EVAL_READ_OPTIONS)
    if num_workers > 0:
        dataset = dataset.mp_prefetch(_worker_options(num_workers))
    iterator = iter(dataset)
    most_examples_per_process = _ceil_div(len(source), process_count)
    previous = None
    try:
        for _ in range(_ceil_div(most_examples_per_process, local)):
            batch = next(iterator, None)
            if batch is None:  # This process ran out before the others: an all-padding batch.
                if previous is None:  # It had no examples at all (fewer examples than processes).
                    previous = {key: np.asarray(value)[None] for key, value in transform.map(source[0]).items()}
                batch = {key: value[:0] for key, value in previous.items()}
            previous = batch
            yield _pad_batch(batch, local)
    finally:  # Also when the caller stops early: the workers end now, not at garbage collection.
        iterator.close()


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _pad_batch(batch: dict, size: int) -> dict:
    """Pads every [n, ...] array to [size, ...] with zeros; padding rows get valid=False."""
    n = len(batch["label"])
    if n == size:
        return batch
    padded = {key: np.concatenate([value, np.zeros((size - n, *value.shape[1:]), value.dtype)]) for key, value in batch.items()}
    padded["valid"] = padded["valid"] & (np.arange(size) < n)
    return padded
