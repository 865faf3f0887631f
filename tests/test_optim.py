"""The optimiser with known answers: gradient clipping is applied before Adam."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bclip import optim

LR, EPS = 0.1, 1.0  # a large eps makes Adam's first step depend on the gradient's scale


def _first_update(grad_clip_norm, grads):
    config = optim.optim_config(learning_rate=LR, warmup_steps=0, eps=EPS, weight_decay=0.0, grad_clip_norm=grad_clip_norm)
    tx = optim.make_optimizer(config)

    @jax.jit  # as in the train step: op by op, each of the update's ops would compile on its own
    def first_update(grads):
        params = {name: jnp.zeros_like(g) for name, g in grads.items()}
        return optim.scheduled_update(tx, config, 1_000_000, grads, tx.init(params), params, LR, 0.0)[0]

    return {name: np.asarray(u) for name, u in first_update(grads).items()}


def _adam_first_step(g: np.ndarray) -> np.ndarray:
    # Bias-corrected first step: m_hat = g, v_hat = g^2, so the update is -lr * g / (|g| + eps).
    return -LR * g / (np.abs(g) + EPS)


@pytest.mark.parametrize("clip", [None, 1.0, 100.0])
def test_gradients_are_clipped_to_the_global_norm_before_adam(clip):
    grads = {"a": jnp.asarray([3.0, -4.0]), "b": jnp.asarray([[12.0]])}  # global norm 13
    norm = 13.0
    scale = 1.0 if clip is None else min(1.0, clip / norm)
    updates = _first_update(clip, grads)
    for name, g in grads.items():
        np.testing.assert_allclose(updates[name], _adam_first_step(np.asarray(g) * scale), rtol=1e-5)
    if clip == 1.0:
        # Clipped: each update is much smaller than the unclipped one (e.g. 3/13 / (3/13 + 1) vs 3/4).
        assert abs(updates["a"][0]) < 0.25 * LR < abs(_adam_first_step(np.asarray(3.0)))
