"""The optimiser: AdamW with linear warm-up then cosine decay, weight decay on weight matrices only."""

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
        }
    )
    config.update(overrides)
    return config


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak over `warmup_steps`, then cosine decay to 0 at `total_steps`.

    The schedule counts from the optimiser's own step 0, so a cleaning run started from a pretrained
    checkpoint gets its full warm-up (the reference skipped its first epoch).
    """
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )


def weight_decay_mask(params):
    """True for weight matrices and kernels; False for norms, biases, gains, the class token and the
    temperature (every parameter with fewer than 2 dimensions)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int, resettable_head: str | None = None
) -> optax.GradientTransformation:
    """AdamW as CLIP trains it; `optax.inject_hyperparams` exposes the learning rate for logging.

    resettable_head: a top-level parameter (e.g. deep clustering's "cluster_head") updated by its own
    AdamW with the same settings and schedule, so that `reset_head_moments` can restart its moments
    and bias correction alone while the rest of the model's optimiser state runs on.
    """
    schedule = learning_rate_schedule(optim, total_steps)
    adamw_options = dict(b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=weight_decay_mask)
    # The mask is a function of the params, not a schedule: keep it out of the injected values.
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(learning_rate=schedule, **adamw_options)
    if resettable_head is not None:
        labels = lambda params: {name: (_HEAD if name == resettable_head else _MODEL) for name in params}  # noqa: E731
        # The head's schedule step (kept in its ScaleByScheduleState) advances with every update and
        # is never reset, so the head follows the run's learning rate whatever its Adam count.
        head_adamw = optax.adamw(learning_rate=schedule, **adamw_options)
        adamw = optax.multi_transform({_MODEL: adamw, _HEAD: head_adamw}, labels)
    if optim.grad_clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw)


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
    has_hyperparams = lambda s: hasattr(s, "hyperparams") and "learning_rate" in s.hyperparams
    for state in jax.tree.leaves(opt_state, is_leaf=has_hyperparams):
        if has_hyperparams(state):
            return state.hyperparams["learning_rate"]
    raise ValueError("optimizer state holds no injected learning rate")


def _is_adam_state(node) -> bool:
    return isinstance(node, optax.ScaleByAdamState)


def _has_injected_weight_decay(node) -> bool:
    return hasattr(node, "hyperparams") and "weight_decay" in node.hyperparams


def adam_state(opt_state) -> optax.ScaleByAdamState:
    """The one Adam state (count, mu, nu) inside a `make_optimizer` state."""
    found = [node for node in jax.tree.leaves(opt_state, is_leaf=_is_adam_state) if _is_adam_state(node)]
    if len(found) != 1:
        raise ValueError(f"optimizer state holds {len(found)} Adam states, expected exactly one")
    return found[0]


def with_reloaded_adam(opt_state, saved_opt_state, weight_decay: float):
    """A fresh `make_optimizer` state continuing a saved one as PyTorch's AdamW reload does.

    Adam's moments (mu, nu) and its step count (which sets the bias correction) come from
    `saved_opt_state`; parameters it has no moments for (a deep-clustering head added for cleaning)
    keep the fresh zeros. The injected weight decay becomes `weight_decay`, because PyTorch's
    `optimizer.load_state_dict` also replaces the hyper-parameters. The injected hyperparameters'
    own step count, which drives the learning-rate schedule, stays at `opt_state`'s (0 for a fresh
    state): PyTorch keeps the scheduler apart from the optimizer state, so the schedule starts over.
    """
    # With a resettable head (deep clustering), only the model's part continues the saved run: the
    # head is new and keeps its fresh state.
    return _on_model_part(opt_state, lambda model_part: _with_reloaded_adam(model_part, saved_opt_state, weight_decay))


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


def _with_reloaded_adam(opt_state, saved_opt_state, weight_decay: float):
    saved = adam_state(saved_opt_state)
    unknown = sorted(set(saved.mu) - set(adam_state(opt_state).mu))
    if unknown:
        raise ValueError(f"saved Adam moments for parameters the model does not have: {unknown}")

    def take_saved(node):
        if not _is_adam_state(node):
            return node
        return node._replace(count=saved.count, mu={**node.mu, **saved.mu}, nu={**node.nu, **saved.nu})

    def set_weight_decay(node):
        if not _has_injected_weight_decay(node):
            return node
        current = node.hyperparams["weight_decay"]
        return node._replace(hyperparams={**node.hyperparams, "weight_decay": jnp.asarray(weight_decay, current.dtype)})

    opt_state = jax.tree.map(take_saved, opt_state, is_leaf=_is_adam_state)
    return jax.tree.map(set_weight_decay, opt_state, is_leaf=_has_injected_weight_decay)
