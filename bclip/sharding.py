"""The device mesh and the shardings of batches and training state.

One mesh axis, "data", spans every device. Batches are split along it; parameters and optimiser
state are either replicated (plain data parallelism) or split along it as well (FSDP / ZeRO-3
style), in which case XLA gathers each weight where it is used and reduce-scatters its gradient.
"""

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def sharding_config(**overrides) -> ml_collections.ConfigDict:
    """The sharding section of a config."""
    config = ml_collections.ConfigDict(
        {
            # "replicated": every device holds all parameters. "fsdp": each parameter with at least
            # `fsdp_min_size` elements is split along its largest axis divisible by the device count.
            "params": "replicated",
            "fsdp_min_size": 2**14,
        }
    )
    config.update(overrides)
    return config


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (or the given) devices, process-major so each host's devices are adjacent."""
    devices = jax.devices() if devices is None else devices
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh, the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], num_devices: int, min_size: int) -> P:
    """Split the largest axis divisible by the device count; small or indivisible leaves replicate."""
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    candidates = [axis for axis, size in enumerate(shape) if size % num_devices == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda a: shape[a])
    spec = [None] * len(shape)
    spec[axis] = DATA_AXIS
    return P(*spec)


def state_shardings(abstract_state, mesh: Mesh, config: ml_collections.ConfigDict):
    """Shardings for a pytree of shapes (from `jax.eval_shape`) of parameters or training state.

    The rule depends only on each leaf's shape, so Adam's moments get exactly their parameter's
    sharding.
    """
    if config.params == "replicated":
        return jax.tree.map(lambda _: replicated(mesh), abstract_state)
    if config.params != "fsdp":
        raise ValueError(f"sharding.params must be 'replicated' or 'fsdp', got {config.params!r}")
    num_devices = mesh.devices.size
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, _fsdp_spec(tuple(leaf.shape), num_devices, config.fsdp_min_size)),
        abstract_state,
    )


def global_batch_from_local(local_batch, mesh: Mesh):
    """Assemble a global sharded batch from each process's own slice of it (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )
