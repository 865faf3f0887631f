"""Reading what a run saved, for tests: a checkpoint's state as host numpy arrays."""

import jax
import numpy as np
import orbax.checkpoint as ocp


def read_state(state_dir) -> dict:
    """The tree saved in a step's "state" item, each array read whole onto the host as numpy (not
    placed on the devices it was saved from: one read per array instead of one per device)."""
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(state_dir).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(item=tree, restore_args=as_numpy))
