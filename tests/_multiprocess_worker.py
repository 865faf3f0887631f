"""One process of the multi-process training test (tests/test_multiprocess.py); not a test itself.

Runs the trainer itself, `bclip.train.train_and_evaluate`, on a synthetic world: poisoned MMCL
pretraining of the micro ViT preset with FSDP parameters, evaluated at the start and at the end.
Started once per process, with the BCLIP_* variables of `bclip.distributed` when there are several:

  python tests/_multiprocess_worker.py --world W --workdir D --record R \
      [--resume_workdir E --resume_record Q --stop_after_steps N --stopped_copy C --stopped_record S]

The trainer is left as it is; a `Recorder` only watches it (the test also installs one in its own
process for the one-process run) and this process writes R/process_{i}.json with what it saw:

  "indices", "poisoned": [steps run][local batch], the examples of each train batch this process read;
  "restored_step": the checkpoint step the trainer resumed from, or null;
  "eval_decodes": [evaluations][...], the eval examples this process decoded in each evaluation;
  "writes": [(operation, path relative to D)], what this process wrote under D through epath (run
    files, and Orbax's and Grain's checkpoint files other than the array data TensorStore writes);
  "results": what train_and_evaluate returned (null when stopped);
  "stopped": whether --stop_after_steps stopped the run (it raises when the trainer asks for the
    batch after step N, as a preemption between two steps would stop it).

With --resume_workdir, after the run in D the same processes train a second run of the same config
in E, stopped after step N (its record goes to S, and process 0 copies the run folder as the stop
left it to C); then a third call of the trainer resumes the run in E from its checkpoint (its record
goes to Q). Starting new processes for these runs would only add their start-up (about 15
CPU-seconds a process); resuming in a fresh process after a real kill is tests/test_train.py's test.
"""

import argparse
import json
import os
import shutil

import jax
import pytest
from etils.epath import gpath
from jax.experimental import multihost_utils

from bclip import checkpointing, distributed, train
from bclip import config as run_configs
from bclip.data import pipeline, training_input
from bclip.data.synthetic import writer

NUM_POISONED = 8
LEARNING_RATE = 1e-3
BATCH_SIZE = 32
EVAL_BATCH_SIZE = 8
CHECKPOINT_EVERY_STEPS = 2


def worker_config(world: str):
    """One epoch of poisoned MMCL pretraining of the micro ViT preset, with the larger weights split
    over the devices (FSDP: in the two-process run each process holds only its part of them, the
    step gathers them across processes and every process writes its own shards at a save)."""
    config = run_configs.run_config("micro-vit")
    config.data.train_csv = os.path.join(world, "train", "train.csv")
    config.data.tokenizer.path = os.path.join(world, writer.VOCAB_FILE)
    config.data.batch_size = BATCH_SIZE
    config.data.shuffle_seed = 3
    config.poison.count = NUM_POISONED
    config.poison.trigger.size = 6
    config.optim.warmup_steps = 1
    config.optim.learning_rate = LEARNING_RATE
    config.sharding.params = "fsdp"
    config.sharding.fsdp_min_size = 2**10
    config.train.num_epochs = 1
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = CHECKPOINT_EVERY_STEPS
    config.eval.batch_size = EVAL_BATCH_SIZE
    with config.unlocked():
        config.eval.sets = {"test": run_configs.eval_set_config("folder", os.path.join(world, "test"))}
    return config


class Stopped(Exception):
    """Raised in place of the batch after --stop_after_steps steps."""


class _RecordedStream:
    """The trainer's input stream, noting the examples of each batch it hands out."""

    def __init__(self, data, recorder):
        self._data, self._recorder = data, recorder

    def __getattr__(self, name):
        return getattr(self._data, name)

    def __iter__(self):
        return self

    def __next__(self):
        recorder = self._recorder
        if recorder.stop_after_steps is not None and len(recorder.record["indices"]) == recorder.stop_after_steps:
            raise Stopped(f"stopped after {recorder.stop_after_steps} steps")
        batch = next(self._data)
        recorder.record["indices"].append(batch["index"].tolist())
        recorder.record["poisoned"].append(batch["is_poisoned"].tolist())
        return batch


class _WriteLog:
    """The local epath backend, noting each write under `root` (creating, replacing, renaming
    onto, copying onto or removing a file or folder)."""

    _WRITES = ("makedirs", "mkdir", "rmtree", "remove")
    _WRITES_ONTO = ("rename", "replace", "copy")

    def __init__(self, backend, root: str, writes: list):
        self._backend, self._root, self._writes = backend, os.path.realpath(root), writes

    def _note(self, operation: str, path) -> None:
        path = os.path.realpath(os.fspath(path))
        if path == self._root or path.startswith(self._root + os.sep):
            self._writes.append((operation, os.path.relpath(path, self._root)))

    def open(self, path, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            self._note(f"open:{mode}", path)
        return self._backend.open(path, mode, *args, **kwargs)

    def __getattr__(self, name):
        method = getattr(self._backend, name)
        if name in self._WRITES:

            def noted(path, *args, **kwargs):
                self._note(name, path)
                return method(path, *args, **kwargs)

            return noted
        if name in self._WRITES_ONTO:

            def noted_onto(path, dst, *args, **kwargs):
                self._note(name, dst)
                return method(path, dst, *args, **kwargs)

            return noted_onto
        return method


class Recorder:
    """Watches one process's run of the trainer (see the module docstring); `install` patches with
    `patch(owner, name, value)` (pytest's monkeypatch.setattr)."""

    def __init__(self, workdir: str, stop_after_steps: int | None = None):
        self.workdir, self.stop_after_steps = workdir, stop_after_steps
        self.record = {
            "indices": [], "poisoned": [], "restored_step": None, "eval_decodes": [], "writes": [],
            "results": None, "stopped": False,
        }

    def install(self, patch) -> None:
        record = self.record
        make_training_input = training_input.make_training_input

        def recorded_training_input(*args, **kwargs):
            source, plan, data = make_training_input(*args, **kwargs)
            return source, plan, _RecordedStream(data, self)

        restore_latest = checkpointing.restore_latest

        def recorded_restore(*args, **kwargs):
            state, step = restore_latest(*args, **kwargs)
            record["restored_step"] = step
            return state, step

        eval_batches, decode = pipeline.eval_batches, pipeline.EvalTransform._decode

        def recorded_eval_batches(*args, **kwargs):
            record["eval_decodes"].append([])
            return eval_batches(*args, **kwargs)

        def recorded_decode(transform, element):
            record["eval_decodes"][-1].append(int(element["index"]))
            return decode(transform, element)

        patch(training_input, "make_training_input", recorded_training_input)
        patch(checkpointing, "restore_latest", recorded_restore)
        patch(pipeline, "eval_batches", recorded_eval_batches)
        patch(pipeline.EvalTransform, "_decode", recorded_decode)
        # Local paths of epath go to this backend (gs:// ones to others).
        patch(gpath, "_PREFIX_TO_BACKEND", {
            **gpath._PREFIX_TO_BACKEND, None: _WriteLog(gpath._PREFIX_TO_BACKEND[None], self.workdir, record["writes"])
        })

    def run(self, config) -> dict:
        """train_and_evaluate(config, workdir), recorded."""
        try:
            self.record["results"] = train.train_and_evaluate(config, self.workdir)
        except Stopped:
            self.record["stopped"] = True
        return self.record


def _recorded_run(config, workdir: str, record_dir: str, stop_after_steps: int | None = None) -> None:
    recorder = Recorder(workdir, stop_after_steps)
    # Undone afterwards, so that a second Recorder watches the resumed run alone.
    with pytest.MonkeyPatch.context() as patch:
        recorder.install(patch.setattr)
        record = recorder.run(config)
    os.makedirs(record_dir, exist_ok=True)
    with open(os.path.join(record_dir, f"process_{jax.process_index()}.json"), "w") as f:
        json.dump(record, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--record", required=True, help="Folder for this process's record.")
    parser.add_argument("--resume_workdir", default=None, help="Then a run stopped and resumed here.")
    parser.add_argument("--resume_record", default=None, help="With --resume_workdir: the resumed run's records.")
    parser.add_argument("--stop_after_steps", type=int, default=None, help="With --resume_workdir: the stopped run's last step.")
    parser.add_argument("--stopped_copy", default=None, help="With --resume_workdir: where the stopped run folder is copied.")
    parser.add_argument("--stopped_record", default=None, help="With --resume_workdir: the stopped run's records.")
    args = parser.parse_args()

    # Before any JAX work: the processes must find each other first.
    distributed.initialize()
    # As tests/conftest.py sets it, so every run multiplies in the same precision.
    jax.config.update("jax_default_matmul_precision", "highest")
    config = worker_config(args.world)
    _recorded_run(config, args.workdir, args.record)
    if args.resume_workdir is not None:
        _recorded_run(config, args.resume_workdir, args.stopped_record, args.stop_after_steps)
        if jax.process_index() == 0:
            shutil.copytree(args.resume_workdir, args.stopped_copy)
        multihost_utils.sync_global_devices("stopped run copied")
        _recorded_run(config, args.resume_workdir, args.resume_record)


if __name__ == "__main__":
    main()
