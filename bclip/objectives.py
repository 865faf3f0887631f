"""Training objectives for CLIP-style models: MMCL, CleanCLIP's in-modal SSL term, SigLIP and
PAR's perturbation term.

Every loss is written once, on global arrays: under `jit` with a sharded batch, XLA inserts the
collectives, so negatives always span the whole global batch over every device.
"""

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections


def _contrastive_cross_entropy(logits: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of each row of `logits` [B, B] against the diagonal as the target; with
    per-row `weights` [B], their weighted mean (rows of weight 0 leave the mean but still serve as
    negatives for the others)."""
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if weights is None:
        return -jnp.mean(jnp.diagonal(log_probs))
    weights = weights.astype(jnp.float32)
    return -jnp.sum(weights * jnp.diagonal(log_probs)) / jnp.maximum(jnp.sum(weights), 1e-12)


def mmcl_loss(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """CLIP's symmetric InfoNCE loss over the batch.

    Args:
      image_emb: [B, D] L2-normalised image embeddings.
      text_emb: [B, D] L2-normalised text embeddings; row i is the caption of image i.
      logit_scale: scalar log temperature multiplier; logits are exp(logit_scale) * cosine.
      weights: optional per-pair weights [B] (e.g. 0/1: which pairs count as positives); every pair
        still serves as a negative.

    Returns:
      scalar `½[CE(s·I·Tᵀ, diag) + CE(s·T·Iᵀ, diag)]`.
    """
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    logits = scale * image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T
    return 0.5 * (_contrastive_cross_entropy(logits, weights) + _contrastive_cross_entropy(logits.T, weights))


def _in_modal_logits(image_emb, aug_image_emb, text_emb, aug_text_emb, logit_scale) -> tuple[jax.Array, jax.Array]:
    """s·I·I′ᵀ and s·T·T′ᵀ [B, B] in float32, s = exp(logit_scale)."""
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    f32 = lambda x: x.astype(jnp.float32)
    return scale * f32(image_emb) @ f32(aug_image_emb).T, scale * f32(text_emb) @ f32(aug_text_emb).T


def ssl_loss(
    image_emb: jax.Array,
    aug_image_emb: jax.Array,
    text_emb: jax.Array,
    aug_text_emb: jax.Array,
    logit_scale: jax.Array,
    weights: jax.Array | None = None,
) -> jax.Array:
    """CleanCLIP's in-modal contrastive term, one direction per modality, CLIP's temperature.

    Args:
      image_emb, aug_image_emb: [B, D] normalised embeddings of images and their augmented views.
      text_emb, aug_text_emb: [B, D] normalised embeddings of captions and augmented captions.
      logit_scale: scalar log temperature multiplier shared with the MMCL term.
      weights: optional per-example weights [B].

    Returns:
      scalar `½[CE(s·I·I′ᵀ, diag) + CE(s·T·T′ᵀ, diag)]`.
    """
    image_logits, text_logits = _in_modal_logits(image_emb, aug_image_emb, text_emb, aug_text_emb, logit_scale)
    return 0.5 * (_contrastive_cross_entropy(image_logits, weights) + _contrastive_cross_entropy(text_logits, weights))


def _masked_contrastive_cross_entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy of each row of `logits` [B, B] against the diagonal, over the sub-batch
    `mask` [B] (bool) alone: rows and columns outside it are dropped, so they are neither anchors
    nor negatives (a 0-weight row in `_contrastive_cross_entropy` still serves as a negative). 0
    when the mask is empty."""
    logits = logits.astype(jnp.float32)
    # A finite floor rather than -inf: a row with no kept column stays finite (and its gradient 0).
    kept = jnp.where(mask[None, :], logits, -1e9)
    diagonal = jnp.diagonal(jax.nn.log_softmax(kept, axis=-1))
    return jnp.sum(jnp.where(mask, -diagonal, 0.0)) / jnp.maximum(jnp.sum(mask), 1)  # +0, not -0, when empty


def safe_mmcl_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, safe: jax.Array) -> jax.Array:
    """SafeCLIP's cross-modal term: CLIP's symmetric InfoNCE on the safe pairs only, as if the batch
    held nothing else (risky pairs are not negatives either), normalised by the number of safe
    pairs in the global batch.

    Args:
      image_emb, text_emb: [B, D] normalised embeddings of the pairs.
      logit_scale: scalar log temperature multiplier.
      safe: [B] 1 for a safe pair, 0 for a risky one.
    """
    mask = safe > 0
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    logits = scale * image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T
    return 0.5 * (_masked_contrastive_cross_entropy(logits, mask) + _masked_contrastive_cross_entropy(logits.T, mask))


def risky_ssl_loss(
    image_emb: jax.Array,
    aug_image_emb: jax.Array,
    text_emb: jax.Array,
    aug_text_emb: jax.Array,
    logit_scale: jax.Array,
    safe: jax.Array,
) -> jax.Array:
    """SafeCLIP's in-modal term: `ssl_loss` on the risky pairs only (safe ones are neither anchors
    nor negatives), normalised by their number in the global batch.

    Args:
      image_emb, aug_image_emb, text_emb, aug_text_emb: [B, D] normalised embeddings (see ssl_loss).
      logit_scale: scalar log temperature multiplier.
      safe: [B] 1 for a safe pair, 0 for a risky one.
    """
    mask = safe <= 0
    image_logits, text_logits = _in_modal_logits(image_emb, aug_image_emb, text_emb, aug_text_emb, logit_scale)
    return 0.5 * (_masked_contrastive_cross_entropy(image_logits, mask) + _masked_contrastive_cross_entropy(text_logits, mask))


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


def par_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    reference_image_emb: jax.Array,
    reference_text_emb: jax.Array,
    threshold: float = 2.15,
) -> jax.Array:
    """Perturb and Recover's perturbation term (Singh, Croce & Hein, arXiv 2412.00727): minus half
    the sum, over the two towers, of the batch's mean squared distance between the model's
    embeddings and the frozen poisoned model's, each distance counted only while it is at most
    `threshold` (above it, that tower's part is 0 and pushes no more).

    With the CLIP loss beside it (objective.mmcl_weight = objective.par_weight = 1), this is PAR's
    `L_CLIP - ½(L_img + L_txt)`: the embeddings are pushed away from where the backdoor put them
    while the CLIP loss keeps (recovers) their clean alignment. Unit vectors are at most 4 apart
    (squared), so τ = 2.15 means "until the mean cosine to the old embedding is about -0.08".

    Args:
      image_emb, text_emb: [B, D] normalised embeddings of the model being cleaned.
      reference_image_emb, reference_text_emb: [B, D] the frozen original model's embeddings of
        the same images and captions (no gradient flows into them).
      threshold: τ, on the mean squared distance of each tower.
    """
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def gated_distance(emb, reference):
        distance = jnp.mean(jnp.sum((f32(emb) - f32(jax.lax.stop_gradient(reference))) ** 2, axis=-1))
        # Past τ the tower's part is 0 (as the authors' code sets it), not τ: either way no gradient.
        return jnp.where(distance > threshold, 0.0, distance)

    return -0.5 * (gated_distance(image_emb, reference_image_emb) + gated_distance(text_emb, reference_text_emb))


# ---------------------------------------------------------------------------------------------
# The objective's terms, declared once
# ---------------------------------------------------------------------------------------------

# Per-example weights [B] a term reads when the batch has them (a per-epoch pass's table, e.g. a
# pretraining-time defence that down-weights suspect pairs); absent, every example weighs 1.
PAIR_WEIGHTS = "pair_weight"
# Per-example 1 (safe) / 0 (risky) [B] from SafeCLIP's per-epoch split (epoch_passes.safeclip_split).
SAFE_PAIRS = "safe_pair"


@dataclasses.dataclass(frozen=True)
class Term:
    """One loss term: `loss(inputs, **options) -> scalar`, where inputs holds "image", "text" [B, D]
    (and "aug_image", "aug_text" when `needs_views`; "reference_image", "reference_text", the frozen
    starting model's embeddings of the same batch, when `needs_reference`), "logit_scale",
    "logit_bias" (None without one), the model's extra outputs (e.g. "cluster_logits") and the
    batch's per-example fields (e.g. PAIR_WEIGHTS, "cluster"). `options` maps each keyword option
    of `loss` to its default; its config key is `objective.<term>_<option>`."""

    loss: Callable[..., jax.Array]
    options: Mapping[str, float] = dataclasses.field(default_factory=dict)
    needs_reference: bool = False
    needs_views: bool = False


def _siglip_term(inputs) -> jax.Array:
    if inputs["logit_bias"] is None:
        raise ValueError("siglip_weight > 0 needs a model built with model.siglip_bias=True")
    return siglip_loss(inputs["image"], inputs["text"], inputs["logit_scale"], inputs["logit_bias"])


def _safe_pairs(inputs) -> jax.Array:
    if inputs.get(SAFE_PAIRS) is None:
        raise ValueError(
            "objective.safe_mmcl_weight / risky_ssl_weight > 0 need SafeCLIP's split: enable the per-epoch pass "
            "config.epoch_passes.safeclip (config.enable_epoch_pass(config, 'safeclip'))"
        )
    return inputs[SAFE_PAIRS]


# Term name -> Term. Its weight is config.objective.<name>_weight (objective_config makes the keys),
# a per-run hyperparameter of the train step; a term with weight 0 is not computed.
TERMS = {
    "mmcl": Term(lambda x: mmcl_loss(x["image"], x["text"], x["logit_scale"], x.get(PAIR_WEIGHTS))),
    # SafeCLIP: MMCL on the pass's safe pairs, in-modal SSL on its risky ones.
    "safe_mmcl": Term(lambda x: safe_mmcl_loss(x["image"], x["text"], x["logit_scale"], _safe_pairs(x))),
    "risky_ssl": Term(
        lambda x: risky_ssl_loss(x["image"], x["aug_image"], x["text"], x["aug_text"], x["logit_scale"], _safe_pairs(x)),
        needs_views=True,
    ),
    "ssl": Term(
        lambda x: ssl_loss(x["image"], x["aug_image"], x["text"], x["aug_text"], x["logit_scale"], x.get(PAIR_WEIGHTS)),
        needs_views=True,
    ),
    # PAR: the CLIP loss plus this term (both weight 1); its threshold is objective.par_threshold.
    "par": Term(
        lambda x, threshold: par_loss(x["image"], x["text"], x["reference_image"], x["reference_text"], threshold),
        options={"threshold": 2.15},
        needs_reference=True,
    ),
    "siglip": Term(_siglip_term),
    "cluster": Term(lambda x: cluster_loss(x["cluster_logits"], x["cluster"])),
}


def weight_key(term: str) -> str:
    """The config key (in config.objective) and hyperparameter name of a term's weight."""
    return f"{term}_weight"


def option_key(term: str, option: str) -> str:
    """The config key (in config.objective) of one of a term's options."""
    return f"{term}_{option}"


def objective_config(mmcl: float = 1.0, **weights: float) -> ml_collections.ConfigDict:
    """The objective section of a config: one weight per term of TERMS (`<term>_weight`), then the
    terms' options at their defaults (`<term>_<option>`).

    MMCL pretraining is mmcl=1; MMCL+SSL and CleanCLIP are mmcl=1, ssl=1; SSL-only cleaning is
    mmcl=0, ssl=1; SigLIP replaces MMCL with mmcl=0, siglip=1; deep clustering adds cluster=5;
    PAR is mmcl=1, par=1; SafeCLIP is mmcl=0, safe_mmcl=1, risky_ssl=1 with its per-epoch pass
    (epoch_passes.safeclip_split).
    """
    unknown = sorted(set(weights) - set(TERMS))
    if unknown:
        raise ValueError(f"unknown objective terms {unknown}; known: {sorted(TERMS)}")
    weights = {"mmcl": mmcl, **weights}
    config = {weight_key(name): float(weights.get(name, 0.0)) for name in TERMS}
    for name, term in TERMS.items():
        config.update({option_key(name, option): default for option, default in term.options.items()})
    return ml_collections.ConfigDict(config)


def active_terms(objective: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The terms computed for this objective: those with a nonzero weight."""
    return tuple(name for name in TERMS if objective[weight_key(name)])


def needs_augmented_views(objective: ml_collections.ConfigDict) -> bool:
    """Whether the objective needs augmented image and caption views in each batch."""
    return any(TERMS[name].needs_views for name in active_terms(objective))


def needs_reference(objective: ml_collections.ConfigDict) -> bool:
    """Whether the objective reads a frozen copy of the starting model (PAR)."""
    return any(TERMS[name].needs_reference for name in active_terms(objective))


def combined_loss(
    inputs: Mapping[str, Any],
    objective: ml_collections.ConfigDict,
    weights: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted sum of the objective's terms.

    Args:
      inputs: what the terms read (see Term).
      objective: which terms to compute (those with a nonzero `<term>_weight`).
      weights: {`<term>_weight`: scalar} to weigh them with (a run's hyperparameters); default the
        objective's own weights.

    Returns:
      (total loss, {term name: unweighted term value}).
    """
    names = active_terms(objective)
    if not names:
        raise ValueError(f"every objective weight is zero: {objective}")
    terms = {
        name: TERMS[name].loss(inputs, **{option: objective[option_key(name, option)] for option in TERMS[name].options})
        for name in names
    }
    weights = weights if weights is not None else {weight_key(name): objective[weight_key(name)] for name in names}
    total = sum(weights[weight_key(name)] * value for name, value in terms.items())
    return total, terms
