"""Each loss against an independent float64 numpy implementation, on one device and sharded over 8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bclip import objectives, sharding

# The losses jitted, as the train step runs them: op by op, each of their ops would compile alone.
_mmcl_loss = jax.jit(objectives.mmcl_loss)
_ssl_loss = jax.jit(objectives.ssl_loss)
_siglip_loss = jax.jit(objectives.siglip_loss)


def _normalised(rng, b, d):
    x = rng.normal(size=(b, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_cross_entropy_diag(logits):
    # Row-wise softmax cross-entropy with target i for row i, written out term by term.
    losses = []
    for i, row in enumerate(logits):
        m = row.max()
        log_z = m + np.log(np.sum(np.exp(row - m)))
        losses.append(log_z - row[i])
    return float(np.mean(losses))


def np_mmcl(i, t, log_scale):
    s = np.exp(log_scale)
    logits = s * i @ t.T
    return 0.5 * (_np_cross_entropy_diag(logits) + _np_cross_entropy_diag(logits.T))


def np_ssl(i, ia, t, ta, log_scale):
    s = np.exp(log_scale)
    return 0.5 * (_np_cross_entropy_diag(s * i @ ia.T) + _np_cross_entropy_diag(s * t @ ta.T))


def np_siglip(i, t, log_scale, bias):
    s = np.exp(log_scale)
    total = 0.0
    b = i.shape[0]
    for r in range(b):
        for c in range(b):
            z = 1.0 if r == c else -1.0
            logit = s * float(i[r] @ t[c]) + bias
            total += np.log1p(np.exp(-z * logit))
    return total / b


@pytest.fixture
def embeddings():
    rng = np.random.default_rng(0)
    return [_normalised(rng, 16, 8) for _ in range(4)]


def test_mmcl_matches_numpy(embeddings):
    i, t = embeddings[:2]
    got = _mmcl_loss(jnp.asarray(i, jnp.float32), jnp.asarray(t, jnp.float32), jnp.float32(np.log(1 / 0.07)))
    np.testing.assert_allclose(float(got), np_mmcl(i, t, np.log(1 / 0.07)), rtol=1e-5)


def test_mmcl_is_symmetric_and_small_for_matched_pairs(embeddings):
    i, t = embeddings[:2]
    f = lambda a, b: float(_mmcl_loss(jnp.asarray(a), jnp.asarray(b), jnp.float32(np.log(100.0))))
    np.testing.assert_allclose(f(i, t), f(t, i), rtol=1e-6)
    # Identical towers: the diagonal dominates at scale 100, so the loss is near zero.
    assert f(i, i) < 0.05 < f(i, t)


def test_ssl_matches_numpy(embeddings):
    i, ia, t, ta = embeddings
    got = _ssl_loss(*(jnp.asarray(x, jnp.float32) for x in (i, ia, t, ta)), jnp.float32(2.0))
    np.testing.assert_allclose(float(got), np_ssl(i, ia, t, ta, 2.0), rtol=1e-5)


def test_siglip_matches_numpy(embeddings):
    i, t = embeddings[:2]
    got = _siglip_loss(jnp.asarray(i, jnp.float32), jnp.asarray(t, jnp.float32), jnp.float32(np.log(10.0)), jnp.float32(-10.0))
    np.testing.assert_allclose(float(got), np_siglip(i, t, np.log(10.0), -10.0), rtol=1e-5)


def test_combined_loss_weights(embeddings):
    i, ia, t, ta = (jnp.asarray(x, jnp.float32) for x in embeddings)
    inputs = {"image": i, "text": t, "aug_image": ia, "aug_text": ta, "logit_scale": jnp.float32(1.0), "logit_bias": None}
    total, terms = objectives.combined_loss(inputs, objectives.objective_config(mmcl=1.0, ssl=2.0))
    np.testing.assert_allclose(float(terms["mmcl"]), np_mmcl(*embeddings[0:1], embeddings[2], 1.0), rtol=1e-5)
    np.testing.assert_allclose(float(total), float(terms["mmcl"]) + 2.0 * float(terms["ssl"]), rtol=1e-6)
    # A run's own weights (hyper-parameters) replace the objective's, which only choose the terms.
    weighted, _ = objectives.combined_loss(inputs, objectives.objective_config(mmcl=1.0, ssl=2.0), {"mmcl_weight": 0.5, "ssl_weight": 3.0})
    np.testing.assert_allclose(float(weighted), 0.5 * float(terms["mmcl"]) + 3.0 * float(terms["ssl"]), rtol=1e-6)
    total, terms = objectives.combined_loss(inputs, objectives.objective_config(mmcl=0.0, ssl=1.0))
    assert set(terms) == {"ssl"}
    with pytest.raises(ValueError, match="siglip_bias"):
        objectives.combined_loss(inputs, objectives.objective_config(mmcl=0.0, siglip=1.0))
    with pytest.raises(ValueError, match="zero"):
        objectives.combined_loss(inputs, objectives.objective_config(mmcl=0.0))


def _np_weighted_cross_entropy_diag(logits, weights):
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -np.sum(weights * np.diag(log_probs)) / np.sum(weights)


def test_per_pair_weights_weigh_the_positives_and_keep_every_negative(embeddings):
    """With per-pair weights (a per-epoch pass's table), MMCL and SSL are the weighted means of the
    rows' cross-entropies, every pair still a negative; weights of one are the plain loss."""
    i, ia, t, ta = embeddings
    weights = np.zeros(len(i))
    weights[::3] = 1.0
    weights[1] = 2.5
    s = np.exp(0.7)
    expected_mmcl = 0.5 * (_np_weighted_cross_entropy_diag(s * i @ t.T, weights) + _np_weighted_cross_entropy_diag(s * t @ i.T, weights))
    expected_ssl = 0.5 * (_np_weighted_cross_entropy_diag(s * i @ ia.T, weights) + _np_weighted_cross_entropy_diag(s * t @ ta.T, weights))
    inputs = {
        "image": i, "text": t, "aug_image": ia, "aug_text": ta,
        "logit_scale": jnp.float32(0.7), "logit_bias": None, objectives.PAIR_WEIGHTS: jnp.asarray(weights, jnp.float32),
    }
    inputs = {k: (jnp.asarray(v, jnp.float32) if isinstance(v, np.ndarray) else v) for k, v in inputs.items()}
    _, terms = objectives.combined_loss(inputs, objectives.objective_config(mmcl=1.0, ssl=1.0))
    np.testing.assert_allclose(float(terms["mmcl"]), expected_mmcl, rtol=1e-5)
    np.testing.assert_allclose(float(terms["ssl"]), expected_ssl, rtol=1e-5)
    ones = {**inputs, objectives.PAIR_WEIGHTS: jnp.ones(len(i), jnp.float32)}
    _, plain = objectives.combined_loss(ones, objectives.objective_config(mmcl=1.0))
    np.testing.assert_allclose(float(plain["mmcl"]), np_mmcl(i, t, 0.7), rtol=1e-5)


def test_objective_config_has_one_weight_per_term():
    config = objectives.objective_config(ssl=2.0)
    assert config.to_dict() == {
        "mmcl_weight": 1.0,
        "safe_mmcl_weight": 0.0,
        "risky_ssl_weight": 0.0,
        "ssl_weight": 2.0,
        "siglip_weight": 0.0,
        "cluster_weight": 0.0,
        "par_weight": 0.0,
        # A term's options come after the weights, at their defaults.
        "par_threshold": 2.15,
    }
    assert objectives.active_terms(config) == ("mmcl", "ssl")
    assert objectives.needs_augmented_views(config) and not objectives.needs_augmented_views(objectives.objective_config())
    with pytest.raises(ValueError, match=r"unknown objective terms \['ssl_weight'\]"):
        objectives.objective_config(ssl_weight=1.0)


def test_losses_equal_on_one_device_and_sharded_over_eight(embeddings):
    """Negatives span the global batch: the sharded value equals the single-device one."""
    assert jax.device_count() == 8
    mesh = sharding.make_mesh()
    split = NamedSharding(mesh, P("data"))
    arrays = [jnp.asarray(x, jnp.float32) for x in embeddings]
    sharded = [jax.device_put(x, split) for x in arrays]
    single = [jax.device_put(x, jax.devices()[0]) for x in arrays]
    scale, bias = jnp.float32(2.5), jnp.float32(-3.0)
    fns = {
        "mmcl": lambda i, ia, t, ta: objectives.mmcl_loss(i, t, scale),
        "ssl": lambda i, ia, t, ta: objectives.ssl_loss(i, ia, t, ta, scale),
        "siglip": lambda i, ia, t, ta: objectives.siglip_loss(i, t, scale, bias),
    }
    for name, fn in fns.items():
        a = float(jax.jit(fn)(*sharded))
        b = float(jax.jit(fn)(*single))
        np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=name)
