"""Each loss against an independent float64 numpy implementation, on one device and sharded over 8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bclip import objectives, sharding


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
    got = objectives.mmcl_loss(jnp.asarray(i, jnp.float32), jnp.asarray(t, jnp.float32), jnp.float32(np.log(1 / 0.07)))
    np.testing.assert_allclose(float(got), np_mmcl(i, t, np.log(1 / 0.07)), rtol=1e-5)


def test_mmcl_is_symmetric_and_small_for_matched_pairs(embeddings):
    i, t = embeddings[:2]
    f = lambda a, b: float(objectives.mmcl_loss(jnp.asarray(a), jnp.asarray(b), jnp.float32(np.log(100.0))))
    np.testing.assert_allclose(f(i, t), f(t, i), rtol=1e-6)
    # Identical towers: the diagonal dominates at scale 100, so the loss is near zero.
    assert f(i, i) < 0.05 < f(i, t)


def test_ssl_matches_numpy(embeddings):
    i, ia, t, ta = embeddings
    got = objectives.ssl_loss(*(jnp.asarray(x, jnp.float32) for x in (i, ia, t, ta)), jnp.float32(2.0))
    np.testing.assert_allclose(float(got), np_ssl(i, ia, t, ta, 2.0), rtol=1e-5)


def test_siglip_matches_numpy(embeddings):
    i, t = embeddings[:2]
    got = objectives.siglip_loss(jnp.asarray(i, jnp.float32), jnp.asarray(t, jnp.float32), jnp.float32(np.log(10.0)), jnp.float32(-10.0))
    np.testing.assert_allclose(float(got), np_siglip(i, t, np.log(10.0), -10.0), rtol=1e-5)


def test_combined_loss_weights(embeddings):
    i, ia, t, ta = (jnp.asarray(x, jnp.float32) for x in embeddings)
    emb = {"image": i, "text": t, "aug_image": ia, "aug_text": ta}
    scale = jnp.float32(1.0)
    total, terms = objectives.combined_loss(emb, scale, None, objectives.objective_config(mmcl=1.0, ssl=2.0))
    np.testing.assert_allclose(float(terms["mmcl"]), np_mmcl(*embeddings[0:1], embeddings[2], 1.0), rtol=1e-5)
    np.testing.assert_allclose(float(total), float(terms["mmcl"]) + 2.0 * float(terms["ssl"]), rtol=1e-6)
    total, terms = objectives.combined_loss(emb, scale, None, objectives.objective_config(mmcl=0.0, ssl=1.0))
    assert set(terms) == {"ssl"}
    with pytest.raises(ValueError, match="siglip_bias"):
        objectives.combined_loss(emb, scale, None, objectives.objective_config(mmcl=0.0, siglip=1.0))
    with pytest.raises(ValueError, match="zero"):
        objectives.combined_loss(emb, scale, None, objectives.objective_config(mmcl=0.0))


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
