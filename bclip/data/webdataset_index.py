"""Random access into webdataset tar shards as img2dataset writes them: `00000.tar` holding
`{key}.jpg|png|webp`, `{key}.txt` (caption) and `{key}.json` (metadata), next to `00000_stats.json`.

Each shard is read once, header by header, into an index (the byte range of each sample's image
member, its caption, and what is wrong with it), stored as plain JSON next to the shard or in an
index folder; training then reads single images by offset, with no second copy of the dataset.
Samples keep the shards' name order and, within a shard, the order of their first member.

Index shards ahead of a run (optional: a run indexes the shards it lacks an index for):
  python -m bclip.data.webdataset_index --shards '/data/cc3m/{00000..00331}.tar' --workers 8
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import re
import socket
import sys
import tarfile
from collections.abc import Sequence
from multiprocessing import pool as multiprocessing_pool

import numpy as np
from absl import logging

INDEX_FORMAT = "bclip-webdataset-index"
INDEX_VERSION = 1
INDEX_SUFFIX = ".index.json"
# A sample's image is its first member with one of these extensions, in this order.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
_TAR_BLOCK = 512

# ----------------------------------------------------------------------------- shard patterns

_BRACE_GROUP = re.compile(r"\{([^{}]*)\}")
_NUMERIC_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def expand_braces(pattern: str) -> list[str]:
    """'/d/{00000..00002}.tar' -> ['/d/00000.tar', '/d/00001.tar', '/d/00002.tar'], as the shell
    and webdataset expand shard lists: `{a..b}` is an inclusive numeric range, zero-padded to the
    longer bound's width when a bound has a leading zero, and `{x,y}` lists alternatives."""
    match = _BRACE_GROUP.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise ValueError(f"unbalanced brace in shard pattern {pattern!r}")
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    numeric = _NUMERIC_RANGE.fullmatch(body)
    if numeric:
        first, last = numeric.groups()
        if int(first) > int(last):
            raise ValueError(f"shard pattern {pattern!r}: range {{{body}}} counts down")
        padded = any(re.match(r"-?0\d", bound) for bound in (first, last))
        width = max(len(first), len(last)) if padded else 0
        choices = [f"{n:0{width}d}" for n in range(int(first), int(last) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(
            f"shard pattern {pattern!r}: {{{body}}} is neither a range like {{00000..00331}} nor a "
            "list like {a,b}"
        )
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def expand_shard_pattern(patterns: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The tar shards named by a folder, a brace pattern, a glob, or a list of those: absolute
    paths, sorted and without repeats (zero-padded shard names sort in record order).

    A folder or a glob keeps only `.tar` files (img2dataset writes .parquet and _stats.json files,
    and bclip its indexes, beside them); a path without wildcards must exist.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    paths, missing = set(), []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        if "://" in pattern:
            raise ValueError(f"webdataset shards must be on a local or mounted filesystem, got {pattern!r}")
        for name in expand_braces(pattern):
            if os.path.isdir(name):
                name = os.path.join(name, "*.tar")
            if glob.has_magic(name):
                paths.update(p for p in glob.glob(name) if p.endswith(".tar") and os.path.isfile(p))
            elif os.path.isfile(name):
                paths.add(name)
            else:
                missing.append(name)
    if missing:
        raise FileNotFoundError(f"{len(missing)} webdataset shard(s) not found, e.g. {missing[:5]}")
    if not paths:
        raise FileNotFoundError(f"no .tar shards match {[os.fspath(p) for p in patterns]}")
    return sorted(os.path.abspath(p) for p in paths)


# ----------------------------------------------------------------------------- the index


@dataclasses.dataclass(frozen=True)
class ShardIndex:
    """One shard's samples, in order: per sample its key, its image member's byte range and
    extension, its caption, and `problems[i]`, non-empty when sample i is unusable (the reason).

    Attributes:
      shard: the shard's path.
      shard_size: its size in bytes when indexed (a shard of another size is indexed again).
      keys, image_extensions, captions, problems: lists of str [N].
      image_offsets, image_sizes: int64 [N] byte range of each image member (0, 0 if none).
    """

    shard: str
    shard_size: int
    keys: list[str]
    image_offsets: np.ndarray
    image_sizes: np.ndarray
    image_extensions: list[str]
    captions: list[str]
    problems: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def to_json(self) -> dict:
        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "shard": os.path.basename(self.shard),
            "shard_size": self.shard_size,
            "keys": self.keys,
            "image_offsets": self.image_offsets.tolist(),
            "image_sizes": self.image_sizes.tolist(),
            "image_extensions": self.image_extensions,
            "captions": self.captions,
            "problems": self.problems,
        }

    @classmethod
    def from_json(cls, record: dict, shard: str, where: str) -> ShardIndex:
        """Parses `to_json`'s dict read from file `where`; a foreign or damaged file is an error."""
        if not isinstance(record, dict) or record.get("format") != INDEX_FORMAT:
            raise ValueError(f"{where} is not a bclip webdataset index")
        if record.get("version") != INDEX_VERSION:
            raise ValueError(f"{where}: index version {record.get('version')}, this bclip reads {INDEX_VERSION}")
        columns = ("keys", "image_offsets", "image_sizes", "image_extensions", "captions", "problems")
        lengths = {column: len(record.get(column) or []) for column in columns}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{where}: index columns differ in length: {lengths}")
        return cls(
            shard=shard,
            shard_size=int(record["shard_size"]),
            keys=list(record["keys"]),
            image_offsets=np.asarray(record["image_offsets"], np.int64).reshape(-1),
            image_sizes=np.asarray(record["image_sizes"], np.int64).reshape(-1),
            image_extensions=list(record["image_extensions"]),
            captions=list(record["captions"]),
            problems=list(record["problems"]),
        )


def stats_path(shard: str) -> str:
    """img2dataset's per-shard statistics: /d/00000.tar -> /d/00000_stats.json."""
    return re.sub(r"\.tar$", "", shard) + "_stats.json"


def _written_count(shard: str) -> int | None:
    """How many samples img2dataset wrote into `shard` (its stats file's "successes"), or None
    without a stats file."""
    path = stats_path(shard)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            successes = json.load(handle)["successes"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not an img2dataset stats file with a 'successes' count ({error!r})") from None
    if not isinstance(successes, int) or successes < 0:
        raise ValueError(f"{path}: 'successes' is {successes!r}, not a count")
    return successes


def _split_member_name(name: str) -> tuple[str, str]:
    """'dir/000012.seg.png' -> ('dir/000012', 'seg.png'): webdataset's key is the member name up to
    the first dot of its last path component."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (extension.lower() if dot else "")


@dataclasses.dataclass
class _Sample:
    key: str
    members: dict = dataclasses.field(default_factory=dict)  # extension -> (offset, size)
    caption: str = ""
    problem: str = ""


def _read_members(handle, size: int) -> tuple[list[_Sample], str]:
    """The shard's samples in order of their first member, and how the tar is truncated ("" if
    it is whole)."""
    samples: dict[str, _Sample] = {}
    try:
        tar = tarfile.open(fileobj=handle, mode="r:")
    except tarfile.ReadError as error:
        return [], f"not a readable tar ({error})"
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, EOFError) as error:  # a damaged header, or no data after it
            return list(samples.values()), f"unreadable from byte {tar.offset} ({error})"
        if member is None:
            break
        if not member.isfile():
            continue
        key, extension = _split_member_name(member.name)
        sample = samples.setdefault(key, _Sample(key))
        if member.offset_data + member.size > size:
            sample.problem = f"member {member.name} is cut off by the end of the shard"
            return list(samples.values()), f"it ends inside member {member.name}"
        if extension in sample.members:
            sample.problem = sample.problem or f"two members named {key}.{extension}"
        sample.members.setdefault(extension, (member.offset_data, member.size))
        if extension == CAPTION_EXTENSION:
            try:
                sample.caption = tar.extractfile(member).read().decode("utf-8")
            except UnicodeDecodeError:
                sample.problem = sample.problem or "caption (.txt) is not UTF-8 text"
    # A whole tar ends with a zero block where tarfile stopped; a shard cut at a member boundary,
    # or inside or at a damaged header (both of which tarfile takes for the end), does not.
    handle.seek(tar.offset)
    if handle.read(_TAR_BLOCK) != bytes(_TAR_BLOCK):
        return list(samples.values()), f"no member header or end-of-archive block at byte {tar.offset} of {size}"
    return list(samples.values()), ""


def _sample_problem(sample: _Sample) -> str:
    if sample.problem:
        return sample.problem
    image = next((ext for ext in IMAGE_EXTENSIONS if ext in sample.members), None)
    if image is None:
        return f"no image member ({', '.join(IMAGE_EXTENSIONS)})"
    if sample.members[image][1] == 0:
        return f"empty image member {sample.key}.{image}"
    if CAPTION_EXTENSION not in sample.members:
        return f"no caption member ({sample.key}.{CAPTION_EXTENSION})"
    if not sample.caption.strip():
        return "empty caption"
    return ""


def scan_shard(shard: str) -> ShardIndex:
    """Reads a shard's tar headers (and its small caption members) into its index.

    A sample without an image or caption, with an empty one, or cut off by a truncated tar keeps
    its place with its problem. When the shard is truncated or holds fewer samples than its
    img2dataset stats file counts, the lost samples are placeholders with a problem at the end of
    the shard (at least one for a truncated shard, however many the stats file says otherwise),
    so that they count as bad records and a complete copy of the shard gives the same indices.
    """
    shard = os.fspath(shard)
    size = os.path.getsize(shard)
    with open(shard, "rb") as handle:
        if handle.read(2) == b"\x1f\x8b":
            raise ValueError(f"{shard} is gzip-compressed: random access needs uncompressed tar shards")
        handle.seek(0)
        samples, truncated = _read_members(handle, size)
    problems = [_sample_problem(sample) for sample in samples]
    if truncated and samples and problems[-1]:
        problems[-1] = f"{problems[-1]} (the shard is truncated: {truncated})"
    written = _written_count(shard)
    held, stats_name = len(samples), os.path.basename(stats_path(shard))
    if written is not None:
        lost = max(written - held, 0)
        counted = f"{stats_name} counts {written} samples, the tar holds {held}"
    else:
        # Something is lost unless the cut fell inside the last sample, but nothing says how much.
        lost = int(bool(truncated) and (not samples or not problems[-1]))
        counted = f"no {stats_name} says how many samples are lost"
    where = f"after key {samples[-1].key}" if samples else "before its first sample"
    why = f"truncated ({truncated})" if truncated else "short"
    for n in range(lost):
        samples.append(_Sample(f"<lost {n + 1} of {lost}>"))
        problems.append(f"sample lost: the shard is {why}, {where}; {counted}")

    image_ranges, image_extensions = [], []
    for sample, problem in zip(samples, problems):
        image = next((ext for ext in IMAGE_EXTENSIONS if ext in sample.members), "")
        image_ranges.append(sample.members[image] if image and not problem else (0, 0))
        image_extensions.append(image)
    ranges = np.asarray(image_ranges, np.int64).reshape(-1, 2)
    return ShardIndex(
        shard=shard,
        shard_size=size,
        keys=[sample.key for sample in samples],
        image_offsets=ranges[:, 0],
        image_sizes=ranges[:, 1],
        image_extensions=image_extensions,
        captions=[sample.caption if not problem else "" for sample, problem in zip(samples, problems)],
        problems=problems,
    )


def index_path(shard: str, index_dir: str | os.PathLike = "") -> str:
    """Where a shard's index lives: beside it (/d/00000.tar.index.json), or in `index_dir` under a
    name that also tells apart same-named shards of different folders."""
    if not index_dir:
        return shard + INDEX_SUFFIX
    folder = hashlib.sha256(os.path.dirname(os.path.abspath(shard)).encode("utf-8")).hexdigest()[:12]
    return os.path.join(os.fspath(index_dir), f"{os.path.basename(shard)}.{folder}{INDEX_SUFFIX}")


def _write_index(index: ShardIndex, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # Written aside and renamed: processes (of several hosts) indexing the same shard at once never
    # leave half a file.
    partial = f"{path}.{socket.gethostname()}.{os.getpid()}.partial"
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            json.dump(index.to_json(), handle, ensure_ascii=False, separators=(",", ":"))
        os.replace(partial, path)
    except OSError as error:
        raise OSError(
            f"cannot write the index of {index.shard} to {path} ({error}); set data.webdataset_index_dir "
            "(--index_dir) to a writable folder"
        ) from None


def load_shard_index(shard: str, index_dir: str | os.PathLike = "") -> ShardIndex:
    """The shard's index: read from its file, or made by `scan_shard` and written there when there
    is none or the shard's size has changed since (e.g. a finished download of a truncated shard)."""
    shard = os.path.abspath(os.fspath(shard))
    path = index_path(shard, index_dir)
    size = os.path.getsize(shard)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            try:
                record = json.load(handle)
            except ValueError as error:
                raise ValueError(f"{path}: unreadable index ({error}); delete it to index {shard} again") from None
        index = ShardIndex.from_json(record, shard, path)
        if index.shard_size == size and record["shard"] == os.path.basename(shard):
            return index
        logging.warning("%s changed since it was indexed (%d bytes, now %d): indexing it again", shard, index.shard_size, size)
    index = scan_shard(shard)
    _write_index(index, path)
    return index


def _index_one(job: tuple[str, str]) -> tuple[str, int, int]:
    index = load_shard_index(*job)
    return index.shard, len(index), sum(1 for problem in index.problems if problem)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Index webdataset tar shards for random access.")
    parser.add_argument("--shards", required=True, nargs="+", help="folder, brace pattern or glob of .tar shards")
    parser.add_argument("--index_dir", default="", help="folder for the indexes (default: beside the shards)")
    parser.add_argument("--workers", type=int, default=1, help="processes indexing shards side by side")
    args = parser.parse_args(argv)
    jobs = [(shard, args.index_dir) for shard in expand_shard_pattern(args.shards)]
    if args.workers > 1:
        with multiprocessing_pool.Pool(args.workers) as workers:
            results = list(workers.imap(_index_one, jobs))
    else:
        results = [_index_one(job) for job in jobs]
    for shard, num_samples, num_bad in results:
        if num_bad:
            print(f"{shard}: {num_samples} samples, {num_bad} unusable")
    total, bad = (sum(result[k] for result in results) for k in (1, 2))
    print(f"indexed {len(jobs)} shard(s): {total} samples, {bad} unusable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
