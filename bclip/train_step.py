"""Training state and the pure train step, written once for one run; `run_group` lays it over
the runs of a group (one run, or a vectorised sweep's).

State is a plain dict of pytrees: {"params", "batch_stats", "opt", "step"}, plus REFERENCE (a frozen
copy of the starting model's variables) when a term reads it (PAR). `batch_stats` is empty
for ViT towers and holds BatchNorm statistics for ResNets (computed over the global batch, since the
step sees global arrays, or per group of model.image.batch_norm_group_size images). The train step
is a pure function `(state, batch, rng, hparams) -> (state, metrics)`; `hparams` holds the run's
scalar hyper-parameters (`run_hyperparams`): its peak learning rate, weight decay and term weights.
"""

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from bclip import cleaning, cpu_runtime, device_augment, objectives, optim, sharding
from bclip.models import clip

# CLIP clamps the learned temperature multiplier so it never exceeds 100.
LOGIT_SCALE_MAX = math.log(100.0)


def init_variables(model: nn.Module, rng: jax.Array, image_size: int, context_length: int) -> dict:
    """Model variables {"params", "batch_stats"} ({} batch_stats for ViT towers)."""
    variables = clip.init_variables(model, rng, image_size, context_length)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


# The state's frozen copy of the model a run started from, {"params", "batch_stats"} (no heads of
# per-epoch passes): PAR pushes the embeddings away from this model's. Saved with the state, so a
# resumed run keeps the original model without reading init_from again.
REFERENCE = "reference"


def init_state(tx: optax.GradientTransformation, variables: dict, reference: dict | None = None) -> dict:
    """A run's training state at step 0 with a fresh optimiser, from its model variables (random,
    or a pretrained checkpoint's) and, for objectives that read one, the frozen `reference` model's
    {"params", "batch_stats"}; pure, so it can be traced by `jax.eval_shape` and sharded `jit`."""
    state = {
        "params": variables["params"],
        "batch_stats": variables.get("batch_stats", {}),
        "opt": tx.init(variables["params"]),
        "step": jnp.zeros((), jnp.int32),
    }
    if reference is not None:
        state[REFERENCE] = {"params": reference["params"], "batch_stats": reference.get("batch_stats", {})}
    return state


def run_hyperparams(optim_config: ml_collections.ConfigDict, objective: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """A run's hyper-parameters, the train step's `hparams`, from its config's optim and objective
    sections: float32 scalars for its peak learning rate and weight decay (optim.HYPERPARAMS) and
    each term's weight (`<term>_weight`)."""
    values = {key: optim_config[key] for key in optim.HYPERPARAMS}
    values.update({objectives.weight_key(name): objective[objectives.weight_key(name)] for name in objectives.TERMS})
    return {key: np.float32(value) for key, value in values.items()}


def clamp_logit_scale(params: dict) -> dict:
    """Keep exp(logit_scale) within [1, 100], as CLIP does after every update."""
    params = dict(params)
    params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, LOGIT_SCALE_MAX)
    return params


def encode_pair(model: nn.Module, params, batch_stats, images, tokens, train: bool):
    """Image and text embeddings [N, D] and the (updated, when training) BatchNorm statistics."""
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    (image_emb, text_emb), model_state = clip.apply_model(model, variables, images, tokens, train=train)
    return image_emb, text_emb, model_state.get("batch_stats", {})


# The batch fields the train steps read (the pipeline's other fields stay on the host).
MODEL_BATCH_KEYS = ("image", "text", "aug_image", "aug_text", "view_key")


def pairs_per_statistics_group(batch_size: int, group_size: int) -> int:
    """How many pairs (original and view) make one BatchNorm statistics group of `group_size`
    images; the whole batch of `batch_size` pairs when group_size is 0."""
    if not group_size:
        return batch_size
    if group_size % 2 or batch_size % (group_size // 2):
        raise ValueError(
            f"with SSL views a BatchNorm statistics group holds pairs (originals and their views), "
            f"so model.image.batch_norm_group_size={group_size} must be even and half of it must "
            f"divide the batch of {batch_size} pairs"
        )
    return group_size // 2


def group_originals_with_views(originals: jax.Array, views: jax.Array, pairs_per_group: int) -> jax.Array:
    """originals, views [B, ...] -> [2B, ...]: for each group of n = pairs_per_group pairs, their
    n originals and then their n views (rows g*2n .. g*2n+n-1 and g*2n+n .. (g+1)*2n-1).

    Each group of 2n consecutive images is then one BatchNorm statistics group holding its pairs'
    originals and views, as on one device of data-parallel training; n = B gives [originals; views].
    """
    if pairs_per_group == originals.shape[0]:
        # One group: a plain concatenation. Stacking gives the same rows, but XLA shards them
        # differently, which reorders the BatchNorm reductions and changes the statistics' last bits.
        return jnp.concatenate([originals, views], axis=0)
    num_groups = originals.shape[0] // pairs_per_group
    grouped = [x.reshape(num_groups, pairs_per_group, *x.shape[1:]) for x in (originals, views)]
    return jnp.stack(grouped, axis=1).reshape(2 * originals.shape[0], *originals.shape[1:])


def split_originals_and_views(grouped: jax.Array, pairs_per_group: int) -> tuple[jax.Array, jax.Array]:
    """The inverse of `group_originals_with_views`: [2B, ...] -> (originals [B, ...], views [B, ...])."""
    batch_size = grouped.shape[0] // 2
    if pairs_per_group == batch_size:
        return grouped[:batch_size], grouped[batch_size:]
    pairs = grouped.reshape(batch_size // pairs_per_group, 2, pairs_per_group, *grouped.shape[1:])
    return (
        pairs[:, 0].reshape(batch_size, *grouped.shape[1:]),
        pairs[:, 1].reshape(batch_size, *grouped.shape[1:]),
    )


def compute_embeddings(model, params, batch_stats, batch, with_views: bool, train: bool = True):
    """Embeddings of a batch; augmented views go through the towers in the same forward pass.

    Without views, BatchNorm statistics group g (model.image.batch_norm_group_size > 0) is images
    g*size .. (g+1)*size-1 of the batch: with the batch split over devices, a size of the per-device
    batch makes each device's share one group. With views, each group holds size/2 pairs'
    originals and those pairs' own views (`group_originals_with_views`), as one device of
    data-parallel training encodes its share of pairs and their views together.

    Args:
      batch: "image" uint8 [B, H, W, 3], "text" int32 [B, L]; with views also "aug_text" and
        "aug_image" of the same shapes, or "view_key" uint32 [B, 2] to make aug_image from.

    Returns:
      ({"image", "text"[, "aug_image", "aug_text"]: [B, D]}, new batch_stats)
    """
    images, tokens = batch["image"], batch["text"]
    if not with_views:
        image_emb, text_emb, batch_stats = encode_pair(model, params, batch_stats, images, tokens, train)
        return {"image": image_emb, "text": text_emb}, batch_stats
    # Views made here, on device, when the pipeline sent their keys instead (data.views_on_device).
    if "aug_image" in batch:
        aug_images = batch["aug_image"]
    else:
        aug_images = device_augment.autoaugment_views(images, batch["view_key"])
    pairs_per_group = pairs_per_statistics_group(images.shape[0], model.batch_norm_group_size if train else 0)
    # Captions follow the same layout so that row i of both towers' inputs is one example.
    image_emb, text_emb, batch_stats = encode_pair(
        model,
        params,
        batch_stats,
        group_originals_with_views(images, aug_images, pairs_per_group),
        group_originals_with_views(tokens, batch["aug_text"], pairs_per_group),
        train,
    )
    image_emb, aug_image_emb = split_originals_and_views(image_emb, pairs_per_group)
    text_emb, aug_text_emb = split_originals_and_views(text_emb, pairs_per_group)
    embeddings = {"image": image_emb, "aug_image": aug_image_emb, "text": text_emb, "aug_text": aug_text_emb}
    return embeddings, batch_stats


def loss_inputs(model, params, batch_stats, batch, objective: ml_collections.ConfigDict, reference: dict | None = None):
    """Everything the objective's terms read (objectives.Term): the embeddings (and augmented
    views), the temperature and bias, with deep clustering the cluster head's logits [B, K], the
    batch's per-example fields from per-epoch passes (e.g. "cluster" [B]) and, for terms that need
    it, the frozen `reference` model's embeddings of the same images and captions ("reference_image",
    "reference_text" [B, D]; BatchNorm in inference mode, as a frozen model).

    Returns:
      (inputs for `objectives.combined_loss`, new batch_stats)
    """
    model_params = {k: v for k, v in params.items() if k != cleaning.CLUSTER_HEAD}
    with_views = objectives.needs_augmented_views(objective)
    embeddings, batch_stats = compute_embeddings(model, model_params, batch_stats, batch, with_views)
    inputs = {
        **{key: value for key, value in batch.items() if key not in MODEL_BATCH_KEYS},
        **embeddings,
        "logit_scale": params["logit_scale"],
        "logit_bias": params.get("logit_bias"),
    }
    if cleaning.CLUSTER_HEAD in params:
        head = params[cleaning.CLUSTER_HEAD]
        inputs["cluster_logits"] = embeddings["image"] @ head["kernel"] + head["bias"]
    if objectives.needs_reference(objective):
        if reference is None:
            raise ValueError(
                f"objective terms {list(objectives.active_terms(objective))} read the starting model's embeddings, "
                f"but the state has no {REFERENCE!r} (train.init_from makes it)"
            )
        reference_image, reference_text, _ = encode_pair(
            model, reference["params"], reference["batch_stats"], batch["image"], batch["text"], train=False
        )
        inputs["reference_image"] = jax.lax.stop_gradient(reference_image)
        inputs["reference_text"] = jax.lax.stop_gradient(reference_text)
    return inputs, batch_stats


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    objective: ml_collections.ConfigDict,
    optim_config: ml_collections.ConfigDict,
    total_steps: int,
    steps_per_epoch: int | None = None,
) -> Callable:
    """The pure train step of one run, `(state, batch, rng, hparams) -> (state, metrics)`.

    `objective` says which terms are computed (nonzero weights; in a group, those any run weighs);
    `hparams` (`run_hyperparams`) weighs them and sets the optimiser: the learning rate at step t is
    the run's peak through `optim.learning_rate_schedule`, its weight decay the run's. So one
    compiled step serves every run of a sweep that differs only in these values. The epochs of
    optim_config.epoch_learning_rates (the same for every run) train at their constant rates; they
    need `steps_per_epoch`.

    Args (of the returned step):
      state: {"params", "batch_stats", "opt", "step"}, `opt` from `tx` = `optim.make_optimizer`;
        with REFERENCE too when a term reads the starting model (PAR).
      batch: "image" uint8 [B, H, W, 3], "text" int32 [B, L], plus the SSL views and per-example
        fields (e.g. "cluster" int32 [B]) the objective reads.
      rng: a key (the step has no stochastic layers yet).
      hparams: {name: float32 scalar}.

    Metrics: "loss", each computed term, "temperature" (exp(logit_scale)), "grad_norm",
    "learning_rate". With deep clustering, `params` also holds "cluster_head".
    """

    def loss_fn(params, batch_stats, batch, hparams, reference):
        inputs, new_batch_stats = loss_inputs(model, params, batch_stats, batch, objective, reference)
        total, terms = objectives.combined_loss(inputs, objective, hparams)
        return total, (terms, new_batch_stats)

    def train_step(state, batch, rng, hparams):
        del rng  # No stochastic layers yet; the argument keeps the signature stable.
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (terms, batch_stats)), grads = grad_fn(
            state["params"], state["batch_stats"], batch, hparams, state.get(REFERENCE)
        )
        updates, opt_state = optim.scheduled_update(
            tx, optim_config, total_steps, grads, state["opt"], state["params"], hparams["learning_rate"], hparams["weight_decay"],
            steps_per_epoch,
        )
        params = clamp_logit_scale(optax.apply_updates(state["params"], updates))
        # Everything else (the frozen reference model) is carried over unchanged.
        new_state = {**state, "params": params, "batch_stats": batch_stats, "opt": opt_state, "step": state["step"] + 1}
        metrics = {
            "loss": loss,
            **terms,
            "temperature": jnp.exp(params["logit_scale"]),
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": optim.current_learning_rate(opt_state),
        }
        return new_state, metrics

    return train_step


def shard_and_jit_train_step(train_step: Callable, state_shardings, mesh: Mesh) -> Callable:
    """`jit` one run's step with explicit shardings: state as given, batch split over the mesh,
    hyper-parameters replicated, state donated."""
    replicated = sharding.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
        compiler_options=cpu_runtime.compiler_options(mesh.devices.flat),
    )


def create_sharded_state(model, tx, rng, mesh: Mesh, model_config, sharding_config):
    """A fresh random state initialised directly into its shardings (no full copy on one device).

    Returns:
      (state, state_shardings)
    """

    def init(rng):
        return init_state(tx, init_variables(model, rng, model_config.image.size, model_config.text.context_length))

    abstract = jax.eval_shape(init, rng)
    shardings = sharding.state_shardings(abstract, mesh, sharding_config)
    state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings
