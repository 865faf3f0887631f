"""Cleaning-method internals with known answers: the deep-clustering head's optimiser reset, its
loss and spherical k-means."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bclip import cleaning, optim

B1, B2, EPS, LR = 0.9, 0.999, 1e-8, 0.01


def _optimizer(resettable_head=cleaning.CLUSTER_HEAD, grad_clip_norm=None):
    # Constant learning rate after a one-step warm-up: lr(0) = 0, lr(t >= 1) = LR (cosine over a
    # long run changes it by < 1e-6 in the steps below).
    config = optim.optim_config(learning_rate=LR, warmup_steps=1, b1=B1, b2=B2, eps=EPS, weight_decay=0.0, grad_clip_norm=grad_clip_norm)
    return optim.make_optimizer(config, resettable_head=resettable_head)


@functools.partial(jax.jit, static_argnums=0)
def _update(tx, grads, state, params):
    """One update at the run's learning rate, as the train step makes it (jitted, as there: op by
    op each of the update's ops would compile on its own)."""
    return optim.scheduled_update(tx, optim.optim_config(warmup_steps=1), 10_000_000, grads, state, params, LR, 0.0)


def _params():
    return {
        "logit_scale": jnp.asarray(2.0),
        "image_tower": {"kernel": jnp.ones((2, 3))},
        cleaning.CLUSTER_HEAD: {"kernel": jnp.ones((2, 4)), "bias": jnp.zeros((4,))},
    }


def _adam_update(grads: list[np.ndarray], learning_rates: list[float]) -> np.ndarray:
    """Adam's total parameter change over `grads`, written out from its definition (numpy)."""
    mu = nu = 0.0
    change = 0.0
    for t, (g, lr) in enumerate(zip(grads, learning_rates), start=1):
        mu = B1 * mu + (1 - B1) * g
        nu = B2 * nu + (1 - B2) * g * g
        change = change - lr * (mu / (1 - B1**t)) / (np.sqrt(nu / (1 - B2**t)) + EPS)
    return change


@pytest.mark.parametrize("grad_clip_norm", [None, 1e6])
def test_head_reset_restarts_adam_bias_correction_and_keeps_the_schedule(grad_clip_norm):
    tx = _optimizer(grad_clip_norm=grad_clip_norm)
    params = _params()
    state = tx.init(params)
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(6)]

    # Four steps (the first at learning rate 0), then the head is reset.
    for g in grads[:4]:
        _, state = _update(tx, g, state, params)
    state = optim.reset_head_moments(state)

    head_changes, model_changes = [], []
    for g in grads[4:]:
        updates, state = _update(tx, g, state, params)
        head_changes.append(np.asarray(updates[cleaning.CLUSTER_HEAD]["kernel"]))
        model_changes.append(np.asarray(updates["image_tower"]["kernel"]))

    head_grads = [np.asarray(g[cleaning.CLUSTER_HEAD]["kernel"]) for g in grads[4:]]
    # The head trains as a freshly created one: Adam steps 1 and 2, at the run's learning rate.
    np.testing.assert_allclose(head_changes[0], _adam_update(head_grads[:1], [LR]), rtol=1e-5)
    np.testing.assert_allclose(head_changes[0] + head_changes[1], _adam_update(head_grads, [LR, LR]), rtol=1e-5)
    # The first step after the reset moves each head weight by about lr (bias-corrected); with the
    # run's step count kept instead it would be (1 - b1) / sqrt(1 - b2) = 3.16 times that.
    np.testing.assert_allclose(np.abs(head_changes[0]), LR, rtol=1e-4)

    # The rest of the model carries on as if nothing happened: steps 5 and 6 of one Adam run.
    model_grads = [np.asarray(g["image_tower"]["kernel"]) for g in grads]
    lrs = [0.0, LR, LR, LR, LR, LR]
    np.testing.assert_allclose(model_changes[0], _adam_update(model_grads[:5], lrs[:5]) - _adam_update(model_grads[:4], lrs[:4]), rtol=1e-4)


def test_head_reset_needs_a_separate_head_state():
    tx = _optimizer(resettable_head=None)
    with pytest.raises(ValueError, match="no resettable head"):
        optim.reset_head_moments(tx.init(_params()))


def test_reset_cluster_head_gives_new_weights_and_fresh_moments():
    tx = _optimizer()
    params = _params()
    opt = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        _, opt = _update(tx, grads, opt, params)
    state = {"params": params, "opt": opt, "batch_stats": {}, "step": jnp.asarray(3)}
    reset = cleaning.reset_cluster_head(state, jax.random.key(1), embed_dim=2, num_clusters=4)

    head = reset["params"][cleaning.CLUSTER_HEAD]
    assert head["kernel"].shape == (2, 4) and not np.allclose(head["kernel"], 1.0)
    np.testing.assert_array_equal(head["bias"], 0.0)
    assert reset["params"]["image_tower"] is params["image_tower"]

    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731
    adam_states = [s for s in jax.tree.leaves(reset["opt"], is_leaf=is_adam) if is_adam(s)]
    assert len(adam_states) == 2  # the model's and the head's
    counts = sorted(int(s.count) for s in adam_states)
    assert counts == [0, 3]
    head_state = next(s for s in adam_states if int(s.count) == 0)
    model_state = next(s for s in adam_states if int(s.count) == 3)
    np.testing.assert_array_equal(head_state.mu[cleaning.CLUSTER_HEAD]["kernel"], 0.0)
    np.testing.assert_array_equal(head_state.nu[cleaning.CLUSTER_HEAD]["bias"], 0.0)
    # The model's moments are untouched (all gradients were 1, so mu = 1 - 0.9^3).
    np.testing.assert_allclose(model_state.mu["image_tower"]["kernel"], 1 - B1**3, rtol=1e-6)



def test_reloaded_adam_continues_the_model_and_leaves_a_new_head_fresh():
    """Cleaning with deep clustering and train.reload_optimizer_state: the model's Adam state is the
    pretraining run's (which had no head), the head's stays fresh."""
    pretraining_params = {k: v for k, v in _params().items() if k != cleaning.CLUSTER_HEAD}
    pretraining_tx = _optimizer(resettable_head=None)
    saved = pretraining_tx.init(pretraining_params)
    grads = jax.tree.map(jnp.ones_like, pretraining_params)
    for _ in range(5):
        _, saved = _update(pretraining_tx, grads, saved, pretraining_params)

    state = optim.with_reloaded_adam(_optimizer().init(_params()), saved)
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731
    model_adam, head_adam = [s for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s)]
    assert int(model_adam.count) == 5 and int(head_adam.count) == 0
    np.testing.assert_allclose(model_adam.mu["image_tower"]["kernel"], 1 - B1**5, rtol=1e-6)
    np.testing.assert_array_equal(head_adam.mu[cleaning.CLUSTER_HEAD]["kernel"], 0.0)
    # The schedule's own count starts over (the step sets the run's learning rate from it).
    assert int(optim.update_count(state)) == 0


# ---------------------------------------------------------------------------------------------
# Deep clustering: the loss and spherical k-means with known answers
# ---------------------------------------------------------------------------------------------


def test_cluster_loss_is_the_mean_cross_entropy_of_rows_with_a_cluster():
    from bclip import objectives

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
    ids = np.array([0, 4, -1, 2, 2, -1])
    # Cross-entropy from its definition, over the four rows that have a cluster.
    expected = np.mean([np.log(np.exp(logits[i]).sum()) - logits[i, ids[i]] for i in (0, 1, 3, 4)])
    cluster_loss = jax.jit(objectives.cluster_loss)  # op by op, each of its ops would compile alone
    np.testing.assert_allclose(cluster_loss(jnp.asarray(logits), jnp.asarray(ids)), expected, rtol=1e-6)
    # No row with a cluster: the term is 0, not NaN.
    assert float(cluster_loss(jnp.asarray(logits), np.full(6, -1))) == 0.0


def test_spherical_kmeans_finds_well_separated_directions():
    # Three tight bundles of unit vectors around the axes of R^3, 5 vectors each, shuffled, plus two
    # invalid rows that point elsewhere and must be left out.
    rng = np.random.default_rng(1)
    axes = np.eye(3)
    truth = rng.permutation(np.repeat(np.arange(3), 5))
    vectors = axes[truth] + 0.05 * rng.normal(size=(15, 3))
    vectors = np.concatenate([vectors, [[1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]]])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    valid = np.arange(17) < 15
    kmeans = jax.jit(cleaning.spherical_kmeans, static_argnums=(2, 3))  # jitted, as the cleaning pass runs it
    assignments, centroids = kmeans(jnp.asarray(vectors, jnp.float32), jnp.asarray(valid), 3, 10, jax.random.key(0))
    assignments, centroids = np.asarray(assignments), np.asarray(centroids)
    np.testing.assert_array_equal(assignments[15:], -1)
    # The same partition as the truth, whatever the cluster numbering.
    mapping = {t: a for t, a in zip(truth, assignments[:15])}
    assert len(set(mapping.values())) == 3
    np.testing.assert_array_equal(assignments[:15], [mapping[t] for t in truth])
    # Each centroid is the normalised mean of its bundle (unit length, next to its axis).
    for t, a in mapping.items():
        members = vectors[:15][truth == t]
        mean = members.sum(axis=0) / np.linalg.norm(members.sum(axis=0))
        np.testing.assert_allclose(centroids[a], mean, atol=1e-5)
