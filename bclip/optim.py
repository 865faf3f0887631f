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


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """AdamW as CLIP trains it; `optax.inject_hyperparams` exposes the learning rate for logging."""
    schedule = learning_rate_schedule(optim, total_steps)
    # The mask is a function of the params, not a schedule: keep it out of the injected values.
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=schedule,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=weight_decay_mask,
    )
    if optim.grad_clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw)


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
