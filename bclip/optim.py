"""The optimiser: AdamW with linear warm-up then cosine decay, weight decay on weight matrices only."""

import jax
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
