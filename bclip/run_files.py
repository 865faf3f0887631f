"""The files of a run folder: their names, and how they are written and read (through epath, so
a folder may be on gs://). Imports no JAX: sweeps and reports read run folders with it."""

import json
import os

from etils import epath

CONFIG_FILE = "config.json"  # the run's config, written when it starts
METRICS_FILE = "metrics.jsonl"  # one record per logged step
EVALS_FILE = "evals.jsonl"  # one record per evaluation
POISON_FILE = "poison_indices.json"  # the poison plan of a poisoned run
DONE_FILE = "done.json"  # written last: the run finished; {"steps", "results"}
FAILED_FILE = "failed.json"  # in a group folder: {run name: why it failed}
CHECKPOINTS_DIR = "checkpoints"


class RunFileError(ValueError):
    """A run or sweep file that is not the JSON it should be."""


def is_remote(path: str | os.PathLike) -> bool:
    """True for object-store paths (gs://…), which have no append and no local directory."""
    return "://" in os.fspath(path)


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """A reader sees the old file or the new one, never half of one."""
    path = epath.Path(path)
    temporary = path.with_name(path.name + ".tmp")
    if isinstance(data, bytes):
        temporary.write_bytes(data)
    else:
        temporary.write_text(data)
    temporary.replace(path)


def write_json(path: str | os.PathLike, record) -> None:
    """`record` as indented JSON, atomically (a sweep deciding what is finished never reads half)."""
    write_atomically(path, json.dumps(record, indent=2))


def read_json(path: str | os.PathLike):
    path = epath.Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunFileError(f"{path} is not valid JSON: {error}") from None


def read_json_lines(path: str | os.PathLike) -> list[dict]:
    """The step records of a JSON-lines log; a bad line is an error naming file and line."""
    path = epath.Path(path)
    records = []
    for number, line in enumerate(path.read_text().split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise RunFileError(f"{path}, line {number}, is not valid JSON: {error}") from None
        if not isinstance(record, dict) or "step" not in record:
            raise RunFileError(f"{path}, line {number}, is not a step record (a JSON object with a step)")
        records.append(record)
    return records


def is_finished(run_dir: str | os.PathLike) -> bool:
    return (epath.Path(run_dir) / DONE_FILE).exists()


def last_eval(run_dir: str | os.PathLike) -> dict | None:
    """The figures of a run's last evaluation (without step and epoch), or None when it has none."""
    path = epath.Path(run_dir) / EVALS_FILE
    if not path.exists():
        return None
    records = read_json_lines(path)
    return {k: v for k, v in records[-1].items() if k not in ("step", "epoch")} if records else None


class JsonLines:
    """Append-only JSON-lines file, written only by process 0.

    Object stores (gs://…) cannot append to a file: there every record rewrites the whole file,
    whose text this writer keeps (the logs hold one line per logged step, so they stay small).
    """

    def __init__(self, path: str | os.PathLike, enabled: bool):
        self.path, self.enabled = epath.Path(path), enabled
        self._remote_text = None  # the remote file's text as last written, once read

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        if not is_remote(self.path):
            with self.path.open("a") as f:
                f.write(line)
            return
        if self._remote_text is None:
            self._remote_text = self.path.read_text() if self.path.exists() else ""
        self._remote_text += line
        self.path.write_text(self._remote_text)

    def keep_through(self, step: int) -> None:
        """Drop the records of steps after `step`: a restarted run writes them again from there,
        so each step is logged once."""
        if not self.enabled or not self.path.exists():
            return
        lines = [line + "\n" for line in self.path.read_text().split("\n") if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            write_atomically(self.path, "".join(kept))
        self._remote_text = None
