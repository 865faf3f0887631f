"""The optimiser: AdamW with linear warm-up then cosine decay (optionally a constant rate in chosen
epochs), weight decay on weight matrices only."""

import math
import numbers

import jax
import jax.numpy as jnp
import ml_collections
import optax


def optim_config(**overrides) -> ml_collections.ConfigDict:
    """The optimiser section of a config, with CLIP's pretraining defaults."""
    config = ml_collections.ConfigDict(
        {
            "learning_rate": 1e-3,
            "warmup_steps": 10_000,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.1,
            # None disables clipping; otherwise the global gradient norm is clipped to this.
            "grad_clip_norm": ml_collections.config_dict.placeholder(float),
            # {epoch: rate}: train each listed epoch (0-based, as metrics.jsonl counts them) at this
            # constant rate instead of the schedule's, e.g. SafeCLIP's cross-modal warm-up at 5e-6.
            # The same rate for every run of a group. Those steps still advance the schedule, which
            # resumes afterwards where it would have been. On the command line:
            # --config.optim.epoch_learning_rates='{5: 5e-6}'.
            "epoch_learning_rates": {},
        }
    )
    config.update(overrides)
    return config


def learning_rate_schedule(
    optim: ml_collections.ConfigDict, total_steps: int, peak=None, steps_per_epoch: int | None = None
) -> optax.Schedule:
    """Linear warm-up from 0 to the peak over `warmup_steps`, then cosine decay to 0 at `total_steps`;
    in the epochs of `optim.epoch_learning_rates`, their constant rate instead.

    peak: the peak learning rate, default optim.learning_rate; a traced scalar in the train step,
    where each run's peak is a hyper-parameter argument. Built from optax's two pieces rather than
    `warmup_cosine_decay_schedule`, which branches on the peak's value in Python; the arithmetic is
    the same.
    steps_per_epoch: the run's steps per epoch (total_steps is a whole number of epochs); needed
    only when optim.epoch_learning_rates lists any.

    The schedule counts from the optimiser's own step 0, so a cleaning run started from a pretrained
    checkpoint gets its full warm-up (the reference skipped its first epoch). An overridden epoch's
    steps count too: the step after it gets the schedule's rate at that step, as in SafeCLIP's code,
    which sets each step's rate from its epoch and batch index.
    """
    peak = optim.learning_rate if peak is None else peak
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps, warmup + 1)
    schedule = optax.join_schedules(
        [
            optax.linear_schedule(init_value=0.0, end_value=peak, transition_steps=warmup),
            optax.cosine_decay_schedule(init_value=peak, decay_steps=decay_steps - warmup, alpha=0.0),
        ],
        [warmup],
    )
    if not optim.epoch_learning_rates:
        return schedule  # exactly the plain schedule, as before epoch overrides existed
    if steps_per_epoch is None:
        raise ValueError("config.optim.epoch_learning_rates is set: the schedule needs the run's steps_per_epoch")
    overrides = epoch_learning_rates(optim, total_steps // steps_per_epoch)

    def with_overrides(count):
        rate = schedule(count)
        epoch = count // steps_per_epoch
        for overridden, constant in overrides.items():
            rate = jnp.where(epoch == overridden, jnp.asarray(constant, rate.dtype), rate)
        return rate

    return with_overrides


def epoch_learning_rates(optim: ml_collections.ConfigDict, num_epochs: int) -> dict[int, float]:
    """optim.epoch_learning_rates checked against a run of `num_epochs`: {epoch: rate}, each epoch
    an integer in [0, num_epochs), each rate a finite number >= 0. Anything else is a ValueError
    naming the entry."""
    where = "config.optim.epoch_learning_rates"
    checked = {}
    for epoch, rate in optim.epoch_learning_rates.items():
        # bool is an int to Python, and a string key ("5") is what a JSON round trip leaves.
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
            raise ValueError(f"{where}: key {epoch!r} ({type(epoch).__name__}) is not an integer epoch")
        if not 0 <= epoch < num_epochs:
            raise ValueError(f"{where}: epoch {epoch} is outside the run's epochs 0..{num_epochs - 1}")
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not math.isfinite(rate) or rate < 0:
            raise ValueError(f"{where}[{epoch}]: the rate must be a finite number >= 0, got {rate!r}")
        checked[int(epoch)] = float(rate)
    return checked


def weight_decay_mask(params):
    """True for weight matrices and kernels; False for norms, biases, gains, the class token and the
    temperature (every parameter with fewer than 2 dimensions)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


# The optimiser's per-run hyper-parameters, set by the train step before every update (see
# with_hyperparams): a run's peak learning rate times the schedule, and its weight decay.
HYPERPARAMS = ("learning_rate", "weight_decay")


def make_optimizer(optim: ml_collections.ConfigDict, resettable_head: str | None = None) -> optax.GradientTransformation:
    """AdamW as CLIP trains it, with the learning rate and weight decay as state values
    (`optax.inject_hyperparams`) that the train step sets before each update, so that they are
    per-run arguments of one compiled step (and the learning rate is logged).

    resettable_head: a top-level parameter (e.g. deep clustering's "cluster_head") updated by its own
    AdamW with the same settings and learning rate, so that `reset_head_moments` can restart its
    moments and bias correction alone while the rest of the model's optimiser state runs on.
    """
    # The mask is a function of the params, not a hyper-parameter: keep it out of the injected values.
    injected_adamw = lambda: optax.inject_hyperparams(optax.adamw, static_args=("mask",))(  # noqa: E731
        learning_rate=0.0, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=0.0, mask=weight_decay_mask
    )
    adamw = injected_adamw()
    if resettable_head is not None:
        labels = lambda params: {name: (_HEAD if name == resettable_head else _MODEL) for name in params}  # noqa: E731
        adamw = optax.multi_transform({_MODEL: adamw, _HEAD: injected_adamw()}, labels)
    if optim.grad_clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw)


def scheduled_update(
    tx, optim_config, total_steps: int, grads, opt_state, params, learning_rate, weight_decay, steps_per_epoch: int | None = None
):
    """`tx.update` (tx from `make_optimizer`) with a run's hyper-parameters: the learning rate of
    this update is the schedule of peak `learning_rate` at the optimiser's update count (with
    optim_config.epoch_learning_rates, the epoch's constant where it lists one; the epoch is the
    count // steps_per_epoch).

    Returns:
      (updates, new opt_state)
    """
    schedule = learning_rate_schedule(optim_config, total_steps, peak=learning_rate, steps_per_epoch=steps_per_epoch)
    opt_state = with_hyperparams(opt_state, learning_rate=schedule(update_count(opt_state)), weight_decay=weight_decay)
    return tx.update(grads, opt_state, params)


def _is_injected(node) -> bool:
    return hasattr(node, "hyperparams") and "learning_rate" in getattr(node, "hyperparams", {})


def update_count(opt_state) -> jax.Array:
    """How many updates the optimiser has made (its injected state's count, never reset; with a
    resettable head, the model part's)."""
    for node in jax.tree.leaves(opt_state, is_leaf=_is_injected):
        if _is_injected(node):
            return node.count
    raise ValueError("optimizer state holds no injected hyperparameters: build it with make_optimizer")


def with_hyperparams(opt_state, **values: jax.Array):
    """`opt_state` with the injected hyperparameters (`learning_rate`, `weight_decay`) replaced in
    every injected AdamW (the model's and a resettable head's)."""

    def replace(node):
        if not _is_injected(node):
            return node
        return node._replace(hyperparams={**node.hyperparams, **values})

    return jax.tree.map(replace, opt_state, is_leaf=_is_injected)


_MODEL, _HEAD = "model", "resettable_head"


def reset_head_moments(opt_state):
    """`opt_state` of `make_optimizer(..., resettable_head=...)` with the head's Adam state fresh:
    zero moments AND a zero step count. Zeroing the moments alone would keep the run's step count,
    so the head's first updates would skip Adam's bias correction (about 3x too large at b1 0.9,
    b2 0.999). The head's schedule step and every other parameter's state are left as they are."""
    is_split = lambda node: isinstance(node, optax.MultiTransformState)  # noqa: E731
    is_adam = lambda node: isinstance(node, optax.ScaleByAdamState)  # noqa: E731

    def fresh(node):
        if not is_adam(node):
            return node
        return optax.ScaleByAdamState(
            count=jnp.zeros_like(node.count), mu=jax.tree.map(jnp.zeros_like, node.mu), nu=jax.tree.map(jnp.zeros_like, node.nu)
        )

    def reset(node):
        if not is_split(node):
            return node
        if _HEAD not in node.inner_states:
            raise ValueError("optimizer state has no resettable head: build it with make_optimizer(resettable_head=...)")
        inner = dict(node.inner_states)
        inner[_HEAD] = jax.tree.map(fresh, inner[_HEAD], is_leaf=is_adam)
        return node._replace(inner_states=inner)

    found = []
    state = jax.tree.map(lambda node: found.append(node) or reset(node), opt_state, is_leaf=is_split)
    if not any(is_split(node) for node in found):
        raise ValueError("optimizer state has no resettable head: build it with make_optimizer(resettable_head=...)")
    return state


def current_learning_rate(opt_state) -> jax.Array:
    """The learning rate the last update used, read from the injected hyperparameters."""
    for node in jax.tree.leaves(opt_state, is_leaf=_is_injected):
        if _is_injected(node):
            return node.hyperparams["learning_rate"]
    raise ValueError("optimizer state holds no injected learning rate")


def _is_adam_state(node) -> bool:
    return isinstance(node, optax.ScaleByAdamState)


def adam_state(opt_state) -> optax.ScaleByAdamState:
    """The one Adam state (count, mu, nu) inside a `make_optimizer` state."""
    found = [node for node in jax.tree.leaves(opt_state, is_leaf=_is_adam_state) if _is_adam_state(node)]
    if len(found) != 1:
        raise ValueError(f"optimizer state holds {len(found)} Adam states, expected exactly one")
    return found[0]


def with_reloaded_adam(opt_state, saved_opt_state):
    """A fresh `make_optimizer` state continuing a saved one as PyTorch's AdamW reload does.

    Adam's moments (mu, nu) and its step count (which sets the bias correction) come from
    `saved_opt_state`; parameters it has no moments for (a deep-clustering head added for cleaning)
    keep the fresh zeros. The injected hyperparameters' own step count, which drives the
    learning-rate schedule, stays at `opt_state`'s (0 for a fresh state): PyTorch keeps the
    scheduler apart from the optimizer state, so the schedule starts over. (PyTorch's
    `optimizer.load_state_dict` also replaces the weight decay: the caller sets the run's
    weight-decay hyper-parameter to the saved run's.)
    """
    # With a resettable head (deep clustering), only the model's part continues the saved run: the
    # head is new and keeps its fresh state.
    return _on_model_part(opt_state, lambda model_part: _with_reloaded_adam(model_part, saved_opt_state))


def _on_model_part(opt_state, function):
    """`function` applied to the model's part of a `make_optimizer` state (all of it without a
    resettable head)."""
    is_split = lambda node: isinstance(node, optax.MultiTransformState)  # noqa: E731
    if not any(is_split(node) for node in jax.tree.leaves(opt_state, is_leaf=is_split)):
        return function(opt_state)

    def apply(node):
        if not is_split(node):
            return node
        return node._replace(inner_states={**node.inner_states, _MODEL: function(node.inner_states[_MODEL])})

    return jax.tree.map(apply, opt_state, is_leaf=is_split)


def _with_reloaded_adam(opt_state, saved_opt_state):
    saved = adam_state(saved_opt_state)
    unknown = sorted(set(saved.mu) - set(adam_state(opt_state).mu))
    if unknown:
        raise ValueError(f"saved Adam moments for parameters the model does not have: {unknown}")

    def take_saved(node):
        if not _is_adam_state(node):
            return node
        return node._replace(count=saved.count, mu={**node.mu, **saved.mu}, nu={**node.nu, **saved.nu})

    return jax.tree.map(take_saved, opt_state, is_leaf=_is_adam_state)
