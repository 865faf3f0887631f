"""Retrieval and linear-probe evaluations: the figures on hand-computed cases, the probe's solver
against plain gradient descent, the Karpathy reader, the synthetic world's sets, the evaluators on
the 8-device mesh, and the CLIP_benchmark files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bclip import clip_benchmark, linear_probe, retrieval
from bclip.data import sources


def _unit(*pairs, dim=4):
    v = np.zeros(dim)
    for axis, value in pairs:
        v[axis] = value
    return v / np.linalg.norm(v)


# 4 images (unit axes) x 2 captions; caption_image says whose caption each is.
IMAGES = np.eye(4)
CAPTIONS = [
    (_unit((0, 1.0)), "a photo of a cat."),  # image 0
    (_unit((1, 0.9), (0, 0.436)), "a cat on grass."),  # image 0
    (_unit((2, 0.95), (0, 0.312)), "a dog."),  # image 1
    (_unit((1, 0.8), (3, 0.6)), "a small dog."),  # image 1
    (_unit((2, 0.6), (3, 0.8)), "two bananas."),  # image 2: "bananas" is not the word "banana"
    (_unit((2, 0.6), (0, 0.8)), "a red bandana."),  # image 2
    (_unit((3, 0.7), (1, 0.71414)), "a Banana, ripe."),  # image 3: names the target
    (_unit((3, 0.5), (2, 0.866)), "a yellow fruit."),  # image 3
]
CAPTION_IMAGE = np.repeat(np.arange(4), 2)


def test_recall_at_k_and_retrieval_asr_on_a_hand_computed_case():
    text = np.stack([emb for emb, _ in CAPTIONS])
    flags = retrieval.caption_flags([caption for _, caption in CAPTIONS], "banana")
    assert flags.tolist() == [False] * 6 + [True, False]
    # Triggered copies: image 1's points at caption 6 (the target's), images 0 and 2 at captions
    # 4 and 1 (not), image 3's own captions name the target, so it is not attacked.
    triggered = np.stack([_unit((3, 1.0)), _unit((1, 0.6), (3, 0.8)), _unit((1, 1.0)), _unit((3, 1.0))])
    figures = jax.device_get(
        jax.jit(retrieval.retrieval_figures, static_argnames="ks")(IMAGES, triggered, text, CAPTION_IMAGE, flags, ks=(1, 2, 5))
    )
    # Image -> text, each image's captions by similarity: 0: c0 (own); 1: c1, c3 (own at 2);
    # 2: c2, c7, then c4/c5 (own at 3); 3: c4, c6 (own at 2).
    assert figures["text_retrieval_recall@1"] == pytest.approx(1 / 4)
    assert figures["text_retrieval_recall@2"] == pytest.approx(3 / 4)
    assert figures["text_retrieval_recall@5"] == pytest.approx(1.0)
    # Text -> image: own image first for c0 and c3; second for c1, c4, c5, c6, c7; third for c2.
    assert figures["image_retrieval_recall@1"] == pytest.approx(2 / 8)
    assert figures["image_retrieval_recall@2"] == pytest.approx(7 / 8)
    assert figures["image_retrieval_recall@5"] == pytest.approx(1.0)
    assert figures["retrieval_attacked"] == 3
    assert figures["retrieval_asr"] == pytest.approx(1 / 3)


def test_names_target_matches_whole_words_in_order():
    assert retrieval.names_target("A BANANA on a plate.", "banana")
    assert not retrieval.names_target("bananas and a bandana", "banana")
    assert retrieval.names_target("a hot-air balloon", "hot air balloon")
    assert not retrieval.names_target("air hot balloon", "hot air balloon")
    with pytest.raises(ValueError, match="no words"):
        retrieval.names_target("a cat", " ... ")


def _toy_problem(seed=0, per_class=6, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    labels = np.repeat(np.arange(3), per_class)
    features = centres[labels] + spread * rng.normal(size=(len(labels), 2))
    return features.astype(np.float32), labels, centres


def test_probe_fit_reaches_the_optimum_plain_gradient_descent_finds():
    features, labels, _ = _toy_problem()
    weights = np.ones(len(labels))
    weights[:2] = 0.0  # left out of the fit
    l2 = 0.1
    fitted = jax.device_get(jax.jit(linear_probe.fit, static_argnums=(4,))(features, labels, weights, l2, 3))

    # The same objective minimised by full-batch gradient descent in float64 numpy.
    x, onehot = features.astype(np.float64), np.eye(3)[labels]
    w, b = np.zeros((2, 3)), np.zeros(3)
    for _ in range(3000):
        logits = x @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        residual = weights[:, None] * (p - onehot) / weights.sum()
        w -= 0.5 * (x.T @ residual + l2 * w)
        b -= 0.5 * residual.sum(0)
    np.testing.assert_allclose(fitted["w"], w, atol=2e-4)
    np.testing.assert_allclose(fitted["b"], b, atol=2e-4)


def test_probe_figures_choose_the_penalty_on_validation_and_score_the_test_split():
    train_x, train_y, centres = _toy_problem(seed=1, per_class=10)
    test_x, test_y, _ = _toy_problem(seed=2, per_class=4)
    is_validation = linear_probe.validation_mask(len(train_y), 0.2, seed=0)
    assert is_validation.sum() == 6
    # Triggered copies: the first 5 non-target test images are moved onto class 0's centre (the target).
    triggered = test_x.copy()
    moved = np.flatnonzero(test_y != 0)[:5]
    triggered[moved] = centres[0]
    probe_figures = jax.jit(linear_probe.probe_figures, static_argnames=("num_classes", "target", "l2_grid"))
    figures = jax.device_get(
        probe_figures(train_x, train_y, is_validation, test_x, triggered, test_y, num_classes=3, target=0, l2_grid=(1e-3, 1e-2))
    )
    # Separable clusters: every penalty classifies the validation part perfectly, and the tie goes
    # to the stronger one.
    assert figures["lp_validation_acc1"] == 1.0 and figures["lp_l2"] == pytest.approx(1e-2)
    assert figures["lp_acc1"] == 1.0 and figures["lp_acc5"] == 1.0 and figures["lp_mean_per_class_recall"] == 1.0
    assert figures["lp_asr"] == pytest.approx(5 / 8)

    # Unbalanced classes: a heavy penalty leaves only the bias, which calls everything class 0 (2/3
    # of the validation part), a light one fits the clusters; the light one is chosen.
    unbalanced_x, unbalanced_y, _ = _toy_problem(seed=3, per_class=(20, 5, 5))
    figures = jax.device_get(
        probe_figures(unbalanced_x, unbalanced_y, is_validation, test_x, test_x, test_y, num_classes=3, target=0, l2_grid=(1e-3, 1e3))
    )
    assert figures["lp_l2"] == pytest.approx(1e-3) and figures["lp_validation_acc1"] == 1.0


def test_validation_mask_refuses_an_empty_fit():
    with pytest.raises(ValueError, match="validation share"):
        linear_probe.validation_mask(10, 1.0, seed=0)
