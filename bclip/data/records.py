"""On-disk formats of image-caption data: the CSV index, the binary ArrayRecord layout, and
the conversion from one to the other (also a command line tool).

Convert a CSV dataset, or img2dataset's webdataset shards, into shards:
  python -m bclip.data.records --csv /data/cc3m/train.csv --out /data/cc3m_ar --num_shards 64
  python -m bclip.data.records --webdataset '/data/cc3m/{00000..00331}.tar' --out /data/cc3m_ar --num_shards 64
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import os
import struct
import sys
from collections.abc import Callable, Iterable, Sequence

import numpy as np

# Record layout: magic, caption length, source-path length (little-endian uint32), then the
# UTF-8 caption, the UTF-8 source path and the image file's bytes up to the end. No pickle,
# no protobuf: any language can read it.
RECORD_MAGIC = b"BCR1"
_HEADER = struct.Struct("<4sII")

SHARD_PREFIX = "data"
SKIPPED_FILENAME = "skipped.txt"

# One record per group keeps random access cheap (Grain reads single records), and the
# payload is already-compressed image data, so ArrayRecord's compression would only cost CPU.
_WRITER_OPTIONS = "group_size:1,uncompressed"


# ----------------------------------------------------------------------------- CSV index


class PackedStrings(Sequence[str]):
    """An immutable list of strings stored as one UTF-8 blob plus offsets.

    Millions of short Python strings cost ~60 bytes each of overhead and pickle slowly;
    Grain pickles every data source into each worker process, so the CSV columns are packed.
    """

    def __init__(self, strings: Iterable[str]):
        encoded = [s.encode("utf-8") for s in strings]
        self._blob = b"".join(encoded)
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} strings")
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._blob[start:end].decode("utf-8")


def read_csv_columns(
    csv_path: str | os.PathLike, columns: Sequence[str], delimiter: str = ","
) -> dict[str, list[str]]:
    """Reads the named columns of a CSV file with a header row (values are never evaluated).

    A row too short to have a column yields "" for it, so row numbers never shift.

    Raises:
      FileNotFoundError: the CSV does not exist.
      ValueError: the file has no header, or lacks one of `columns` (the message lists the
        columns it does have).
    """
    csv_path = os.fspath(csv_path)
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"CSV file not found: {csv_path}")
    # utf-8-sig drops the byte-order mark spreadsheet programs put before the header.
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        found = reader.fieldnames
        if not found:
            raise ValueError(f"{csv_path} is empty: expected a header row with {list(columns)}")
        missing = [c for c in columns if c not in found]
        if missing:
            raise ValueError(
                f"{csv_path} has no column(s) {missing}; columns found: {list(found)} "
                f"(delimiter {delimiter!r})"
            )
        values: dict[str, list[str]] = {c: [] for c in columns}
        for row in reader:
            for column in columns:
                values[column].append(row.get(column) or "")
    return values


@dataclasses.dataclass(frozen=True)
class ImageTextTable:
    """The rows of an image-caption CSV.

    Attributes:
      csv_path: the CSV file, absolute.
      image_paths: image paths as written in the CSV (relative to the CSV's folder).
      captions: captions as written in the CSV.
    """

    csv_path: str
    image_paths: PackedStrings
    captions: PackedStrings

    def __len__(self) -> int:
        return len(self.captions)

    def resolved_image_path(self, index: int) -> str:
        """The image path of row `index`, joined to the CSV's folder (absolute paths stay)."""
        relative = self.image_paths[index]
        if not relative:
            return ""
        return os.path.join(os.path.dirname(self.csv_path), relative)


def read_image_text_csv(
    csv_path: str | os.PathLike,
    image_column: str = "image",
    caption_column: str = "caption",
    delimiter: str = ",",
) -> ImageTextTable:
    """Reads an image-caption CSV; see `read_csv_columns` for the errors it raises."""
    columns = read_csv_columns(csv_path, [image_column, caption_column], delimiter)
    return ImageTextTable(
        # Absolute, so the table means the same thing in a worker with another cwd.
        csv_path=os.path.abspath(csv_path),
        image_paths=PackedStrings(columns[image_column]),
        captions=PackedStrings(columns[caption_column]),
    )


def read_image_file(path: str) -> tuple[bytes | None, str | None]:
    """Returns (file bytes, None), or (None, why) when the file cannot be used as an image."""
    if not path:
        return None, "no image path in the CSV row"
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None, "image file not found"
    except OSError as error:
        return None, f"cannot read image file: {error}"
    if not data:
        return None, "image file is empty"
    return data, None


# ----------------------------------------------------------------------------- record layout


@dataclasses.dataclass(frozen=True)
class ImageTextRecord:
    """One decoded ArrayRecord entry: encoded image bytes, caption, and where it came from."""

    image_bytes: bytes
    caption: str
    source_path: str


def encode_image_text_record(image_bytes: bytes, caption: str, source_path: str = "") -> bytes:
    """Serialises one image-caption pair into the binary record layout."""
    caption_bytes = caption.encode("utf-8")
    path_bytes = source_path.encode("utf-8")
    header = _HEADER.pack(RECORD_MAGIC, len(caption_bytes), len(path_bytes))
    return b"".join([header, caption_bytes, path_bytes, image_bytes])


def decode_image_text_record(record: bytes) -> ImageTextRecord:
    """Parses a record written by `encode_image_text_record`.

    Raises:
      ValueError: the bytes are not a record of this layout (wrong magic or lengths).
    """
    if len(record) < _HEADER.size:
        raise ValueError(f"record of {len(record)} bytes is shorter than its header")
    magic, caption_length, path_length = _HEADER.unpack_from(record)
    if magic != RECORD_MAGIC:
        raise ValueError(f"record starts with {magic!r}, expected {RECORD_MAGIC!r}")
    caption_start = _HEADER.size
    path_start = caption_start + caption_length
    image_start = path_start + path_length
    if image_start > len(record):
        raise ValueError(f"record of {len(record)} bytes is shorter than its header says")
    view = memoryview(record)
    return ImageTextRecord(
        image_bytes=bytes(view[image_start:]),
        caption=bytes(view[caption_start:path_start]).decode("utf-8"),
        source_path=bytes(view[path_start:image_start]).decode("utf-8"),
    )


# ----------------------------------------------------------------------------- conversion


def shard_path(out_dir: str | os.PathLike, shard: int, num_shards: int) -> str:
    """out_dir/data-00003-of-00016.array_record."""
    name = f"{SHARD_PREFIX}-{shard:05d}-of-{num_shards:05d}.array_record"
    return os.path.join(os.fspath(out_dir), name)


def captions_path(shard: str) -> str:
    """The captions sidecar of a shard: its captions in record order, one JSON string a line.

    Poison selection needs every caption; the sidecar gives them without reading the images.
    """
    return shard + ".captions.jsonl"


def read_shard_captions(shard: str) -> list[str]:
    """The captions of one shard, from its sidecar if present, else from the records."""
    sidecar = captions_path(shard)
    if os.path.isfile(sidecar):
        with open(sidecar, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(shard)
    try:
        captions = []
        for record in reader.read_all():
            try:
                captions.append(decode_image_text_record(record).caption)
            except ValueError:
                captions.append("")  # the source reports this record as bad
        return captions
    finally:
        reader.close()


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    """What `convert_csv_to_array_record` wrote.

    Attributes:
      shard_paths: the shards, in record order.
      num_written: records written over all shards.
      skipped: (CSV row, image path, reason) of every row left out.
    """

    shard_paths: list[str]
    num_written: int
    skipped: list[tuple[int, str, str]]


def convert_csv_to_array_record(
    csv_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_shards: int,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    delimiter: str = ",",
    overwrite: bool = False,
) -> ConversionSummary:
    """Copies an image-caption CSV dataset into ArrayRecord shards.

    Image files are stored byte for byte (never re-encoded). Rows keep their CSV order:
    shard k holds a contiguous block of rows, so reading the shards in name order gives the
    CSV order minus skipped rows. Each shard gets a captions sidecar (`captions_path`). Rows whose image is missing/unreadable or whose caption is
    empty are skipped and listed in out_dir/skipped.txt (tab-separated: csv_row, path,
    reason; csv_row counts data rows from 0).

    Args:
      csv_path: CSV with a header naming `image_column` and `caption_column`.
      out_dir: output folder (created if needed).
      num_shards: number of shards to write (some may be empty for tiny datasets).
      overwrite: replace existing data-*.array_record shards in out_dir; otherwise their
        presence is an error, since a glob would mix old and new shards.

    Returns:
      A ConversionSummary.
    """
    table = read_image_text_csv(csv_path, image_column, caption_column, delimiter)

    def read_row(row: int) -> tuple[bytes | None, str, str, str | None]:
        relative_path = table.image_paths[row]
        caption = table.captions[row].strip()
        if not caption:
            return None, caption, relative_path, "empty caption"
        image_bytes, reason = read_image_file(table.resolved_image_path(row))
        return image_bytes, caption, relative_path, reason

    return write_array_record_shards(out_dir, num_shards, len(table), read_row, "csv_row", overwrite=overwrite)


def convert_webdataset_to_array_record(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    num_shards: int,
    *,
    index_dir: str | os.PathLike = "",
    overwrite: bool = False,
) -> ConversionSummary:
    """Copies img2dataset's webdataset tar shards (a folder, brace pattern or glob) into ArrayRecord
    shards, as `convert_csv_to_array_record` does a CSV: samples in the webdataset source's index
    order, images byte for byte, the samples it reports bad skipped and listed in skipped.txt by
    index (so the records' indices are the samples' less the skipped ones before them)."""
    from bclip.data import sources  # sources reads this module's record layout

    source = sources.WebDatasetImageTextSource(shards, index_dir)

    def read_row(row: int) -> tuple[bytes | None, str, str, str | None]:
        record = source[row]
        if sources.is_bad_record(record):
            return None, "", record["path"], record["error"]
        return record["image_bytes"], record["caption"], record["path"], None

    return write_array_record_shards(out_dir, num_shards, len(source), read_row, "index", overwrite=overwrite)


def write_array_record_shards(
    out_dir: str | os.PathLike,
    num_shards: int,
    num_rows: int,
    read_row: Callable[[int], tuple[bytes | None, str, str, str | None]],
    row_name: str,
    *,
    overwrite: bool = False,
) -> ConversionSummary:
    """Writes rows 0..num_rows-1 into `num_shards` shards of contiguous rows, in order.

    `read_row(row)` gives (image bytes, caption, source path, reason): a row with a reason is
    skipped and listed in out_dir/skipped.txt under the column name `row_name`.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    # Imported here so that reading records (in Grain workers) does not need the writer.
    from array_record.python.array_record_module import ArrayRecordWriter

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    existing = sorted(glob.glob(os.path.join(out_dir, f"{SHARD_PREFIX}-*.array_record")))
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {len(existing)} shard(s) (e.g. {existing[0]}); "
            "pass overwrite=True (--overwrite) to replace them"
        )
    for stale in existing:
        os.remove(stale)
        if os.path.isfile(captions_path(stale)):
            os.remove(captions_path(stale))

    boundaries = [num_rows * shard // num_shards for shard in range(num_shards + 1)]
    shard_paths = [shard_path(out_dir, shard, num_shards) for shard in range(num_shards)]
    skipped: list[tuple[int, str, str]] = []
    num_written = 0
    for shard, final_path in enumerate(shard_paths):
        # Write under a temporary name so an interrupted run never leaves a shard that looks
        # complete.
        partial_path = final_path + ".partial"
        writer = ArrayRecordWriter(partial_path, _WRITER_OPTIONS)
        shard_captions = []
        try:
            for row in range(boundaries[shard], boundaries[shard + 1]):
                image_bytes, caption, source_path, reason = read_row(row)
                if image_bytes is None:
                    skipped.append((row, source_path, reason))
                    continue
                writer.write(encode_image_text_record(image_bytes, caption, source_path))
                shard_captions.append(caption)
                num_written += 1
        finally:
            writer.close()
        with open(partial_path + ".captions", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(caption) + "\n" for caption in shard_captions)
        os.replace(partial_path + ".captions", captions_path(final_path))
        os.replace(partial_path, final_path)

    with open(os.path.join(out_dir, SKIPPED_FILENAME), "w", encoding="utf-8") as handle:
        handle.write(f"{row_name}\tpath\treason\n")
        for row, path, reason in skipped:
            handle.write(f"{row}\t{path}\t{reason}\n")
    return ConversionSummary(shard_paths=shard_paths, num_written=num_written, skipped=skipped)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert an image-caption CSV dataset, or img2dataset's webdataset shards, into ArrayRecord shards."
    )
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--csv", help="CSV with image and caption columns")
    given.add_argument("--webdataset", help="webdataset tar shards: folder, glob or brace pattern")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--num_shards", type=int, required=True)
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--caption_column", default="caption")
    parser.add_argument("--delimiter", default=",")
    parser.add_argument("--index_dir", default="", help="the webdataset shards' index folder (default: beside them)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards")
    args = parser.parse_args(argv)
    if args.csv:
        summary = convert_csv_to_array_record(
            args.csv,
            args.out,
            args.num_shards,
            image_column=args.image_column,
            caption_column=args.caption_column,
            delimiter=args.delimiter,
            overwrite=args.overwrite,
        )
    else:
        summary = convert_webdataset_to_array_record(
            args.webdataset, args.out, args.num_shards, index_dir=args.index_dir, overwrite=args.overwrite
        )
    print(
        f"wrote {summary.num_written} records to {len(summary.shard_paths)} shard(s) in "
        f"{args.out}; skipped {len(summary.skipped)} (see {SKIPPED_FILENAME})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
