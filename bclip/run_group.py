"""A group of runs trained by one program: a lone run is a group of one; a vectorised sweep's runs,
which differ only in scalar hyper-parameters (SWEEPABLE_KEYS), are a group of N.

The train step is written once, for one run (`train_step.make_train_step`), and takes the run's
hyper-parameters as arguments. A group of one jits it as is. A group of N stacks the runs' states on
a leading run axis [N, ...] and goes over it one of three ways (RUN_LOOPS): "vmap" batches every op
over the runs; "map" loops over them inside the program (lax.map); "dispatch" compiles the one-run
step once, with the run index as an argument, and calls it once per run. Every run sees the same,
shared batch; metrics come back [N] in every case, with "params_finite" [N] added (computed inside
the program, so the finite check costs no dispatch of its own).
"""

import copy
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bclip import cpu_runtime, epoch_passes, objectives, optim, sharding, train_step

# The optional second mesh axis: runs split over it, the batch over sharding.DATA_AXIS.
RUN_AXIS = "runs"
RUN_LOOPS = ("vmap", "map", "dispatch")
# Dotted config keys that may differ between the runs of one group.
SWEEPABLE_KEYS = tuple(f"optim.{key}" for key in optim.HYPERPARAMS) + tuple(
    f"objective.{objectives.weight_key(name)}" for name in objectives.TERMS
)


class NotVectorisableError(ValueError):
    """The runs cannot share one program."""


# ---------------------------------------------------------------------------------------------
# Which runs can share a program, and what differs between them
# ---------------------------------------------------------------------------------------------


def _lookup(tree: dict, dotted_key: str):
    for part in dotted_key.split("."):
        tree = tree[part]
    return tree


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        # A mapping keyed by other than names (optim.epoch_learning_rates) is compared whole.
        if isinstance(x, dict) and isinstance(y, dict) and all(isinstance(name, str) for name in (*x, *y)):
            keys += _differing_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(prefix + key)
    return keys


def non_sweepable_differences(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, list[int]]:
    """Config keys outside SWEEPABLE_KEYS that differ between runs, each with the indices of the runs
    whose value differs from run 0's; empty when the runs can be one group."""

    def shared_part(config):
        shared = config.to_dict()
        for key in SWEEPABLE_KEYS:
            section, leaf = key.split(".")
            del shared[section][leaf]
        return shared

    reference = shared_part(configs[0])
    differences: dict[str, list[int]] = {}
    for index, config in enumerate(configs[1:], start=1):
        for key in _differing_keys(reference, shared_part(config)):
            differences.setdefault(key, []).append(index)
    return differences


def vectorisation_problems(configs: Sequence[ml_collections.ConfigDict], names: Sequence[str]) -> list[str]:
    """Why these run configs cannot train as one group (empty when they can; a lone run always can)."""
    if len(configs) == 1:
        return []
    problems = []
    as_dicts = [config.to_dict() for config in configs]
    for key, runs in non_sweepable_differences(configs).items():
        values = ", ".join(f"{names[i]}: {_lookup(as_dicts[i], key)!r}" for i in [0, *runs][:4])
        problems.append(f"{key} differs between runs ({values}{', ...' if len(runs) > 3 else ''})")
    if any(config.train.reload_optimizer_state for config in configs):
        problems.append(
            "train.reload_optimizer_state is set: a group's runs would each need the lone pretraining "
            "run's saved AdamW state and its weight decay"
        )
    if any(config.train.keep_checkpoint_every_epochs for config in configs):
        problems.append("train.keep_checkpoint_every_epochs is set: a group keeps only each run's final checkpoint")
    passes = sorted(set().union(*(epoch_passes.enabled_passes(config) for config in configs)))
    if passes:
        problems.append(
            f"per-epoch passes {passes} are enabled: each run's table comes from its own model before "
            "every epoch, which one shared input stream cannot carry"
        )
    return problems


def check_vectorisable(configs: Sequence[ml_collections.ConfigDict], names: Sequence[str]) -> None:
    """Raise NotVectorisableError naming every key that keeps the runs from sharing one program."""
    if not configs:
        raise NotVectorisableError("no runs to vectorise")
    problems = vectorisation_problems(configs, names)
    if problems:
        raise NotVectorisableError(
            "these runs cannot train as one vectorised program: "
            + "; ".join(problems)
            + f". Only {', '.join(SWEEPABLE_KEYS)} may differ between the runs of a "
            "vectorised sweep; run this sweep without --vectorize"
        )


def group_objective(configs: Sequence[ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
    """The objective the group's step computes: each term on (weight 1) where any run weighs it;
    the runs' own weights are hyper-parameters."""
    template = copy.deepcopy(configs[0].objective)
    for name in objectives.TERMS:
        key = objectives.weight_key(name)
        template[key] = 1.0 if any(config.objective[key] for config in configs) else 0.0
    return template


def group_hyperparams(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, np.ndarray]:
    """{name: float32 [N]}: each run's `train_step.run_hyperparams`, stacked."""
    per_run = [train_step.run_hyperparams(config.optim, config.objective) for config in configs]
    return {key: np.stack([hparams[key] for hparams in per_run]) for key in per_run[0]}


def default_run_loop(devices) -> str:
    """How a group of several runs goes over them on `devices` (RUN_LOOPS): "vmap" on GPUs and
    TPUs, whose fixed per-op costs batching the runs spreads; "dispatch" on CPUs.

    On CPUs "dispatch" (one single-run program, compiled once, called per run) was the faster of
    the two on both hosts measured: a 2-core AMD EPYC (AVX2), clean_tiny.py's runs' step at
    0.93-1.00x the speed of separate runs against vmap's 0.71-0.92x, and a 2-core Intel Xeon with
    AVX-512, 1.17x against 0.995x (an earlier AVX-512 host had vmap ahead, 1.36x, which did not
    hold here). It also runs each run's arithmetic as a lone run does: the embedded study's grouped
    cleaning runs wrote exactly the lone runs' logs, and so do the tests' runs (tests/test_run_group.py);
    XLA:CPU's fused code for the sliced state can round a gradient sum differently (up to 1.2e-6 in
    parameters after 4 micro-vit steps at default XLA flags), where vmap's batched ops differ by up to 1e-4.
    """
    if all(device.platform == "cpu" for device in devices):
        return "dispatch"
    return "vmap"


# ---------------------------------------------------------------------------------------------
# The group's state and step
# ---------------------------------------------------------------------------------------------


def _all_finite(params) -> jax.Array:
    """bool: whether every parameter of one run is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)]))


def _with_finite_check(run_step: Callable) -> Callable:
    def checked(state, batch, rng, hparams):
        state, metrics = run_step(state, batch, rng, hparams)
        return state, {**metrics, "params_finite": _all_finite(state["params"])}

    return checked


def make_mesh(run_shards: int = 1, devices=None) -> Mesh:
    """`sharding.make_mesh`'s 1-D data mesh for run_shards=1; otherwise a 2-D mesh
    (RUN_AXIS: run_shards, DATA_AXIS: the rest), each run group's devices adjacent so the batch's
    collectives stay among neighbours."""
    if run_shards == 1:
        return sharding.make_mesh(devices)
    devices = jax.devices() if devices is None else devices
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    if len(devices) % run_shards:
        raise ValueError(f"run_shards={run_shards} does not divide {len(devices)} devices")
    grid = np.asarray(devices).reshape(run_shards, len(devices) // run_shards)
    return Mesh(grid, (RUN_AXIS, sharding.DATA_AXIS))


def run_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (run) axis split over RUN_AXIS when the mesh has one; replicated otherwise."""
    return NamedSharding(mesh, P(RUN_AXIS) if RUN_AXIS in mesh.axis_names else P())


class RunGroup:
    """N runs' states laid out for one program, and the step over them.

    A group of one keeps its run's state as it is (a lone run's checkpoints hold one model); a
    group of N stacks the states on a leading run axis, whose leaves are split over RUN_AXIS when
    the mesh has one and are otherwise whole on every device that holds the run's leaf.
    """

    def __init__(self, num_runs: int, mesh: Mesh, run_loop: str | None = None):
        if num_runs < 1:
            raise ValueError("a group needs at least one run")
        if RUN_AXIS in mesh.axis_names and num_runs % mesh.shape[RUN_AXIS]:
            raise ValueError(f"{num_runs} runs cannot be split evenly over {mesh.shape[RUN_AXIS]} run shards")
        self.num_runs, self.mesh = num_runs, mesh
        self._take_fns = {}  # one jitted slicer per output shardings, compiled once, not per call
        self.run_loop = "single" if num_runs == 1 else (run_loop or default_run_loop(mesh.devices.flat))
        if self.run_loop not in ("single", *RUN_LOOPS):
            raise ValueError(f"run_loop must be one of {RUN_LOOPS}, got {run_loop!r}")
        if self.run_loop == "dispatch" and RUN_AXIS in mesh.axis_names:
            raise ValueError('run_loop "dispatch" steps one run at a time on every device: use run_shards=1')

    @property
    def stacked(self) -> bool:
        return self.run_loop != "single"

    def shardings(self, run_shardings):
        """The group's state shardings from one run's."""
        if not self.stacked:
            return run_shardings
        if RUN_AXIS in self.mesh.axis_names:
            return jax.tree.map(lambda _: run_sharding(self.mesh), run_shardings)
        return jax.tree.map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)), run_shardings)

    def abstract(self, abstract_run, run_shardings):
        """ShapeDtypeStructs (with shardings) of the group's state from one run's."""
        shape = (lambda a: a.shape) if not self.stacked else (lambda a: (self.num_runs, *a.shape))
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(shape(a), a.dtype, sharding=s), abstract_run, self.shardings(run_shardings)
        )

    def replicate(self, run_state, run_shardings):
        """The group's state with every run starting from `run_state` (jitted into its shardings)."""
        if not self.stacked:
            return run_state
        stack = lambda state: jax.tree.map(lambda x: jnp.broadcast_to(x, (self.num_runs, *x.shape)), state)  # noqa: E731
        return jax.jit(stack, out_shardings=self.shardings(run_shardings))(run_state)

    def take(self, states, run: int, run_shardings):
        """Run `run`'s part of the group's states (e.g. its variables), in one run's shardings."""
        if not self.stacked:
            return states
        key = jax.tree.structure(run_shardings), tuple(jax.tree.leaves(run_shardings))
        if key not in self._take_fns:
            self._take_fns[key] = jax.jit(lambda s, i: jax.tree.map(lambda x: x[i], s), out_shardings=run_shardings)
        return self._take_fns[key](states, run)

    def hyperparams(self, hparams: dict[str, np.ndarray]):
        """{name: float32 [N]} on the mesh, as the step takes them."""
        return jax.device_put(hparams, run_sharding(self.mesh))

    def jit_step(self, run_step: Callable, run_shardings) -> Callable:
        """`(states, batch, rng, hparams [N]) -> (states, metrics [N])` for the one-run step
        `run_step(state, batch, rng, hparams scalars)`, jitted with the states donated."""
        run_step = _with_finite_check(run_step)
        options = cpu_runtime.compiler_options(self.mesh.devices.flat)
        states = self.shardings(run_shardings)
        batch, replicated, runs = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh), run_sharding(self.mesh)
        if self.run_loop == "dispatch":
            return _DispatchedStep(
                jax.jit(
                    _on_stacked(run_step),
                    in_shardings=(states, replicated, batch, replicated, runs),
                    out_shardings=(states, replicated),
                    donate_argnums=(0,),
                    compiler_options=options,
                )
            )
        if self.run_loop == "single":

            def step(state, batch, rng, hparams):
                state, metrics = run_step(state, batch, rng, jax.tree.map(lambda h: h[0], hparams))
                return state, jax.tree.map(lambda m: m[None], metrics)

            return train_step.shard_and_jit_train_step(step, states, self.mesh)
        if self.run_loop == "vmap":
            step = jax.vmap(run_step, in_axes=(0, None, None, 0))
        else:

            def step(states, batch, rng, hparams):
                return jax.lax.map(lambda run: run_step(run[0], batch, rng, run[1]), (states, hparams))

        return jax.jit(
            step,
            in_shardings=(states, batch, replicated, runs),
            out_shardings=(states, runs),
            donate_argnums=(0,),
            compiler_options=options,
        )


def _on_stacked(run_step: Callable) -> Callable:
    """Run `run`'s step on the stacked states: its slice is read, stepped and written back (in
    place once the states are donated)."""

    def step(states, run, batch, rng, hparams):
        take = lambda tree: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, run, keepdims=False), tree)  # noqa: E731
        new_state, metrics = run_step(take(states), batch, rng, take(hparams))
        put = lambda stacked, new: jax.lax.dynamic_update_index_in_dim(stacked, new, run, 0)  # noqa: E731
        return jax.tree.map(put, states, new_state), metrics

    return step


class _DispatchedStep:
    """The "dispatch" loop's jitted one-run program called like the others' steps: (states, batch,
    rng, hparams) -> (states, metrics [N]); each call dispatches it N times, so every run's ops run
    at single-run size while the N runs still compile once."""

    def __init__(self, jitted: Callable):
        self.jitted = jitted

    def __call__(self, states, batch, rng, hparams):
        num_runs = jax.tree.leaves(hparams)[0].shape[0]
        per_run = []
        for run in range(num_runs):
            states, metrics = self.jitted(states, np.int32(run), batch, rng, hparams)
            per_run.append(metrics)
        return states, jax.tree.map(lambda *values: jnp.stack(values), *per_run)

    def lower(self, states, batch, rng, hparams):
        """Mirrors jax.jit's lower(...).compile(): a _DispatchedStep of the compiled program."""
        return _LoweredDispatch(self.jitted.lower(states, np.int32(0), batch, rng, hparams))


class _LoweredDispatch:
    def __init__(self, lowered):
        self.lowered = lowered

    def compile(self) -> _DispatchedStep:
        return _DispatchedStep(self.lowered.compile())
