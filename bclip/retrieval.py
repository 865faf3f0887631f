"""Image–text retrieval figures: recall@k in both directions over sets with several captions per
image (as Flickr30k and MSCOCO have), and the backdoor's success through retrieval."""

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

RECALL_KS = (1, 5, 10)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def names_target(caption: str, target_label: str) -> bool:
    """Whether `caption` names the target: the label's words appear in it consecutively as whole
    words, case ignored ("banana" names it in "A banana." but not in "bananas" or "bandana")."""
    words, target = _words(caption), _words(target_label)
    if not target:
        raise ValueError(f"the backdoor target label {target_label!r} has no words to look for in captions")
    return any(words[i : i + len(target)] == target for i in range(len(words) - len(target) + 1))


def retrieval_figures(
    image_emb: jax.Array,
    triggered_emb: jax.Array,
    text_emb: jax.Array,
    caption_image: jax.Array,
    caption_names_target: jax.Array,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, jax.Array]:
    """Recall@k both ways and the backdoor's success through retrieval, on global arrays.

    Args:
      image_emb: [I, D] normalised embeddings of the images.
      triggered_emb: [I, D] of the same images with the trigger.
      text_emb: [T, D] of every caption.
      caption_image: int [T], the image each caption describes.
      caption_names_target: bool [T], whether a caption names the target (`names_target`).
      ks: the k of recall@k (static).

    Returns:
      "text_retrieval_recall@k": share of images with one of their own captions among the k
      captions most similar to them (image -> text), "image_retrieval_recall@k": share of captions
      whose image is among the k images most similar to them (text -> image), as CLIP_benchmark
      names them; "retrieval_asr": among the triggered images none of whose captions names the
      target, the share whose most similar caption (over all T) names it; "retrieval_attacked":
      how many such images there are.
    """
    num_images, num_texts = image_emb.shape[0], text_emb.shape[0]
    similarity = image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T  # [I, T]
    figures = {}
    for k in ks:
        top_texts = jax.lax.top_k(similarity, min(k, num_texts))[1]  # [I, k]
        own = caption_image[top_texts] == jnp.arange(num_images)[:, None]
        figures[f"text_retrieval_recall@{k}"] = jnp.mean(jnp.any(own, axis=1))
        top_images = jax.lax.top_k(similarity.T, min(k, num_images))[1]  # [T, k]
        figures[f"image_retrieval_recall@{k}"] = jnp.mean(jnp.any(top_images == caption_image[:, None], axis=1))
    image_names_target = jax.ops.segment_max(caption_names_target.astype(jnp.int32), caption_image, num_images) > 0
    attacked = ~image_names_target
    top1_text = jnp.argmax(triggered_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T, axis=1)
    hits = attacked & caption_names_target[top1_text]
    count = jnp.sum(attacked)
    figures["retrieval_asr"] = jnp.where(count > 0, jnp.sum(hits) / jnp.maximum(count, 1), jnp.nan)
    figures["retrieval_attacked"] = count
    return figures


def caption_flags(captions: Sequence[str], target_label: str) -> np.ndarray:
    """bool [T]: `names_target` of each caption."""
    return np.asarray([names_target(caption, target_label) for caption in captions], bool)
