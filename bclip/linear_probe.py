"""Linear probes on frozen image features: multinomial logistic regression with an L2 penalty
chosen on a validation split carved from the probe's train split, then refit on the whole train
split, as CLIP's paper evaluates representations (there with scikit-learn's L-BFGS over a log grid
of C; here a jitted full-batch accelerated gradient solver, every fit of the grid in one vectorised
call, so it runs where the model does)."""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The penalty λ of mean cross-entropy + λ/2·|W|² (λ = 1 / (C·N) in scikit-learn's terms).
DEFAULT_L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
SOLVER_STEPS = 300


def probe_loss(params: dict, features: jax.Array, labels: jax.Array, weights: jax.Array, l2) -> jax.Array:
    """Weighted mean cross-entropy of softmax(features @ w + b) plus l2/2 · |w|² (no penalty on b).

    Args:
      params: {"w": [D, C], "b": [C]}.
      features: [N, D]; labels: int [N]; weights: float [N] (0 leaves an example out).
    """
    logits = features @ params["w"] + params["b"]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
    return jnp.sum(weights * nll) / jnp.maximum(jnp.sum(weights), 1.0) + 0.5 * l2 * jnp.sum(params["w"] ** 2)


def fit(features: jax.Array, labels: jax.Array, weights: jax.Array, l2, num_classes: int, steps: int = SOLVER_STEPS) -> dict:
    """The probe minimising `probe_loss`, by `steps` of Nesterov's accelerated gradient descent from
    zero with step 1/L (L bounds the gradient's Lipschitz constant: softmax cross-entropy's Hessian
    in the logits is at most 1/2, so L = λ_max(weighted Gram of [x, 1]) / 2 + l2). The loss is
    strongly convex in w for l2 > 0; the momentum is the smaller of the convex schedule's k/(k+3)
    and the strongly convex (√κ−1)/(√κ+1). A simple loop compiles in a fraction of L-BFGS's time,
    and every step is two matrix products. Shapes as `probe_loss`; returns {"w": [D, C], "b": [C]}.
    """
    x = jnp.concatenate([features.astype(jnp.float32), jnp.ones((features.shape[0], 1), jnp.float32)], axis=1)
    share = weights.astype(jnp.float32) / jnp.maximum(jnp.sum(weights), 1.0)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    penalised = jnp.ones((x.shape[1], 1), jnp.float32).at[-1].set(0.0)  # not the bias row
    smooth = 0.5 * jnp.linalg.eigvalsh((x * share[:, None]).T @ x)[-1] + l2
    root_kappa = jnp.sqrt(smooth / l2)
    strong_momentum = (root_kappa - 1.0) / (root_kappa + 1.0)

    def gradient(theta):
        residual = share[:, None] * (jax.nn.softmax(x @ theta) - onehot)
        return x.T @ residual + l2 * penalised * theta

    def step(k, carry):
        theta, lookahead = carry
        new = lookahead - gradient(lookahead) / smooth
        momentum = jnp.minimum(k / (k + 3.0), strong_momentum)
        return new, new + momentum * (new - theta)

    zero = jnp.zeros((x.shape[1], num_classes), jnp.float32)
    theta, _ = jax.lax.fori_loop(0, steps, step, (zero, zero))
    return {"w": theta[:-1], "b": theta[-1]}


def validation_mask(num_examples: int, share: float, seed: int) -> np.ndarray:
    """bool [N]: a seeded random `share` of the examples (at least one, and one left to fit on)."""
    if not 0.0 < share < 1.0 or num_examples < 2:
        raise ValueError(f"the probe's validation share must be in (0, 1) of at least 2 examples; got {share} of {num_examples}")
    count = min(num_examples - 1, max(1, round(share * num_examples)))
    mask = np.zeros(num_examples, bool)
    mask[np.random.default_rng(seed).permutation(num_examples)[:count]] = True
    return mask


def probe_figures(
    train_features: jax.Array,
    train_labels: jax.Array,
    is_validation: jax.Array,
    test_features: jax.Array,
    triggered_features: jax.Array,
    test_labels: jax.Array,
    num_classes: int,
    target: int,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    steps: int = SOLVER_STEPS,
) -> dict[str, jax.Array]:
    """Choose λ on the validation part of the train split, refit on all of it, and score the test split.

    Args:
      train_features: [N, D] image features; train_labels: int [N]; is_validation: bool [N].
      test_features, triggered_features: [M, D] features of the test images, without and with
        the trigger; test_labels: int [M].
      num_classes, target, l2_grid, steps: static.

    Returns:
      "lp_acc1", "lp_acc5", "lp_mean_per_class_recall" (CLIP_benchmark's names) on clean test
      images; "lp_asr": the share of triggered test images of other classes than `target` that the
      probe assigns to `target`; "lp_l2": the chosen λ; "lp_validation_acc1": its validation top-1.
    """
    grid = jnp.asarray(l2_grid, jnp.float32)
    num_penalties = len(l2_grid)
    # Every penalty fitted on the fit part and on the whole train split, in one vectorised call
    # (one program): the refit of the chosen penalty is then a lookup.
    fit_part = (~is_validation).astype(jnp.float32)
    weights = jnp.concatenate([jnp.tile(fit_part, (num_penalties, 1)), jnp.ones((num_penalties, fit_part.shape[0]))])
    fits = jax.vmap(lambda w, l2: fit(train_features, train_labels, w, l2, num_classes, steps))(weights, jnp.tile(grid, 2))
    val_logits = jnp.einsum("nd,gdc->gnc", train_features, fits["w"][:num_penalties]) + fits["b"][:num_penalties, None]
    val_correct = (jnp.argmax(val_logits, -1) == train_labels) & is_validation
    val_acc = jnp.sum(val_correct, axis=1) / jnp.maximum(jnp.sum(is_validation), 1)
    # Ties go to the strongest penalty.
    best = jnp.argmax(val_acc + 1e-6 * jnp.argsort(jnp.argsort(grid)) / num_penalties)
    final = jax.tree.map(lambda v: v[num_penalties + best], fits)
    logits = test_features @ final["w"] + final["b"]
    predicted = jnp.argmax(logits, -1)
    top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
    per_class = jax.ops.segment_sum((predicted == test_labels).astype(jnp.float32), test_labels, num_classes)
    class_count = jax.ops.segment_sum(jnp.ones_like(per_class[test_labels]), test_labels, num_classes)
    present = class_count > 0
    attacked = test_labels != target
    triggered_predicted = jnp.argmax(triggered_features @ final["w"] + final["b"], -1)
    return {
        "lp_acc1": jnp.mean(predicted == test_labels),
        "lp_acc5": jnp.mean(jnp.any(top5 == test_labels[:, None], axis=1)),
        "lp_mean_per_class_recall": jnp.sum(jnp.where(present, per_class / jnp.maximum(class_count, 1), 0)) / jnp.sum(present),
        "lp_asr": jnp.sum(attacked & (triggered_predicted == target)) / jnp.maximum(jnp.sum(attacked), 1),
        "lp_l2": grid[best],
        "lp_validation_acc1": val_acc[best],
    }
