"""Poisoned-pair detection by local density on embeddings (Huang et al., ICLR 2025, "Detecting
Backdoor Samples in Contrastive Language Image Pretraining").

A backdoored model maps its poisoned training images close together but far from everything else:
their neighbourhoods are sparse. Each score is higher for a sparser neighbourhood:

  k_distance  the distance to the k-th nearest other point;
  slof        simplified local outlier factor: a point's k-distance over the mean k-distance of its
              k nearest neighbours;
  dao         dimensionality-aware outlier score: the mean over the k nearest neighbours j of
              LID_j * log(kdist_i / kdist_j), with LID_j the maximum-likelihood local intrinsic
              dimensionality of j's own k nearest distances (the paper's best detector).

Scores are computed within reference groups (the paper scores within batches, which is what lets
it run on billions of pairs); a group holds `group_size` points. `DETECTORS` maps names to scores.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def nearest_distances(points: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Each point's k nearest other points in the group: (distances [N, k] ascending, indices [N, k])."""
    squared = jnp.sum(points**2, axis=-1)
    d2 = squared[:, None] + squared[None, :] - 2.0 * points @ points.T
    d2 = jnp.where(jnp.eye(points.shape[0], dtype=bool), jnp.inf, jnp.maximum(d2, 0.0))
    negative, indices = jax.lax.top_k(-d2, k)
    return jnp.sqrt(-negative), indices


def _k_distance(distances, indices):
    return distances[:, -1]


def _slof(distances, indices):
    k_distance = distances[:, -1]
    return k_distance / jnp.mean(k_distance[indices], axis=1)


def _dao(distances, indices):
    k_distance = distances[:, -1]
    # Levina–Bickel MLE of the local intrinsic dimensionality from the k nearest distances.
    log_ratios = jnp.log(distances[:, :-1] / k_distance[:, None])
    lid = -(distances.shape[1] - 1) / jnp.sum(log_ratios, axis=1)
    return jnp.mean(lid[indices] * jnp.log(k_distance[:, None] / k_distance[indices]), axis=1)


# Detector name -> (distances [N, k], neighbour indices [N, k]) -> score [N], higher = more suspect.
DETECTORS = {"k_distance": _k_distance, "slof": _slof, "dao": _dao}


def scores(embeddings: np.ndarray, detector: str = "dao", k: int = 16, group_size: int = 4096, seed: int = 0) -> np.ndarray:
    """float [N]: each embedding's outlier score within a reference group of `group_size` points
    (the embeddings are shuffled by `seed` into groups of equal size, the last ones one larger)."""
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose one of {sorted(DETECTORS)}")
    embeddings = np.asarray(embeddings, np.float32)
    n = len(embeddings)
    num_groups = max(1, n // group_size)
    if n // num_groups <= k:
        raise ValueError(f"k={k} needs groups of more than {k} points; {n} embeddings make groups of {n // num_groups}")
    order = np.random.default_rng(seed).permutation(n)
    score_group = jax.jit(lambda x: DETECTORS[detector](*nearest_distances(x, k)))
    out = np.empty(n, np.float32)
    for group in np.array_split(order, num_groups):
        out[group] = np.asarray(score_group(embeddings[group]))
    return out


def auroc(scores: np.ndarray, is_positive: np.ndarray) -> float:
    """The probability that a positive scores above a negative (ties count one half): the area under
    the ROC curve, as the Mann–Whitney statistic over average ranks."""
    scores, is_positive = np.asarray(scores, np.float64), np.asarray(is_positive, bool)
    num_positive, num_negative = int(is_positive.sum()), int((~is_positive).sum())
    if not num_positive or not num_negative:
        return math.nan
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average ranks within runs of equal scores
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[is_positive].sum() - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative))


def detection_metrics(scores: np.ndarray, is_poisoned: np.ndarray, num_flagged: int | None = None) -> dict:
    """AUROC, and precision and recall of flagging the `num_flagged` highest scores (default: as
    many as there are poisons, where precision equals recall)."""
    scores, is_poisoned = np.asarray(scores), np.asarray(is_poisoned, bool)
    num_poisoned = int(is_poisoned.sum())
    num_flagged = num_poisoned if num_flagged is None else int(num_flagged)
    flagged = np.argsort(-scores, kind="stable")[:num_flagged]
    true_positives = int(is_poisoned[flagged].sum())
    return {
        "auroc": auroc(scores, is_poisoned),
        "num_examples": len(scores),
        "num_poisoned": num_poisoned,
        "num_flagged": num_flagged,
        "precision": true_positives / num_flagged if num_flagged else math.nan,
        "recall": true_positives / num_poisoned if num_poisoned else math.nan,
    }
