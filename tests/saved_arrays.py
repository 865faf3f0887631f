"""Reading what a run saved, for tests: a checkpoint's state as host numpy arrays."""

import jax
import numpy as np
import orbax.checkpoint as ocp

from bclip import checkpointing


def read_state(state_dir, part: str | None = None):
    """The tree saved in a step's "state" item (or only its `part`, e.g. "params"), each array read
    whole onto the host as numpy, whatever processes wrote its shards (not placed on the devices it
    was saved from: one read per array instead of one per device)."""
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(state_dir).item_metadata.tree
    if part is not None:
        tree = {part: tree[part]}
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(
        state_dir, args=ocp.args.PyTreeRestore(item=tree, restore_args=as_numpy, partial_restore=part is not None)
    )
    return restored if part is None else restored[part]


def final_params(run_dir) -> dict[str, np.ndarray]:
    """The params of a run's newest checkpoint, keyed by tree path."""
    params = read_state(f"{checkpointing.step_dir(run_dir)}/state", "params")
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
