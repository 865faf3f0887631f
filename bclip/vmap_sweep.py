"""Vectorised sweeps: N runs that differ only in scalar hyperparameters train as one jitted program.

Each run's state is stacked on a leading run axis [N, ...] and the single-run step is `jax.vmap`ped
over it (or looped over it inside the program, `run_loop="map"`, or compiled once and called per
run, `run_loop="dispatch"`), so every run sees the same (shared, unstacked) batch. What may differ
per run is a float [N] array each: the peak learning rate, the weight decay and the objective's
term weights. Anything else (model, schedule shape, batch size, which loss terms exist) is one
value for the whole sweep.

  tx = make_sweep_optimizer(optim_config)
  states = stack_states(init_sweep_state(tx, variables), num_runs)
  hparams = sweep_hyperparams(num_runs, optim_config, objective, learning_rate=[1e-5, 3e-5, 1e-4])
  step = shard_and_jit_vectorised_step(
      make_vectorised_train_step(model, objective, optim_config, total_steps), shardings, mesh)
  states, metrics = step(states, batch, rng, hparams)        # metrics: {"loss": [N], ...}

It pays where a single run's step is bound by fixed per-step costs (op launches, collectives, small
per-device batches): those are paid once for all N runs, and the N runs compile once instead of N
times. Where a step is already compute-bound (a small CPU), the work is N runs' work either way and
the N-fold working set can make each run slower, where "dispatch" may do better than "vmap";
`python -m bclip.bench_sweep --run_loops vmap,map,dispatch` measures them. bclip.train_vectorised
trains a whole sweep this way.
"""

import copy
from typing import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bclip import cpu_runtime, objectives, optim, sharding, train_step

# The optional second mesh axis: runs split over it, the batch over sharding.DATA_AXIS.
RUN_AXIS = "runs"

# Loss term name -> its weight's key in `config.objective` and in the hyperparameters.
TERM_WEIGHTS = {
    "mmcl": "mmcl_weight",
    "ssl": "ssl_weight",
    "siglip": "siglip_weight",
    "cluster": "cluster_weight",
}
OPTIM_HYPERPARAMS = ("learning_rate", "weight_decay")
HYPERPARAMS = OPTIM_HYPERPARAMS + tuple(TERM_WEIGHTS.values())
# Dotted config keys that may differ between the runs of one vectorised sweep.
# How the step goes over the run axis: "vmap" batches every op over the runs; "map" is a loop
# inside the one program (lax.map), each run's ops at single-run size; "dispatch" compiles one
# run's step once (the run index and its hyperparameters are arguments) and calls it per run.
RUN_LOOPS = ("vmap", "map", "dispatch")
SWEEPABLE_KEYS = tuple(f"optim.{k}" for k in OPTIM_HYPERPARAMS) + tuple(
    f"objective.{k}" for k in TERM_WEIGHTS.values()
)


# ---------------------------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------------------------


def active_terms(objective_template: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Loss terms the sweep computes: those with a nonzero weight in the template."""
    return tuple(name for name, key in TERM_WEIGHTS.items() if objective_template[key])


def sweep_hyperparams(
    num_runs: int,
    optim_config: ml_collections.ConfigDict,
    objective_template: ml_collections.ConfigDict,
    **per_run: Sequence[float] | float,
) -> dict[str, np.ndarray]:
    """Every hyperparameter as float32 [N]: the per-run values given, the configs' values elsewhere.

    Args:
      num_runs: N.
      optim_config, objective_template: defaults for `learning_rate`, `weight_decay` and each
        `*_weight` not given.
      per_run: keys from HYPERPARAMS, each a list of N floats or one float for every run.

    Raises ValueError for an unknown key, a list of the wrong length, or a run that gives weight to a
    term the template does not compute (it would silently be left out of that run's loss).
    """
    unknown = set(per_run) - set(HYPERPARAMS)
    if unknown:
        raise ValueError(f"unknown sweep hyperparameters {sorted(unknown)}; known: {HYPERPARAMS}")
    defaults = {k: optim_config[k] for k in OPTIM_HYPERPARAMS}
    defaults.update({k: objective_template[k] for k in TERM_WEIGHTS.values()})
    hparams = {}
    for key in HYPERPARAMS:
        values = np.asarray(per_run.get(key, defaults[key]), np.float32)
        if values.ndim == 0:
            values = np.full((num_runs,), values, np.float32)
        if values.shape != (num_runs,):
            raise ValueError(f"{key}: expected {num_runs} values, got shape {values.shape}")
        hparams[key] = values
    computed = active_terms(objective_template)
    for name, key in TERM_WEIGHTS.items():
        if name not in computed and np.any(hparams[key] != 0):
            raise ValueError(
                f"{key}={hparams[key].tolist()} but the objective template does not compute the "
                f"{name!r} term; give it a nonzero weight in the template"
            )
    return hparams


def sweep_from_configs(
    configs: Sequence[ml_collections.ConfigDict],
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict, dict[str, np.ndarray]]:
    """Split N run configs into what they share and what a vectorised sweep varies.

    The configs must be equal except for SWEEPABLE_KEYS (e.g. the runs of a bclip.sweep whose entries
    only set learning rates, weight decays and loss weights).

    Returns:
      (objective template: each term on where any run uses it, the shared optim section,
       hyperparameters float32 [N] each).
    """
    if not configs:
        raise ValueError("a sweep needs at least one run config")
    differences = non_sweepable_differences(configs)
    if differences:
        named = "; ".join(f"{key} (runs {', '.join(map(str, runs))} differ from run 0)" for key, runs in differences.items())
        raise ValueError(f"runs differ in {named}: only {SWEEPABLE_KEYS} may vary in a vectorised sweep")
    template = copy.deepcopy(configs[0].objective)
    for key in TERM_WEIGHTS.values():
        # The template only says which terms to compute; the weights come from the hyperparameters.
        template[key] = 1.0 if any(config.objective[key] for config in configs) else 0.0
    per_run = {}
    for key in SWEEPABLE_KEYS:
        section, leaf = key.split(".")
        per_run[leaf] = [config[section][leaf] for config in configs]
    hparams = sweep_hyperparams(len(configs), configs[0].optim, template, **per_run)
    return template, configs[0].optim, hparams


def non_sweepable_differences(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, list[int]]:
    """Config keys outside SWEEPABLE_KEYS that differ between runs, each with the indices of the runs
    whose value differs from run 0's; empty when the runs can be one vectorised sweep."""

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


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differing_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(prefix + key)
    return keys


# ---------------------------------------------------------------------------------------------
# Optimiser with per-run learning rate and weight decay
# ---------------------------------------------------------------------------------------------


def make_sweep_optimizer(optim_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """`optim.make_optimizer`'s AdamW (same mask, betas, eps and clipping) whose learning rate and
    weight decay are plain state values, set by the vectorised step before every update."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=0.0,
        b1=optim_config.b1,
        b2=optim_config.b2,
        eps=optim_config.eps,
        weight_decay=0.0,
        mask=optim.weight_decay_mask,
    )
    if optim_config.grad_clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), adamw)


def learning_rate_multiplier(optim_config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule's shape (warm-up then cosine) for a peak of 1; a run's learning
    rate at a step is its peak times this."""
    unit = copy.deepcopy(optim_config)
    unit.learning_rate = 1.0
    return optim.learning_rate_schedule(unit, total_steps)


def _is_injected(state) -> bool:
    return hasattr(state, "hyperparams") and "learning_rate" in getattr(state, "hyperparams", {})


def _injected_state(opt_state):
    for state in jax.tree.leaves(opt_state, is_leaf=_is_injected):
        if _is_injected(state):
            return state
    raise ValueError("optimizer state holds no injected hyperparameters")


def with_optimizer_hyperparams(opt_state, **values: jax.Array):
    """The optimiser state with the injected hyperparameters (`learning_rate`, ...) replaced."""

    def replace(state):
        if not _is_injected(state):
            return state
        return state._replace(hyperparams={**state.hyperparams, **values})

    return jax.tree.map(replace, opt_state, is_leaf=_is_injected)


# ---------------------------------------------------------------------------------------------
# Stacked states
# ---------------------------------------------------------------------------------------------


def init_sweep_state(tx: optax.GradientTransformation, variables: Mapping) -> dict:
    """One run's state {"params", "batch_stats", "opt", "step"} from model variables, e.g. the
    pretrained checkpoint every cleaning run starts from."""
    params = variables["params"]
    return {
        "params": params,
        "batch_stats": variables.get("batch_stats", {}),
        "opt": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
    }


def stack_states(state, num_runs: int):
    """N copies of one run's state on a new leading axis: every leaf [...] -> [N, ...]."""
    return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (num_runs, *np.shape(x))), state)


def stack_run_states(states: Sequence):
    """Per-run states (same structure and shapes) stacked on a leading axis: [...] -> [N, ...]."""
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *states)


def unstack_run(states, run: int):
    """Run `run`'s state out of the stacked states: [N, ...] -> [...]."""
    return jax.tree.map(lambda x: x[run], states)


def init_sweep_states(model: nn.Module, tx: optax.GradientTransformation, rngs: jax.Array, image_size: int, context_length: int):
    """Fresh, differently initialised runs, one per key of `rngs` [N]; stacked [N, ...]."""
    return jax.vmap(lambda rng: train_step.init_state(model, tx, rng, image_size, context_length))(rngs)


# ---------------------------------------------------------------------------------------------
# The vectorised step
# ---------------------------------------------------------------------------------------------


def make_vectorised_train_step(
    model: nn.Module,
    objective_template: ml_collections.ConfigDict,
    optim_config: ml_collections.ConfigDict,
    total_steps: int,
    run_loop: str = "vmap",
) -> Callable:
    """The pure step `(states [N, ...], batch, rng, hparams [N]) -> (states [N, ...], metrics [N])`.

    Run i does exactly what `train_step.make_train_step` does for an optimiser built by
    `optim.make_optimizer` with peak learning rate `hparams["learning_rate"][i]` and weight decay
    `hparams["weight_decay"][i]`, and an objective with the weights `hparams[...][i]`: same loss,
    weight-decay mask, schedule and temperature clamp. Each run's learning rate at its step t is its
    peak times `learning_rate_multiplier(optim_config, total_steps)(t)`.

    Args (of the returned step):
      states: run states stacked [N, ...], from `stack_states` with `make_sweep_optimizer`'s state.
      batch: one batch shared by every run ("image" uint8 [B, H, W, 3], "text" int32 [B, L], plus the
        SSL views / "cluster" ids the template needs), not stacked.
      rng: one key, shared (the step has no stochastic layers yet).
      hparams: {key: float32 [N]} for every key of HYPERPARAMS (`sweep_hyperparams`).

    `run_loop` lays out the run axis (RUN_LOOPS): "vmap" batches every op over the N runs (bigger
    ops: what accelerators want); "map" loops over the runs inside the one program, each run's ops
    at single-run size with one run's working set at a time (on CPU, where a single run's step
    already keeps the cores busy, the faster of the two). Both give the same results.

    The template decides which terms are computed (those with a nonzero weight); a run with weight 0
    on a computed term still pays for it. For BatchNorm (ResNet) towers, a run with SSL weight 0 in a
    sweep that computes SSL also sends the views through the towers, so its batch statistics cover
    them, unlike a lone MMCL-only run.
    """
    tx = make_sweep_optimizer(optim_config)
    multiplier = learning_rate_multiplier(optim_config, total_steps)

    def loss_fn(params, batch_stats, batch, hparams):
        embeddings, new_batch_stats = train_step.objective_embeddings(model, params, batch_stats, batch, objective_template)
        # The template's weights only select the terms; each run weighs them with its own values.
        _, terms = objectives.combined_loss(embeddings, params["logit_scale"], params.get("logit_bias"), objective_template)
        total = sum(hparams[TERM_WEIGHTS[name]] * value for name, value in terms.items())
        return total, (terms, new_batch_stats)

    def run_step(state, batch, rng, hparams):
        del rng  # As in train_step: no stochastic layers yet.
        count = _injected_state(state["opt"]).count
        opt_state = with_optimizer_hyperparams(
            state["opt"],
            learning_rate=hparams["learning_rate"] * multiplier(count),
            weight_decay=hparams["weight_decay"],
        )
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (terms, batch_stats)), grads = grad_fn(state["params"], state["batch_stats"], batch, hparams)
        return train_step.apply_gradients(tx, state, opt_state, grads, batch_stats, loss, terms)

    if run_loop == "vmap":
        return jax.vmap(run_step, in_axes=(0, None, None, 0))
    if run_loop == "map":

        def mapped(states, batch, rng, hparams):
            return jax.lax.map(lambda run: run_step(run[0], batch, rng, run[1]), (states, hparams))

        return mapped
    if run_loop == "dispatch":
        return PerRunStep(run_step)
    raise ValueError(f"run_loop must be one of {RUN_LOOPS}, got {run_loop!r}")


class PerRunStep:
    """The "dispatch" run loop before jitting: `run_step(state, batch, rng, hparams)` of one run,
    for `shard_and_jit_vectorised_step` to compile once and call once per run."""

    def __init__(self, run_step: Callable):
        self.run_step = run_step

    def wrap(self, wrapper: Callable[[Callable], Callable]) -> "PerRunStep":
        """The same, with `wrapper` applied to the single-run step."""
        return PerRunStep(wrapper(self.run_step))

    def on_stacked(self, states, run, batch, rng, hparams):
        """Run `run`'s step on the stacked states: its slice is read, stepped and written back
        (in place once the states are donated)."""
        take = lambda tree: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, run, keepdims=False), tree)
        new_state, metrics = self.run_step(take(states), batch, rng, take(hparams))
        put = lambda stacked, new: jax.lax.dynamic_update_index_in_dim(stacked, new, run, 0)
        return jax.tree.map(put, states, new_state), metrics


class DispatchedStep:
    """A jitted `PerRunStep` called like the other run loops' steps: (states, batch, rng, hparams)
    -> (states, metrics [N]). Each call dispatches the one compiled single-run program N times, so
    every run's ops run at single-run size, as N separate runs' would (on a CPU host where the
    batched ops of "vmap" run slower than one run's), while the N runs still compile once."""

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
        """Mirrors jax.jit's lower(...).compile(): a DispatchedStep of the compiled program."""
        lowered = self.jitted.lower(states, np.int32(0), batch, rng, hparams)
        return _LoweredDispatch(lowered)


class _LoweredDispatch:
    def __init__(self, lowered):
        self.lowered = lowered

    def compile(self) -> DispatchedStep:
        return DispatchedStep(self.lowered.compile())


# ---------------------------------------------------------------------------------------------
# Mesh and shardings
# ---------------------------------------------------------------------------------------------


def make_sweep_mesh(run_shards: int = 1, devices=None) -> Mesh:
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


def sweep_state_shardings(abstract_states, mesh: Mesh):
    """The stacked states' shardings: every leaf's run axis as `run_sharding`, the rest replicated."""
    return jax.tree.map(lambda _: run_sharding(mesh), abstract_states)


def check_runs_fit_mesh(num_runs: int, mesh: Mesh) -> None:
    """Fail early, with a readable message, when the runs cannot be split evenly over RUN_AXIS."""
    if RUN_AXIS in mesh.axis_names and num_runs % mesh.shape[RUN_AXIS]:
        raise ValueError(f"{num_runs} runs cannot be split evenly over {mesh.shape[RUN_AXIS]} run shards")


def shard_and_jit_vectorised_step(step: Callable, state_shardings, mesh: Mesh) -> Callable:
    """`jit` the vectorised step: states and hparams split by run (or replicated), the batch over
    DATA_AXIS, metrics [N] like the hparams; states donated."""
    runs = run_sharding(mesh)
    options = cpu_runtime.compiler_options(mesh.devices.flat)
    if isinstance(step, PerRunStep):
        if RUN_AXIS in mesh.axis_names:
            raise ValueError('run_loop "dispatch" steps one run at a time on every device: use run_shards=1')
        replicated = sharding.replicated(mesh)
        return DispatchedStep(
            jax.jit(
                step.on_stacked,
                in_shardings=(state_shardings, replicated, sharding.batch_sharding(mesh), replicated, runs),
                out_shardings=(state_shardings, replicated),
                donate_argnums=(0,),
                compiler_options=options,
            )
        )
    return jax.jit(
        step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh), runs),
        out_shardings=(state_shardings, runs),
        donate_argnums=(0,),
        compiler_options=options,
    )
