"""Zero-shot classification accuracy and backdoor attack success rate (ASR).

Class embeddings are the normalised mean of each class's prompt-template text embeddings. Every
device encodes its share of each eval batch; per-batch counts are reduced on device, so every
process ends with the same totals and no process waits on another to finish evaluating.
"""

from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def normalise(x: jax.Array, axis: int = -1) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def prompt_tokens(
    tokenize: Callable[[list[str]], np.ndarray], classnames: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """int32 [C * T, L]: every template filled with every class name, class-major."""
    return np.asarray(tokenize([template.format(name) for name in classnames for template in templates]))


def class_embeddings(
    encode_text: Callable[[np.ndarray], jax.Array],
    tokens: np.ndarray,
    num_classes: int,
    chunk_size: int = 1024,
) -> jax.Array:
    """Zero-shot classifier weights [C, D]: per class, the normalised mean of its prompts' embeddings.

    Args:
      encode_text: int32 tokens [N, L] -> text embeddings [N, D]; called with N = chunk_size
        (the last chunk is padded) so a jitted encoder compiles once.
      tokens: the prompts of `prompt_tokens`, class-major: C classes x T templates.
      num_classes: C.
    """
    chunk_size = min(chunk_size, len(tokens))
    pieces = []
    for start in range(0, len(tokens), chunk_size):
        chunk = tokens[start : start + chunk_size]
        n = len(chunk)
        if n < chunk_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], chunk_size - n, axis=0)])
        pieces.append(np.asarray(encode_text(chunk))[:n])
    per_prompt = normalise(jnp.asarray(np.concatenate(pieces)))
    per_class = per_prompt.reshape(num_classes, len(tokens) // num_classes, -1).mean(axis=1)
    return normalise(per_class)


def eval_counts(
    image_emb: jax.Array,
    triggered_emb: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    class_emb: jax.Array,
    target_class: int | jax.Array,
) -> dict[str, jax.Array]:
    """Counts for top-1/top-5 accuracy and ASR in one batch.

    Args:
      image_emb: [B, D] embeddings of clean images.
      triggered_emb: [B, D] embeddings of the same images with the trigger applied.
      labels: int [B] true classes.
      valid: bool [B], False for padding rows.
      class_emb: [C, D] zero-shot classifier.
      target_class: the backdoor's target class id.

    Returns:
      "count", "top1", "top5": clean images seen / right at top-1 / in top-5;
      "asr_count", "asr_hits": triggered images whose true class is not the target / of those,
      how many are classified as the target;
      "class_count", "class_top1": int [C], clean images of each class / of those, right at top-1
      (for the mean per-class recall CLIP_benchmark reports).
    """
    logits = image_emb.astype(jnp.float32) @ class_emb.astype(jnp.float32).T
    k = min(5, class_emb.shape[0])
    top_k = jax.lax.top_k(logits, k)[1]
    top1 = (top_k[:, 0] == labels) & valid
    top5 = jnp.any(top_k == labels[:, None], axis=1) & valid
    triggered_pred = jnp.argmax(triggered_emb.astype(jnp.float32) @ class_emb.astype(jnp.float32).T, axis=1)
    attacked = valid & (labels != target_class)
    hits = attacked & (triggered_pred == target_class)
    as_int = lambda x: jnp.sum(x.astype(jnp.int32))
    return {
        "count": as_int(valid),
        "top1": as_int(top1),
        "top5": as_int(top5),
        "asr_count": as_int(attacked),
        "asr_hits": as_int(hits),
        "class_count": jnp.zeros(class_emb.shape[0], jnp.int32).at[labels].add(valid.astype(jnp.int32)),
        "class_top1": jnp.zeros(class_emb.shape[0], jnp.int32).at[labels].add(top1.astype(jnp.int32)),
    }


def targeted_figures(
    image_emb: jax.Array, class_emb: jax.Array, targets: jax.Array, labels: jax.Array
) -> dict[str, jax.Array]:
    """Targeted poisoning's figures over its chosen images (zero-shot top-1 against each target).

    Args:
      image_emb: [K, D] embeddings of the K chosen images.
      class_emb: [C, D] zero-shot classifier.
      targets: int [K] the class each image was poisoned towards; labels: int [K] their true classes.

    Returns:
      "hits" bool [K] (classified as its target); "success_rate", the share of hits;
      "true_class_rate", the share still classified as their own class; "other_target_rate", the
      share classified as a class another chosen image is pushed to, neither its own target nor its
      true class (poisons for one image moving another: interference).
    """
    predicted = jnp.argmax(image_emb.astype(jnp.float32) @ class_emb.astype(jnp.float32).T, axis=1)
    hits = predicted == targets
    another_target = jnp.any(predicted[:, None] == targets[None, :], axis=1) & ~hits & (predicted != labels)
    return {
        "hits": hits,
        "success_rate": jnp.mean(hits.astype(jnp.float32)),
        "true_class_rate": jnp.mean((predicted == labels).astype(jnp.float32)),
        "other_target_rate": jnp.mean(another_target.astype(jnp.float32)),
    }


def summarise_counts(batches: Iterable[dict]) -> dict[str, float]:
    """Sum per-batch counts into accuracy and ASR (fractions in [0, 1]), and the mean over classes
    with images of each class's top-1 recall where the counts have them."""
    totals = {"count": 0, "top1": 0, "top5": 0, "asr_count": 0, "asr_hits": 0}
    per_class = {}
    for counts in batches:
        for key in totals:
            totals[key] += int(counts[key])
        for key in ("class_count", "class_top1"):
            if key in counts:
                per_class[key] = per_class.get(key, 0) + np.asarray(counts[key], np.int64)
    if totals["count"] == 0:
        raise ValueError("the eval set produced no images")
    summary = {
        "top1": totals["top1"] / totals["count"],
        "top5": totals["top5"] / totals["count"],
        "asr": totals["asr_hits"] / totals["asr_count"] if totals["asr_count"] else float("nan"),
        "num_images": totals["count"],
        "num_attacked": totals["asr_count"],
    }
    if per_class:
        seen = per_class["class_count"] > 0
        summary["mean_per_class_recall"] = float(np.mean(per_class["class_top1"][seen] / per_class["class_count"][seen]))
    return summary


def target_class_id(classnames: Sequence[str], target_label: str) -> int:
    """The id of the backdoor target among the eval classes; a clear error when it is not one."""
    lowered = [name.lower() for name in classnames]
    if target_label.lower() not in lowered:
        raise ValueError(
            f"the backdoor target {target_label!r} is not among the {len(classnames)} eval classes "
            f"(first few: {list(classnames[:5])}); ASR needs it"
        )
    return lowered.index(target_label.lower())
