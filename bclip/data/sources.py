"""Grain random-access data sources: image-caption pairs from a CSV, ArrayRecord shards or
img2dataset's webdataset tar shards, and labelled evaluation sets from an image folder or TFDS.

Sources return encoded image bytes; decoding happens later in the pipeline with
`bclip.data.decode.decode_and_resize`. Every source is picklable (it holds paths and packed
columns and opens files lazily), as Grain's worker processes require.

Image-caption records are {"image_bytes": bytes, "caption": str, "index": int, "path": str};
evaluation records are {"image_bytes": bytes, "label": int, "index": int, "path": str}.
A training example whose data is unusable comes back as a *bad record*
{"error": why, "index": int, "path": str} instead of raising, so one broken file neither
stops a run nor shifts the indices of the examples after it.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from typing import Any, SupportsIndex

import grain
import numpy as np

from bclip.data import records, webdataset_index

Record = dict[str, Any]


def is_bad_record(record: Record) -> bool:
    """True for the {"error", "index", "path"} records sources return for unusable data."""
    return "error" in record


def _bad_record(reason: str, index: int, path: str) -> Record:
    return {"error": reason, "index": index, "path": path}


def _checked_index(index: SupportsIndex, length: int) -> int:
    index = index.__index__()
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a source of {length} examples")
    return index


# ----------------------------------------------------------------------------- image-text


class CsvImageTextSource:
    """Image-caption pairs listed in a CSV (image paths relative to the CSV's folder).

    The CSV is read once, here; image files are read on access. A missing or unreadable
    image, or an empty caption, gives a bad record.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        image_column: str = "image",
        caption_column: str = "caption",
        delimiter: str = ",",
    ):
        self._table = records.read_image_text_csv(csv_path, image_column, caption_column, delimiter)

    def __len__(self) -> int:
        return len(self._table)

    @property
    def captions(self) -> Sequence[str]:
        """Every row's caption, in index order, as written in the CSV (for poison selection)."""
        return self._table.captions

    def __getitem__(self, index: SupportsIndex) -> Record:
        index = _checked_index(index, len(self))
        path = self._table.resolved_image_path(index)
        caption = self._table.captions[index].strip()
        if not caption:
            return _bad_record("empty caption", index, path)
        image_bytes, reason = records.read_image_file(path)
        if image_bytes is None:
            return _bad_record(reason, index, path)
        return {"image_bytes": image_bytes, "caption": caption, "index": index, "path": path}

    def __repr__(self) -> str:
        return f"CsvImageTextSource({self._table.csv_path!r}, {len(self)} rows)"


def _expand_shard_paths(paths_or_glob: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(paths_or_glob, (str, os.PathLike)):
        pattern = os.fspath(paths_or_glob)
        if os.path.isdir(pattern):
            pattern = os.path.join(pattern, f"{records.SHARD_PREFIX}-*.array_record")
        # Shard names are zero-padded, so name order is record order.
        paths = sorted(os.path.abspath(p) for p in glob.glob(pattern))
        if not paths:
            raise FileNotFoundError(f"no ArrayRecord shards match {pattern}")
        return paths
    paths = [os.path.abspath(p) for p in paths_or_glob]
    if not paths:
        raise ValueError("no ArrayRecord shard paths given")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"ArrayRecord shard(s) not found: {missing[:5]}")
    return paths


class ArrayRecordImageTextSource:
    """Image-caption pairs from shards written by `records.convert_csv_to_array_record`.

    Accepts a folder of shards, a glob pattern, or an explicit list of shard paths. Index i
    is the i-th record over the shards in order. A record that fails to parse, or has an
    empty caption, gives a bad record.
    """

    def __init__(self, paths_or_glob: str | os.PathLike | Sequence[str | os.PathLike]):
        self._paths = _expand_shard_paths(paths_or_glob)
        # Grain's source counts the records now and opens readers lazily (also after being
        # pickled into a worker).
        self._records = grain.sources.ArrayRecordDataSource(self._paths)
        self._captions: records.PackedStrings | None = None

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def __len__(self) -> int:
        return len(self._records)

    @property
    def captions(self) -> Sequence[str]:
        """Every record's caption, in index order (for poison selection).

        Read from the shards' caption sidecars; shards without one are read in full once.
        """
        if self._captions is None:
            captions = records.PackedStrings(
                caption for shard in self._paths for caption in records.read_shard_captions(shard)
            )
            if len(captions) != len(self):
                raise ValueError(
                    f"caption sidecars list {len(captions)} captions for {len(self)} records"
                )
            self._captions = captions
        return self._captions

    def __getitem__(self, index: SupportsIndex) -> Record:
        index = _checked_index(index, len(self))
        try:
            record = records.decode_image_text_record(self._records[index])
        except ValueError as error:  # includes UnicodeDecodeError
            return _bad_record(f"malformed record: {error}", index, self._location(index))
        path = record.source_path or self._location(index)
        caption = record.caption.strip()
        if not caption:
            return _bad_record("empty caption", index, path)
        if not record.image_bytes:
            return _bad_record("empty image bytes", index, path)
        return {"image_bytes": record.image_bytes, "caption": caption, "index": index, "path": path}

    def _location(self, index: int) -> str:
        return f"record {index} of {os.path.dirname(self._paths[0])}"

    def __repr__(self) -> str:
        return f"ArrayRecordImageTextSource({len(self._paths)} shards, {len(self)} records)"


class WebDatasetImageTextSource:
    """Image-caption pairs from webdataset tar shards as img2dataset writes them ({key}.jpg|png|webp
    and {key}.txt members), read by random access through each shard's index
    (`webdataset_index.load_shard_index`: made on first use, beside the shards or in `index_dir`).

    Accepts a folder, a brace pattern ('/data/cc3m/{00000..00331}.tar'), a glob, or a list of
    those. Index i is the i-th sample over the shards in name order, each shard's samples in tar
    order. A sample without an image or a caption, with an empty one, or lost to a truncated shard
    gives a bad record whose path names the shard and the key.
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], index_dir: str | os.PathLike = ""):
        self._paths = webdataset_index.expand_shard_pattern(shards)
        indexes = [webdataset_index.load_shard_index(path, index_dir) for path in self._paths]
        # Per sample, packed as the CSV source's columns are: Grain pickles the source into workers.
        self._ends = np.cumsum([len(index) for index in indexes], dtype=np.int64)
        self._offsets = np.concatenate([index.image_offsets for index in indexes])
        self._sizes = np.concatenate([index.image_sizes for index in indexes])
        self._keys = records.PackedStrings(key for index in indexes for key in index.keys)
        self._extensions = records.PackedStrings(ext for index in indexes for ext in index.image_extensions)
        self._captions = records.PackedStrings(caption for index in indexes for caption in index.captions)
        problems = [problem for index in indexes for problem in index.problems]
        self._problems = {i: problem for i, problem in enumerate(problems) if problem}

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def __len__(self) -> int:
        return int(self._ends[-1])

    @property
    def captions(self) -> Sequence[str]:
        """Every sample's caption, in index order ("" for an unusable one), for poison selection."""
        return self._captions

    def location(self, index: int) -> str:
        """Shard and key of sample `index`: /data/cc3m/00000.tar/000000123.jpg."""
        shard = self._paths[int(np.searchsorted(self._ends, index, side="right"))]
        extension = self._extensions[index]
        return f"{shard}/{self._keys[index]}" + (f".{extension}" if extension else "")

    def __getitem__(self, index: SupportsIndex) -> Record:
        index = _checked_index(index, len(self))
        path = self.location(index)
        if index in self._problems:
            return _bad_record(self._problems[index], index, path)
        shard = self._paths[int(np.searchsorted(self._ends, index, side="right"))]
        size = int(self._sizes[index])
        try:
            with open(shard, "rb") as handle:
                handle.seek(int(self._offsets[index]))
                image_bytes = handle.read(size)
        except OSError as error:
            return _bad_record(f"cannot read shard: {error}", index, path)
        if len(image_bytes) != size:
            return _bad_record("image member cut short: the shard changed since it was indexed", index, path)
        return {"image_bytes": image_bytes, "caption": self._captions[index].strip(), "index": index, "path": path}

    def __repr__(self) -> str:
        return f"WebDatasetImageTextSource({len(self._paths)} shards, {len(self)} samples)"


# ----------------------------------------------------------------------------- evaluation


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"evaluation file not found: {path}")
    with open(path, encoding="utf-8-sig") as handle:
        return [line.strip() for line in handle.read().splitlines()]


def _read_classnames(path: str) -> list[str]:
    names = _read_lines(path)
    while names and not names[-1]:
        names.pop()
    blank = [line_number + 1 for line_number, name in enumerate(names) if not name]
    if blank:
        raise ValueError(f"{path}: blank class name on line(s) {blank[:10]}")
    if not names:
        raise ValueError(f"{path} lists no class names")
    return names


def _check_templates(templates: Sequence[str], where: str) -> list[str]:
    templates = list(templates)
    if not templates:
        raise ValueError(f"{where}: no prompt templates")
    without_slot = [t for t in templates if "{}" not in t]
    if without_slot:
        raise ValueError(f"{where}: template(s) without a '{{}}' slot: {without_slot[:5]}")
    return templates


class ImageFolderEvalSource:
    """A labelled evaluation set in a folder: images, labels.csv (image,label),
    classnames.txt (line i names class i) and templates.txt (one prompt per line with "{}").

    Everything is checked here, before evaluation starts: the three files exist, labels are
    integers in [0, number of classes), every listed image exists, templates have a slot.

    Attributes:
      classnames: list of class names, index = class id.
      templates: list of prompt templates.
      labels: int64 [N] label of each example.
    """

    def __init__(self, folder: str | os.PathLike):
        self._folder = os.path.abspath(folder)
        if not os.path.isdir(self._folder):
            raise FileNotFoundError(f"evaluation folder not found: {self._folder}")
        self.classnames = _read_classnames(os.path.join(self._folder, "classnames.txt"))
        templates_path = os.path.join(self._folder, "templates.txt")
        self.templates = _check_templates(
            [t for t in _read_lines(templates_path) if t], templates_path
        )
        labels_path = os.path.join(self._folder, "labels.csv")
        columns = records.read_csv_columns(labels_path, ["image", "label"])
        self.labels = self._parse_labels(columns["label"], labels_path)
        self._image_paths = records.PackedStrings(columns["image"])
        missing = [
            rel for rel in columns["image"] if not rel or not os.path.isfile(self._resolve(rel))
        ]
        if missing:
            raise FileNotFoundError(
                f"{labels_path}: {len(missing)} listed image(s) not found in {self._folder}, "
                f"e.g. {missing[:5]}"
            )

    def _parse_labels(self, values: list[str], labels_path: str) -> np.ndarray:
        labels = np.empty(len(values), dtype=np.int64)
        for row, value in enumerate(values):
            try:
                labels[row] = int(value)
            except ValueError:
                raise ValueError(
                    f"{labels_path}: data row {row} has label {value!r}, not an integer"
                ) from None
        outside = np.flatnonzero((labels < 0) | (labels >= len(self.classnames)))
        if outside.size:
            row = int(outside[0])
            raise ValueError(
                f"{labels_path}: {outside.size} label(s) outside [0, {len(self.classnames)}) "
                f"(the classes in classnames.txt), first at data row {row}: {labels[row]}"
            )
        return labels

    def _resolve(self, relative: str) -> str:
        return os.path.join(self._folder, relative)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: SupportsIndex) -> Record:
        index = _checked_index(index, len(self))
        path = self._resolve(self._image_paths[index])
        image_bytes, reason = records.read_image_file(path)
        if image_bytes is None:
            return _bad_record(reason, index, path)
        return {"image_bytes": image_bytes, "label": int(self.labels[index]), "index": index, "path": path}

    def __repr__(self) -> str:
        return f"ImageFolderEvalSource({self._folder!r}, {len(self)} images, {len(self.classnames)} classes)"


_WORDNET_ID = re.compile(r"n\d{8}")


class TfdsEvalSource:
    """A labelled evaluation split of a TFDS dataset, read by random access from its
    ArrayRecord files (what `tfds.data_source` does: builder + `as_data_source`).

    Images come back as the encoded bytes TFDS stored, so they go through the same
    `decode_and_resize` as every other source.

    Args:
      name: TFDS name, e.g. "imagenet2012", "cifar10", "cifar100".
      split: e.g. "validation", "test", "validation[:1000]".
      templates: prompt templates with a "{}" slot.
      classnames: class names, index = class id. Defaults to the dataset's label names with
        "_" read as a space; required for imagenet2012, whose label names are WordNet ids.
      data_dir: TFDS data folder (default: TFDS's own default).
      manual_dir: folder holding manually downloaded archives (imagenet2012's tars).
      download: prepare the dataset (download and/or convert) if it is not prepared yet.
      image_key, label_key: feature names of the image and the class label.
    """

    def __init__(
        self,
        name: str,
        split: str,
        templates: Sequence[str],
        *,
        classnames: Sequence[str] | None = None,
        data_dir: str | os.PathLike | None = None,
        manual_dir: str | os.PathLike | None = None,
        download: bool = True,
        image_key: str = "image",
        label_key: str = "label",
    ):
        # Imported on use: most runs never touch TFDS, and preparing a dataset pulls in TF.
        import tensorflow_datasets as tfds

        self._name = name
        self._split = split
        self._image_key = image_key
        self._label_key = label_key
        builder = tfds.builder(
            name, data_dir=None if data_dir is None else os.fspath(data_dir), file_format="array_record"
        )
        if not builder.is_prepared():
            if not download:
                raise FileNotFoundError(
                    f"TFDS dataset {name} is not prepared in {builder.data_dir} and download=False"
                )
            config = tfds.download.DownloadConfig(
                manual_dir=None if manual_dir is None else os.fspath(manual_dir)
            )
            builder.download_and_prepare(download_config=config)
        # The prepared folder is enough to reopen the data in a Grain worker, without the
        # builder's Python class.
        self._builder_dir = os.fspath(builder.data_dir)

        features = builder.info.features
        for key in (image_key, label_key):
            if key not in features:
                raise KeyError(f"{name} has no feature {key!r}; features: {list(features.keys())}")
        label_names = list(getattr(features[label_key], "names", None) or [])
        if not label_names:
            raise ValueError(f"{name}: feature {label_key!r} is not a class label with names")
        if classnames is None:
            if all(_WORDNET_ID.fullmatch(n) for n in label_names):
                raise ValueError(
                    f"{name}'s label names are WordNet ids ({label_names[0]}, ...); pass "
                    "human-readable `classnames` for zero-shot prompts"
                )
            classnames = [n.replace("_", " ") for n in label_names]
        elif len(classnames) != len(label_names):
            raise ValueError(
                f"{len(classnames)} classnames given, {name} has {len(label_names)} classes"
            )
        self.classnames = list(classnames)
        self.templates = _check_templates(templates, f"TfdsEvalSource({name})")
        self._data_source = None
        self._length = len(self._examples())

    def _examples(self):
        if self._data_source is None:
            import tensorflow_datasets as tfds

            builder = tfds.builder_from_directory(self._builder_dir)
            self._data_source = builder.as_data_source(
                split=self._split, decoders={self._image_key: tfds.decode.SkipDecoding()}
            )
        return self._data_source

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_data_source"] = None
        return state

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: SupportsIndex) -> Record:
        index = _checked_index(index, len(self))
        example = self._examples()[index]
        return {
            "image_bytes": bytes(example[self._image_key]),
            "label": int(example[self._label_key]),
            "index": index,
            "path": f"{self._name}:{self._split}[{index}]",
        }

    def __repr__(self) -> str:
        return f"TfdsEvalSource({self._name!r}, {self._split!r}, {len(self)} examples)"
