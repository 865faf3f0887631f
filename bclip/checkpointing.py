"""Orbax checkpoints of the training state together with the Grain iterator state.

A step directory holds "state" (params, batch_stats, optimiser state, step; every process writes
its shards) and "data" (one JSON file per process with its iterator position), so a restarted run
continues on exactly the next batch. Saves are asynchronous; the iterator position is captured
synchronously at save time.
"""

import json
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from bclip.models import open_clip_layout


# In a run's checkpoints directory: how many steps make an epoch, so a checkpoint can be named by
# epoch exactly (train.init_from_epoch) instead of guessing the step from a batch size.
EPOCHS_FILE = "epochs.json"
# Beside the checkpoints directory: the run's config (written by bclip.train).
RUN_CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the model being trained."""


def absolute(path: str | os.PathLike) -> epath.Path:
    """`path` made absolute if it is local; a remote path (gs://…) is absolute already, and
    `os.path.abspath` would turn it into a local one."""
    path = epath.Path(path)
    return path if "://" in os.fspath(path) else epath.Path(os.path.abspath(path))


# The checkpoint items of a step directory.
STATE_ITEM, DATA_ITEM = "state", "data"


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """How the state's arrays are written.

    With one process, each array is written from one device's copy. Orbax's default on CPU and TPU
    splits every replicated array over its replicas (replica-parallel), which pays off only when the
    replicas sit on different hosts; in one process it cuts each array into one piece per device
    with an eager slice each (measured on 8 CPU devices: 40,000 slices, 16 CPU-seconds of the 20
    saves in tests/test_train.py). With several processes, Orbax's defaults stand.
    """
    if jax.process_count() > 1:
        return ocp.PyTreeCheckpointHandler()
    scalar = ocp.type_handlers.ScalarHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)),
        (str, ocp.type_handlers.StringHandler()),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def make_manager(
    directory: str | os.PathLike, max_to_keep: int = 3, keep_every_steps: int = 0
) -> ocp.CheckpointManager:
    """A manager keeping the newest `max_to_keep` steps and, when `keep_every_steps` > 0, every step
    that is a multiple of it for good (e.g. each epoch's end, for cleaning from a chosen epoch)."""
    if keep_every_steps < 0:
        raise ValueError(f"keep_every_steps must be >= 0, got {keep_every_steps}")
    if not keep_every_steps:
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
    else:
        policies = ocp.checkpoint_managers
        keep = policies.AnyPreservationPolicy([policies.LatestN(max_to_keep), policies.EveryNSteps(keep_every_steps)])
        options = ocp.CheckpointManagerOptions(preservation_policy=keep, create=True, enable_async_checkpointing=True)
    handlers = {STATE_ITEM: _state_handler(), DATA_ITEM: grain.checkpoint.CheckpointHandler()}
    return ocp.CheckpointManager(absolute(directory), options=options, item_handlers=handlers)


def write_epoch_steps(directory: str | os.PathLike, steps_per_epoch: int) -> None:
    """Record in a checkpoints directory that epoch e ends at step e * steps_per_epoch."""
    directory = absolute(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / EPOCHS_FILE).write_text(json.dumps({"steps_per_epoch": int(steps_per_epoch)}) + "\n")


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator) -> None:
    """Start saving `state` and the iterator position at `step` (returns before the write ends)."""
    manager.save(
        step,
        args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.PyTreeSave(state),
            DATA_ITEM: grain.checkpoint.CheckpointSave(data_iterator),
        }),
        force=True,
    )


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iterator):
    """Restore the newest step into the shardings of `abstract_state` and move the iterator there.

    Returns:
      (state, step) or (None, None) when the directory holds no checkpoint.
    """
    step = manager.latest_step()
    if step is None:
        return None, None
    restored = manager.restore(
        step,
        args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.PyTreeRestore(abstract_state, ocp.checkpoint_utils.construct_restore_args(abstract_state)),
            DATA_ITEM: grain.checkpoint.CheckpointRestore(data_iterator),
        }),
    )
    return restored[STATE_ITEM], step


def _resolve_step_dir(path: str | os.PathLike, epoch: int = -1) -> tuple[epath.Path, int]:
    """`path` is a run's checkpoint directory (take its latest step, or the step that ends `epoch`)
    or one step directory."""
    if epoch == 0 or epoch < -1:
        raise CheckpointError(
            f"init_from_epoch must be -1 (the latest checkpoint) or an epoch >= 1 (the checkpoint saved "
            f"after that many epochs), got {epoch}"
        )
    path = absolute(path)
    if not path.exists():
        raise CheckpointError(f"init_from checkpoint {path} does not exist")
    if (path / "state").is_dir():
        if epoch != -1:
            raise CheckpointError(
                f"init_from {path} is one step directory, so init_from_epoch={epoch} cannot choose another; "
                "name the run's workdir or its checkpoints directory"
            )
        return path.parent, int(path.name)
    for candidate in (path, path / "checkpoints"):
        if candidate.is_dir():
            steps = ocp.utils.checkpoint_steps(candidate)
            if steps:
                return candidate, (max(steps) if epoch == -1 else _step_of_epoch(candidate, steps, epoch))
    raise CheckpointError(f"init_from {path} holds no finished checkpoint step")


def step_dir(path: str | os.PathLike, epoch: int = -1) -> str:
    """The step directory `load_model_variables(path, ..., epoch)` reads."""
    directory, step = _resolve_step_dir(path, epoch)
    return os.fspath(directory / str(step))


def _step_of_epoch(directory: epath.Path, steps, epoch: int) -> int:
    """The finished step in `directory` saved at the end of (1-based) `epoch`."""
    epochs_file = directory / EPOCHS_FILE
    if not epochs_file.exists():
        raise CheckpointError(
            f"{directory} has no {EPOCHS_FILE}, so its steps cannot be matched to epochs "
            f"(steps saved: {sorted(steps)}); name the step directory in init_from instead of init_from_epoch"
        )
    try:
        steps_per_epoch = int(json.loads(epochs_file.read_text())["steps_per_epoch"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{epochs_file} is not an epochs record ({type(error).__name__}: {error})") from None
    step = epoch * steps_per_epoch
    if step not in steps:
        epochs = sorted(s // steps_per_epoch for s in steps if s % steps_per_epoch == 0)
        raise CheckpointError(
            f"{directory} holds no checkpoint of epoch {epoch} (step {step} at {steps_per_epoch} steps per "
            f"epoch); epochs with a checkpoint: {epochs} (steps saved: {sorted(steps)}). A run keeps its "
            "epochs' checkpoints only with train.keep_checkpoint_every_epochs"
        )
    return step


def load_model_variables(path: str | os.PathLike, abstract_variables: dict, epoch: int = -1) -> tuple[dict, str]:
    """Params and batch_stats of a finished checkpoint, for starting a cleaning run.

    The optimiser state in the checkpoint is not read here: cleaning starts a fresh optimiser and
    schedule unless `load_optimizer_state` is asked for it too (the reference code always reloaded it).

    Args:
      path: a run workdir, its `checkpoints` directory, or one step directory inside it; or a
        .safetensors file in open_clip's layout (pretrained OpenAI / open_clip weights, no batch
        statistics beyond the file's, `epoch` must be -1).
      abstract_variables: {"params", "batch_stats"} shapes (with shardings) of the model to fill.
      epoch: -1 for the latest step; e >= 1 for the checkpoint saved after e epochs (the run's
        EPOCHS_FILE maps it to its step; a missing one is an error listing the epochs there are).

    Returns:
      (variables, the step directory read).
    """
    if is_open_clip_file(path):
        return _load_open_clip(path, abstract_variables, epoch), os.fspath(path)
    directory, step = _resolve_step_dir(path, epoch)
    where = directory / str(step)
    target = {"params": abstract_variables["params"], "batch_stats": abstract_variables["batch_stats"]}
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = checkpointer.metadata(where / "state").item_metadata.tree
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint metadata at {where}: {error}") from error
    _check_structure(metadata, target, where)
    return _restore_placed(where / "state", target), os.fspath(where)


def is_open_clip_file(path: str | os.PathLike) -> bool:
    """Whether init_from names pretrained weights in open_clip's safetensors layout rather than a run."""
    return os.fspath(path).endswith(".safetensors")


def _load_open_clip(path: str | os.PathLike, abstract_variables: dict, epoch: int) -> dict:
    """The model variables in an open_clip safetensors file, placed as `abstract_variables` says."""
    if epoch != -1:
        raise CheckpointError(f"init_from {path} is one set of pretrained weights; init_from_epoch={epoch} cannot choose another")
    target = {"params": abstract_variables["params"], "batch_stats": abstract_variables["batch_stats"]}
    try:
        host = open_clip_layout.from_open_clip(open_clip_layout.read(path), target, source=f"init_from {os.fspath(path)}")
    except (FileNotFoundError, ValueError) as error:
        raise CheckpointError(str(error)) from None
    return jax.device_put(host, jax.tree.map(lambda leaf: leaf.sharding, target))


def load_optimizer_state(step_dir: str | os.PathLike, abstract_opt_state):
    """The optimiser state saved in a finished step directory, for train.reload_optimizer_state.

    Args:
      step_dir: one step directory (as `load_model_variables` returns it).
      abstract_opt_state: shapes (with shardings) of the configured optimiser's state for the
        model's params; the saved state must have exactly this structure.

    Returns:
      The saved optimiser state, in `abstract_opt_state`'s structure and shardings.
    """
    where = absolute(step_dir)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = checkpointer.metadata(where / "state").item_metadata.tree
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint metadata at {where}: {error}") from error
    if metadata is None or "opt" not in metadata:
        raise CheckpointError(f"checkpoint at {where} holds no optimiser state to reload")
    _check_optimizer_structure(metadata["opt"], abstract_opt_state, where)
    return _restore_placed(where / "state", {"opt": abstract_opt_state})["opt"]


def saved_run_config(step_dir: str | os.PathLike) -> dict:
    """The config.json of the run whose checkpoints directory holds `step_dir`."""
    path = absolute(step_dir).parent.parent / RUN_CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"no {RUN_CONFIG_FILE} at {path}: the run that saved {step_dir} is not known")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def _restore_placed(state_dir: epath.Path, target: dict) -> dict:
    """The parts of a saved state that `target` names, in its shapes, dtypes and shardings.

    With one process, each array is read once onto the host and placed on its devices by one
    device_put (Orbax would read and place it device by device: 8 reads of every replicated array
    on 8 devices). With several processes, each reads only its own shards through Orbax.
    """
    checkpointer = ocp.PyTreeCheckpointer()
    if jax.process_count() > 1:
        restore_args = jax.tree.map(
            lambda leaf: ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype), target
        )
        return checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
    as_numpy = jax.tree.map(lambda leaf: ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype), target)
    host = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=as_numpy, partial_restore=True))
    for (path, array), leaf in zip(jax.tree_util.tree_leaves_with_path(host), jax.tree.leaves(target), strict=True):
        if array.shape != leaf.shape:
            raise CheckpointError(f"checkpoint at {state_dir}: {jax.tree_util.keystr(path)} has shape {array.shape}, the model needs {leaf.shape}")
    return jax.device_put(host, jax.tree.map(lambda leaf: leaf.sharding, target))


def _check_structure(metadata, target, where: str) -> None:
    """Fail before any compute when the checkpoint's parameters do not match the model's."""
    if metadata is None or "params" not in metadata:
        raise CheckpointError(f"checkpoint at {where} holds no model params")
    have = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(metadata["params"])}
    want = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(target["params"])}
    missing = sorted(set(want) - set(have))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or wrong:
        details = [f"missing {k}" for k in missing[:5]] + [f"{k}: checkpoint {have[k]} vs model {want[k]}" for k in wrong[:5]]
        raise CheckpointError(f"checkpoint at {where} does not fit the configured model: " + "; ".join(details))


def _key_names(path) -> tuple[str, ...]:
    """A key path as plain names: saved metadata holds dicts and lists where the state held named
    tuples and tuples, so only the names and indices can be compared."""
    names = []
    for entry in path:
        for attribute in ("name", "key", "idx"):
            if hasattr(entry, attribute):
                names.append(str(getattr(entry, attribute)))
                break
        else:
            names.append(str(entry))
    return tuple(names)


def _check_optimizer_structure(metadata, abstract_opt_state, where) -> None:
    """Fail before any compute when the saved optimiser state is not the configured optimiser's."""
    have = {_key_names(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(metadata)}
    want = {_key_names(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(abstract_opt_state)}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or wrong:
        text = lambda names: "/".join(names)
        details = (
            [f"missing {text(k)}" for k in missing[:5]]
            + [f"not in the configured optimiser: {text(k)}" for k in extra[:5]]
            + [f"{text(k)}: checkpoint {have[k]} vs configured {want[k]}" for k in wrong[:5]]
        )
        raise CheckpointError(
            f"the optimiser state in the checkpoint at {where} does not have the configured optimiser's "
            f"structure ({len(missing)} missing, {len(extra)} unexpected, {len(wrong)} of other shape; "
            "optim.grad_clip_norm and the model must be the pretraining run's): " + "; ".join(details)
        )
