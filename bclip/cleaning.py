"""Cleaning methods beyond the loss weights: shrink-and-perturb and deep clustering.

CleanCLIP, MMCL-only, SSL-only and higher SSL weights are objective weights, and heavy weight decay
is an optimiser setting; the two methods here change the parameters or add a term and its head.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bclip import optim


def cleaning_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {
            # θ ← shrink·θ + perturb·θ_init, once before fine-tuning; off when shrink is 1 and perturb 0.
            "shrink": 1.0,
            "perturb": 0.0,
            # Deep clustering: spherical k-means on the cleaning set's image embeddings before every
            # epoch, a fresh linear head trained on the cluster ids; the term's weight is
            # objective.cluster_weight.
            "num_clusters": 1000,
            "kmeans_iterations": 20,
        }
    )
    config.update(overrides)
    return config


def shrink_and_perturb(params, init_params, shrink: float, perturb: float):
    """θ ← shrink·θ + perturb·θ_init for every parameter except the learned temperature and bias.

    The temperature is a log scale: shrinking it would silently change the softmax temperature
    instead of the weights, so it is kept.
    """

    def mix(path, p, p0):
        name = jax.tree_util.keystr(path)
        if "logit_scale" in name or "logit_bias" in name:
            return p
        return shrink * p + perturb * p0

    return jax.tree_util.tree_map_with_path(mix, params, init_params)


def spherical_kmeans(embeddings: jax.Array, valid: jax.Array, num_clusters: int, iterations: int, rng: jax.Array):
    """Spherical k-means on unit vectors; works on a batch-sharded `embeddings` under jit.

    Args:
      embeddings: [N, D] L2-normalised rows.
      valid: bool [N]; invalid rows (padding, unusable records) take no part.
      num_clusters: K ≤ number of valid rows.
      rng: picks the K initial centroids among the valid rows.

    Returns:
      (assignments int32 [N] (-1 for invalid rows), centroids [K, D])
    """
    embeddings = embeddings.astype(jnp.float32)
    n = embeddings.shape[0]
    # Random distinct valid rows as initial centroids: invalid rows sort last.
    keys = jnp.where(valid, jax.random.uniform(rng, (n,)), 2.0)
    centroids = embeddings[jnp.argsort(keys)[:num_clusters]]

    def step(centroids, _):
        assign = jnp.argmax(embeddings @ centroids.T, axis=1)
        weights = valid.astype(jnp.float32)[:, None]
        sums = jax.ops.segment_sum(embeddings * weights, assign, num_segments=num_clusters)
        norms = jnp.linalg.norm(sums, axis=1, keepdims=True)
        # An emptied cluster keeps its old centroid rather than collapsing to zero.
        new = jnp.where(norms > 0, sums / jnp.maximum(norms, 1e-12), centroids)
        return new, None

    centroids, _ = jax.lax.scan(step, centroids, None, length=iterations)
    assign = jnp.argmax(embeddings @ centroids.T, axis=1).astype(jnp.int32)
    return jnp.where(valid, assign, -1), centroids


def init_cluster_head(rng: jax.Array, embed_dim: int, num_clusters: int) -> dict:
    """A fresh linear head [D] -> [K] on the image embeddings."""
    return {
        "kernel": jax.random.normal(rng, (embed_dim, num_clusters), jnp.float32) * (1.0 / np.sqrt(embed_dim)),
        "bias": jnp.zeros((num_clusters,), jnp.float32),
    }


# The top-level parameter holding the deep-clustering head; the optimiser gives it its own Adam
# state (optim.make_optimizer(resettable_head=CLUSTER_HEAD)) so that it can be reset alone.
CLUSTER_HEAD = "cluster_head"


def reset_cluster_head(state: dict, rng: jax.Array, embed_dim: int, num_clusters: int) -> dict:
    """New head weights and a fresh Adam state for them (zero moments, zero step count), leaving
    everything else untouched: the head then trains as a newly created one would."""
    params = dict(state["params"])
    params[CLUSTER_HEAD] = init_cluster_head(rng, embed_dim, num_clusters)
    return {**state, "params": params, "opt": optim.reset_head_moments(state["opt"])}
