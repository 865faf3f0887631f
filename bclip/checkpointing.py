"""Orbax checkpoints of the training state together with the Grain iterator state.

A step directory holds "state" (params, batch_stats, optimiser state, step; every process writes
its shards) and "data" (one JSON file per process with its iterator position), so a restarted run
continues on exactly the next batch. Saves are asynchronous; the iterator position is captured
synchronously at save time.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the model being trained."""


def absolute(path: str | os.PathLike) -> epath.Path:
    """`path` made absolute if it is local; a remote path (gs://…) is absolute already, and
    `os.path.abspath` would turn it into a local one."""
    path = epath.Path(path)
    return path if "://" in os.fspath(path) else epath.Path(os.path.abspath(path))


def make_manager(directory: str | os.PathLike, max_to_keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(absolute(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator) -> None:
    """Start saving `state` and the iterator position at `step` (returns before the write ends)."""
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        ),
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
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ),
    )
    return restored["state"], step


def _resolve_step_dir(path: str | os.PathLike) -> tuple[epath.Path, int]:
    """`path` is a run's checkpoint directory (take its latest step) or one step directory."""
    path = absolute(path)
    if not path.exists():
        raise CheckpointError(f"init_from checkpoint {path} does not exist")
    if (path / "state").is_dir():
        return path.parent, int(path.name)
    for candidate in (path, path / "checkpoints"):
        if candidate.is_dir():
            steps = ocp.utils.checkpoint_steps(candidate)
            if steps:
                return candidate, max(steps)
    raise CheckpointError(f"init_from {path} holds no finished checkpoint step")


def load_model_variables(path: str | os.PathLike, abstract_variables: dict) -> tuple[dict, str]:
    """Params and batch_stats of a finished checkpoint, for starting a cleaning run.

    The optimiser state in the checkpoint is deliberately not read: cleaning starts a fresh
    optimiser and schedule (the reference code silently reloaded the pretraining one).

    Args:
      path: a run workdir, its `checkpoints` directory, or one step directory inside it.
      abstract_variables: {"params", "batch_stats"} shapes (with shardings) of the model to fill.

    Returns:
      (variables, the step directory read).
    """
    directory, step = _resolve_step_dir(path)
    where = directory / str(step)
    target = {"params": abstract_variables["params"], "batch_stats": abstract_variables["batch_stats"]}
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = checkpointer.metadata(where / "state").item_metadata.tree
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint metadata at {where}: {error}") from error
    _check_structure(metadata, target, where)
    restored = checkpointer.restore(
        where / "state",
        args=ocp.args.PyTreeRestore(item=target, restore_args=_restore_args(target), partial_restore=True),
    )
    return restored, os.fspath(where)


def _restore_args(target):
    return jax.tree.map(lambda leaf: ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype), target)


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
