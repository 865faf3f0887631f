"""Training objectives for CLIP-style models: MMCL, CleanCLIP's in-modal SSL term and SigLIP.

Every loss is written once, on global arrays: under `jit` with a sharded batch, XLA inserts the
collectives, so negatives always span the whole global batch over every device.
"""

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections


def _contrastive_cross_entropy(logits: jax.Array) -> jax.Array:
    """Mean cross-entropy of each row of `logits` [B, B] against the diagonal as the target."""
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.diagonal(log_probs))


def mmcl_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """CLIP's symmetric InfoNCE loss over the batch.

    Args:
      image_emb: [B, D] L2-normalised image embeddings.
      text_emb: [B, D] L2-normalised text embeddings; row i is the caption of image i.
      logit_scale: scalar log temperature multiplier; logits are exp(logit_scale) * cosine.

    Returns:
      scalar `½[CE(s·I·Tᵀ, diag) + CE(s·T·Iᵀ, diag)]`.
    """
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    logits = scale * image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T
    return 0.5 * (_contrastive_cross_entropy(logits) + _contrastive_cross_entropy(logits.T))


def ssl_loss(
    image_emb: jax.Array,
    aug_image_emb: jax.Array,
    text_emb: jax.Array,
    aug_text_emb: jax.Array,
    logit_scale: jax.Array,
) -> jax.Array:
    """CleanCLIP's in-modal contrastive term, one direction per modality, CLIP's temperature.

    Args:
      image_emb, aug_image_emb: [B, D] normalised embeddings of images and their augmented views.
      text_emb, aug_text_emb: [B, D] normalised embeddings of captions and augmented captions.
      logit_scale: scalar log temperature multiplier shared with the MMCL term.

    Returns:
      scalar `½[CE(s·I·I′ᵀ, diag) + CE(s·T·T′ᵀ, diag)]`.
    """
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    f32 = lambda x: x.astype(jnp.float32)
    image_logits = scale * f32(image_emb) @ f32(aug_image_emb).T
    text_logits = scale * f32(text_emb) @ f32(aug_text_emb).T
    return 0.5 * (_contrastive_cross_entropy(image_logits) + _contrastive_cross_entropy(text_logits))


def siglip_loss(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array
) -> jax.Array:
    """SigLIP's pairwise sigmoid loss, summed over all B² pairs and divided by B.

    Args:
      image_emb: [B, D] normalised image embeddings.
      text_emb: [B, D] normalised text embeddings; the diagonal pairs are positives.
      logit_scale: scalar log temperature multiplier.
      logit_bias: scalar bias added to every logit.
    """
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    logits = scale * image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T + logit_bias
    labels = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


def cluster_loss(cluster_logits: jax.Array, cluster_ids: jax.Array) -> jax.Array:
    """Deep-clustering term: cross-entropy of a linear head's logits on k-means cluster ids.

    Args:
      cluster_logits: [B, K] head outputs on the image embeddings.
      cluster_ids: int [B] cluster of each image; rows with -1 (no cluster) are left out.
    """
    valid = cluster_ids >= 0
    log_probs = jax.nn.log_softmax(cluster_logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.maximum(cluster_ids, 0)[:, None], axis=1)[:, 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def objective_config(
    mmcl: float = 1.0, ssl: float = 0.0, siglip: float = 0.0, cluster: float = 0.0
) -> ml_collections.ConfigDict:
    """The objective section of a config: one weight per loss term.

    MMCL pretraining is mmcl=1; MMCL+SSL and CleanCLIP are mmcl=1, ssl=1; SSL-only cleaning is
    mmcl=0, ssl=1; SigLIP replaces MMCL with mmcl=0, siglip=1; deep clustering adds cluster=5.
    """
    return ml_collections.ConfigDict(
        {
            "mmcl_weight": float(mmcl),
            "ssl_weight": float(ssl),
            "siglip_weight": float(siglip),
            "cluster_weight": float(cluster),
        }
    )


def needs_augmented_views(objective: ml_collections.ConfigDict) -> bool:
    """Whether the objective needs augmented image and caption views in each batch."""
    return objective.ssl_weight != 0.0


def combined_loss(
    embeddings: Mapping[str, jax.Array],
    logit_scale: jax.Array,
    logit_bias: jax.Array | None,
    objective: ml_collections.ConfigDict,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted sum of the configured loss terms.

    Args:
      embeddings: "image", "text" [B, D]; plus "aug_image", "aug_text" [B, D] when SSL is on, and
        "cluster_logits" [B, K] with "cluster_ids" [B] when deep clustering is on.
      logit_scale: scalar log temperature multiplier.
      logit_bias: scalar SigLIP bias, or None when the model has none.
      objective: weights `mmcl_weight`, `ssl_weight`, `siglip_weight`, `cluster_weight`; terms
        with weight 0 are not computed.

    Returns:
      (total loss, {term name: unweighted term value}).
    """
    terms = {}
    if objective.mmcl_weight:
        terms["mmcl"] = mmcl_loss(embeddings["image"], embeddings["text"], logit_scale)
    if objective.ssl_weight:
        terms["ssl"] = ssl_loss(
            embeddings["image"],
            embeddings["aug_image"],
            embeddings["text"],
            embeddings["aug_text"],
            logit_scale,
        )
    if objective.siglip_weight:
        if logit_bias is None:
            raise ValueError("siglip_weight > 0 needs a model built with model.siglip_bias=True")
        terms["siglip"] = siglip_loss(embeddings["image"], embeddings["text"], logit_scale, logit_bias)
    if objective.cluster_weight:
        terms["cluster"] = cluster_loss(embeddings["cluster_logits"], embeddings["cluster_ids"])
    if not terms:
        raise ValueError(f"every objective weight is zero: {objective}")
    weights = {
        "mmcl": objective.mmcl_weight,
        "ssl": objective.ssl_weight,
        "siglip": objective.siglip_weight,
        "cluster": objective.cluster_weight,
    }
    total = sum(weights[name] * value for name, value in terms.items())
    return total, terms
