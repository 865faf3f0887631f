"""Per-epoch passes: computations at each epoch's start over the whole training source with the
current model, each returning a per-example table that the trainer attaches to that epoch's batches.

A pass is one `EpochPass` in EPOCH_PASSES, keyed by its name; its table fills one batch field,
which the loss terms read (bclip.objectives.Term; e.g. objectives.PAIR_WEIGHTS). A run enables a
pass by an entry `config.epoch_passes.NAME` holding the pass's options (or, for deep clustering,
by its loss term's weight). The trainer runs the enabled passes before every epoch, keeps the
tables in the checkpoint (a run resumed mid-epoch reads the epoch's table back instead of
recomputing it from later weights), and puts `table[batch["index"]]` into each batch.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from bclip import cleaning, sharding
from bclip.data import decode, pipeline, poisoning, sources
from bclip.models import clip


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What a pass may read besides the state: the run's config, its model, mesh and training source."""

    config: ml_collections.ConfigDict
    model: object
    mesh: object
    source: object  # the training source; records carry their example "index"
    table_size: int  # one more than the largest example index
    tokenizer: object = None  # the run's caption tokenizer
    poison_plan: object = None  # the run's poisoning.PoisonPlan (None: a clean run)
    epoch: int = 0  # the epoch about to start (poisoned images redraw their trigger each epoch)


@dataclasses.dataclass(frozen=True)
class EpochPass:
    """One per-epoch pass.

    field: the batch field its table fills.
    run: (context, state, rng) -> (table [table_size] of `dtype`, state), on every process; the
      table row of an example the pass has no value for is `missing`. It may also change the state
      (e.g. start a fresh head), which must stay in its shardings.
    head: (name, init(config, rng, num_examples) -> params) of a parameter subtree the pass owns
      (num_examples: the training source's size),
      trained by its own AdamW that `run` may reset (optim.make_optimizer(resettable_head=name)).
    options: the pass's options and their defaults: `config.epoch_passes.NAME` holds them.
    enabled: whether a config turns the pass on; default: it has an entry in config.epoch_passes.
    to_batch: (context, rows [B], batch) -> the batch fields that a batch's table rows become
      (e.g. replacement caption tokens); default: the rows themselves under `field`.
    """

    field: str
    run: Callable
    dtype: type = np.int32
    missing: float = -1
    head: tuple[str, Callable] | None = None
    options: dict = dataclasses.field(default_factory=dict)
    enabled: Callable[[ml_collections.ConfigDict], bool] | None = None
    to_batch: Callable | None = None


# ---------------------------------------------------------------------------------------------
# The training set as the run trains on it, embedded by the current model
# ---------------------------------------------------------------------------------------------


class _UnlabelledView:
    """Training records seen as unlabelled eval records, for embedding the whole training set."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return {**self.source[i], "label": -1}


class _PoisonedView:
    """Training records as a poisoned run trains on them in `epoch`: an example its plan poisons
    carries its triggered image, decoded and poisoned as the training pipeline does it."""

    def __init__(self, source, plan, poison: ml_collections.ConfigDict, image_size: int, epoch: int):
        self.source, self.plan, self.image_size, self.epoch = source, plan, image_size, epoch
        self.poison = poison.to_dict()

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        record = self.source[i]
        index = int(record["index"])
        if sources.is_bad_record(record) or not self.plan.contains(index):
            return record
        try:
            image = pipeline.decode_training_image(record, self.image_size, squash=self.poison["squash"])
        except decode.BadRecordError:
            return record  # the eval transform meets the same error and leaves the row out
        pixels, caption = pipeline.poison_training_pair(image, record["caption"], index, self.epoch, self.plan, self.poison)
        return {**record, "image": pixels, "caption": caption}


def trained_caption(source, index: int, plan=None, poison=None) -> str:
    """Example `index`'s caption as the training pipeline feeds it: stripped, and the poisoned
    caption for an example the plan poisons (the examples of an IndexSubset keep their index into
    its full source)."""
    caption = getattr(source, "source", source).captions[index].strip()
    if plan is not None and plan.contains(index):
        caption = poisoning.poisoned_caption_of(plan, caption, index, poison.target_label, poison.captions)
    return caption


def _captions_by_index(source, plan=None, poison=None) -> dict[int, str]:
    """Each example's caption as trained on: the poisoned caption for an example the plan poisons."""
    indices = getattr(source, "indices", None)
    indices = np.arange(len(source)) if indices is None else indices
    captions = dict(zip((int(i) for i in indices), source.captions))
    if plan is not None:
        for index, caption in captions.items():
            if plan.contains(index):
                captions[index] = poisoning.poisoned_caption_of(plan, caption, index, poison.target_label, poison.captions)
    return captions


def training_set_embeddings(context: PassContext, variables: dict, with_text: bool = False) -> dict:
    """Every training example's image embedding (and, with_text, its caption's), on the mesh: of
    the pairs as the run trains on them, poisoned ones included (with their trigger of
    `context.epoch`), so a defence sees what the model is fed.

    Returns:
      {"image" [N', D] (and "text" [N', D]) sharded over the batch, "index" int32 [N'], "valid"
      bool [N']}, N' the source's size padded to whole eval batches.
    """
    config, mesh = context.config, context.mesh
    encode_image = jax.jit(functools.partial(context.model.apply, method=clip.CLIP.encode_image))
    encode_text = jax.jit(functools.partial(context.model.apply, method=clip.CLIP.encode_text))
    plan = context.poison_plan
    records = context.source
    if plan is not None:
        records = _PoisonedView(records, plan, config.poison, config.model.image.size, context.epoch)
    captions = _captions_by_index(context.source, plan, config.poison) if with_text else None
    parts = {"image": [], "text": [], "index": [], "valid": []}
    for batch in pipeline.eval_batches(
        _UnlabelledView(records),
        image_size=config.model.image.size,
        batch_size=config.eval.batch_size,
        trigger=None,
        seed=config.eval.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=config.eval.num_workers,
        # Unusable training records, which training drops, get no table value instead of failing.
        skip_bad_records=True,
    ):
        local = {"image": batch["image"], "index": batch["index"], "valid": batch["valid"]}
        if with_text:
            texts = [captions.get(int(i), "") if ok else "" for i, ok in zip(batch["index"], batch["valid"])]
            local["text"] = context.tokenizer.encode_batch(texts, config.model.text.context_length)
        global_batch = sharding.global_batch_from_local(local, mesh)
        parts["image"].append(encode_image(variables, global_batch["image"]))
        if with_text:
            parts["text"].append(encode_text(variables, global_batch["text"]))
        parts["index"].append(global_batch["index"])
        parts["valid"].append(global_batch["valid"])
    return {key: jnp.concatenate(values) for key, values in parts.items() if values}


def per_example_table(values, indices, valid, table_size: int, missing, dtype) -> np.ndarray:
    """A table [table_size] holding `values` [N'] at example `indices` [N'] where `valid`, gathered
    from every process (the same table everywhere), `missing` elsewhere."""
    values, indices, valid = (np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in (values, indices, valid))
    table = np.full((table_size,), missing, dtype)
    table[indices[valid]] = values[valid]
    return table


def model_params(params: dict) -> dict:
    """The CLIP model's parameters without the heads of per-epoch passes."""
    heads = {epoch_pass.head[0] for epoch_pass in EPOCH_PASSES.values() if epoch_pass.head}
    return {name: value for name, value in params.items() if name not in heads}


def model_variables(state: dict) -> dict:
    """The CLIP model's variables in a training state (no pass heads), as `model.apply` takes them."""
    variables = {"params": model_params(state["params"])}
    if state["batch_stats"]:
        variables["batch_stats"] = state["batch_stats"]
    return variables


# ---------------------------------------------------------------------------------------------
# RoCLIP (Yang, Gao & Mirzasoleiman, NeurIPS 2023)
# ---------------------------------------------------------------------------------------------

# Keeps the pool's draws apart from other uses of the run's seed.
_POOL_STREAM = 0x526F434C


def is_matching_epoch(epoch: int, every_epochs: int) -> bool:
    """Whether (0-based) `epoch` pairs images with pool captions: every `every_epochs`-th epoch,
    counted from 1 as RoCLIP's code counts them, so the first every_epochs - 1 epochs warm up on
    the original pairs."""
    if every_epochs < 1:
        raise ValueError(f"epoch_passes.roclip.every_epochs={every_epochs}; it must be at least 1")
    return (epoch + 1) % every_epochs == 0


def caption_pool(seed: int, epoch: int, num_examples: int, size: int) -> np.ndarray:
    """Positions (int64 [size], sorted, distinct) in the training source of the captions pooled in
    `epoch`: a fresh random draw each matching epoch, a function of (seed, epoch) only, so a
    resumed run draws the same pool."""
    if not 0 < size <= num_examples:
        raise ValueError(f"epoch_passes.roclip.pool_size={size}; it must be in 1..{num_examples} (the training set's size)")
    rng = np.random.default_rng([seed, _POOL_STREAM, epoch])
    return np.sort(rng.choice(num_examples, size, replace=False))


def nearest_captions(image: jax.Array, pool_text: jax.Array, chunk: int) -> jax.Array:
    """Each image's nearest pool caption by cosine similarity (the first on ties).

    Args:
      image: [N, D] image embeddings, N a multiple of `chunk` (the similarities are formed `chunk`
        images at a time: N x P at once would not fit for a whole dataset).
      pool_text: [P, D] the pool captions' embeddings.
    Returns:
      int32 [N]: positions in the pool.
    """
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    image, pool_text = unit(image.astype(jnp.float32)), unit(pool_text.astype(jnp.float32))
    nearest = jax.lax.map(lambda part: jnp.argmax(part @ pool_text.T, axis=-1), image.reshape(-1, chunk, image.shape[-1]))
    return nearest.reshape(-1).astype(jnp.int32)


def _source_indices(source) -> np.ndarray:
    """The example index at each position of the training source."""
    indices = getattr(source, "indices", None)
    return np.arange(len(source), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)


def _pool_text_embeddings(context: PassContext, variables: dict, tokens: np.ndarray) -> jax.Array:
    """The pool's caption embeddings [P, D], encoded an eval batch at a time on the mesh (every
    process holds the same pool)."""
    encode_text = jax.jit(functools.partial(context.model.apply, method=clip.CLIP.encode_text))
    batch_size = context.config.eval.batch_size * jax.process_count()
    padded = np.zeros((-(-len(tokens) // batch_size) * batch_size, tokens.shape[1]), tokens.dtype)
    padded[: len(tokens)] = tokens
    on_batch = sharding.batch_sharding(context.mesh)
    parts = [
        encode_text(variables, jax.make_array_from_callback(part.shape, on_batch, lambda index, part=part: part[index]))
        for part in np.split(padded, len(padded) // batch_size)
    ]
    return jnp.concatenate(parts)[: len(tokens)]


def roclip(context: PassContext, state: dict, rng):
    """Before each matching epoch, a fresh pool of training captions (as trained, poisoned ones
    included) and, for every training image (with its trigger of the epoch), the example index of
    its nearest pool caption by the current model's embeddings (int32 [table_size]); -1 in the other
    epochs, which train on the original pairs."""
    del rng
    config = context.config
    options = config.epoch_passes.roclip
    table = np.full((context.table_size,), -1, np.int32)
    if not is_matching_epoch(context.epoch, options.every_epochs):
        return table, state
    pool = _source_indices(context.source)[caption_pool(config.seed, context.epoch, len(context.source), options.pool_size)]
    captions = [trained_caption(context.source, int(i), context.poison_plan, config.poison) for i in pool]
    tokens = context.tokenizer.encode_batch(captions, config.model.text.context_length)
    variables = model_variables(state)
    pool_text = _pool_text_embeddings(context, variables, np.asarray(tokens, np.int32))
    embedded = training_set_embeddings(context, variables)
    chunk = config.eval.batch_size * jax.process_count()
    nearest = jax.jit(nearest_captions, static_argnums=2)(embedded["image"], pool_text, chunk)
    positions = per_example_table(nearest, embedded["index"], embedded["valid"], context.table_size, -1, np.int32)
    table[positions >= 0] = pool[positions[positions >= 0]]
    return table, state


def roclip_batch(context: PassContext, rows: np.ndarray, batch: dict) -> dict:
    """A batch's captions: each example's matched pool caption where its table row names one
    (rows [B] >= 0), its own elsewhere. Only the caption trained against the image changes; an SSL
    text view stays a view of the example's own caption."""
    matched = np.flatnonzero(rows >= 0)
    if not matched.size:
        return {}
    captions = [trained_caption(context.source, int(rows[row]), context.poison_plan, context.config.poison) for row in matched]
    text = np.array(batch["text"], copy=True)
    text[matched] = context.tokenizer.encode_batch(captions, context.config.model.text.context_length)
    return {"text": text}


# ---------------------------------------------------------------------------------------------
# SafeCLIP (Yang, Gao & Mirzasoleiman, ICML 2024)
# ---------------------------------------------------------------------------------------------


def safeclip_schedule(options: ml_collections.ConfigDict, epoch: int) -> tuple[str, float]:
    """SafeCLIP's phase of `epoch` (0-based) and the share of pairs it trains with MMCL then:
    "inmodal_warmup" (share 0) for `inmodal_warmup_epochs`, "multimodal_warmup" (share 1) for
    `multimodal_warmup_epochs`, then "split": `safe_share_start`, growing by `safe_share_step` an
    epoch up to `safe_share_cap`, of the pairs ranked by image–caption similarity."""
    cross_modal_from = options.inmodal_warmup_epochs
    split_from = cross_modal_from + options.multimodal_warmup_epochs
    if epoch < cross_modal_from:
        return "inmodal_warmup", 0.0
    if epoch < split_from:
        return "multimodal_warmup", 1.0
    share = options.safe_share_start + (epoch - split_from) * options.safe_share_step
    return "split", min(share, options.safe_share_cap)


# SafeCLIP's constant learning rate for its cross-modal warm-up (the published code's --filter_lr):
# low enough that the few poisoned pairs are not learned before the first split.
SAFECLIP_WARMUP_LEARNING_RATE = 5e-6


def safeclip_learning_rates(options, rate: float = SAFECLIP_WARMUP_LEARNING_RATE) -> dict[int, float]:
    """config.optim.epoch_learning_rates for SafeCLIP: each cross-modal warm-up epoch (0-based, as
    `safeclip_schedule` counts them) at the constant `rate`.

    options: the safeclip pass's options (config.epoch_passes.safeclip, or a dict of them).
    """
    start = options["inmodal_warmup_epochs"]
    return {epoch: rate for epoch in range(start, start + options["multimodal_warmup_epochs"])}


def safe_split(similarity: np.ndarray, share: float) -> np.ndarray:
    """1 for the `floor(share * n)` pairs of highest image–caption similarity, 0 for the rest and for
    pairs without one (n: the pairs with a similarity; ties go to the lower index).

    Args:
      similarity: float [N], NaN where an example has none (a record training drops).
    Returns:
      float32 [N].
    """
    known = np.flatnonzero(~np.isnan(similarity))
    # The small slack keeps e.g. 0.15 + 18 * 0.01 (0.32999...) of 100 pairs at 33, not 32.
    count = int(np.floor(share * len(known) + 1e-6))
    ranked = known[np.argsort(-similarity[known], kind="stable")]
    table = np.zeros(similarity.shape, np.float32)
    table[ranked[:count]] = 1.0
    return table


def _check_safeclip_options(options: ml_collections.ConfigDict) -> None:
    where = "config.epoch_passes.safeclip"
    for key in ("inmodal_warmup_epochs", "multimodal_warmup_epochs"):
        if options[key] < 0:
            raise ValueError(f"{where}.{key} must be >= 0, got {options[key]}")
    for key in ("safe_share_start", "safe_share_step", "safe_share_cap"):
        if not 0.0 <= options[key] <= 1.0:
            raise ValueError(f"{where}.{key} must be in [0, 1], got {options[key]}")


def safeclip_split(context: PassContext, state: dict, rng):
    """SafeCLIP's per-epoch split into safe pairs (trained with MMCL, objective term safe_mmcl) and
    risky ones (in-modal SSL only, term risky_ssl): all risky in the in-modal warm-up, all safe in
    the cross-modal warm-up, then the growing share of pairs whose image and caption embeddings
    (under the current model, of the pairs as trained, poisons included) agree most by cosine."""
    del rng
    config = context.config
    options = config.epoch_passes.safeclip
    _check_safeclip_options(options)
    if not (config.objective.safe_mmcl_weight or config.objective.risky_ssl_weight):
        raise ValueError(
            "config.epoch_passes.safeclip is enabled but neither objective.safe_mmcl_weight nor "
            "objective.risky_ssl_weight is: nothing would read its split"
        )
    phase, share = safeclip_schedule(options, context.epoch)
    if phase != "split":
        return np.full((context.table_size,), share, np.float32), state
    embedded = training_set_embeddings(context, model_variables(state), with_text=True)
    similarity = jnp.sum(embedded["image"] * embedded["text"], axis=-1)  # both unit vectors
    table = per_example_table(similarity, embedded["index"], embedded["valid"], context.table_size, np.nan, np.float32)
    return safe_split(table, share), state


# ---------------------------------------------------------------------------------------------
# Deep clustering
# ---------------------------------------------------------------------------------------------


def cluster_assignments(context: PassContext, variables: dict, num_clusters: int, rng) -> np.ndarray:
    """k-means cluster id per example index (int32 [table_size], -1 where none)."""
    embedded = training_set_embeddings(context, variables)
    kmeans = jax.jit(cleaning.spherical_kmeans, static_argnums=(2, 3))
    assign, _ = kmeans(embedded["image"], embedded["valid"], num_clusters, context.config.cleaning.kmeans_iterations, rng)
    return per_example_table(assign, embedded["index"], embedded["valid"], context.table_size, -1, np.int32)


def num_clusters(config: ml_collections.ConfigDict, num_examples: int) -> int:
    return min(config.cleaning.num_clusters, num_examples)


def deep_clustering(context: PassContext, state: dict, rng):
    """Before each epoch: k-means on the training set's image embeddings, then a fresh cluster head
    (new weights, fresh Adam moments and count) to learn the new ids."""
    config = context.config
    k = num_clusters(config, len(context.source))
    table = cluster_assignments(context, model_variables(state), k, rng)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    state = cleaning.reset_cluster_head(state, rng, config.model.embed_dim, k)
    return table, jax.device_put(state, shardings)


def _init_cluster_head(config, rng, num_examples: int) -> dict:
    return cleaning.init_cluster_head(rng, config.model.embed_dim, num_clusters(config, num_examples))


# Pass name -> pass.
EPOCH_PASSES = {
    # Enabled by its loss term (objective.cluster_weight), whose options live in config.cleaning.
    "deep_clustering": EpochPass(
        field="cluster",
        run=deep_clustering,
        head=(cleaning.CLUSTER_HEAD, _init_cluster_head),
        enabled=lambda config: bool(config.objective.cluster_weight),
    ),
    # Defaults: the public RoCLIP code's (its memory-bank size and "break_epoch"); see configs/roclip.py.
    "roclip": EpochPass(
        field="roclip_caption",
        run=roclip,
        to_batch=roclip_batch,
        options={"pool_size": 21845, "every_epochs": 2},
    ),
    # The field is objectives.SAFE_PAIRS; the option defaults are the published code's (see
    # configs/pretrain_safeclip_cc.py).
    "safeclip": EpochPass(
        field="safe_pair",
        run=safeclip_split,
        dtype=np.float32,
        missing=0.0,
        options={
            "inmodal_warmup_epochs": 5,
            "multimodal_warmup_epochs": 1,
            "safe_share_start": 0.15,
            "safe_share_step": 0.01,
            "safe_share_cap": 0.85,
        },
    ),
}


def pass_options(name: str) -> ml_collections.ConfigDict:
    """A config.epoch_passes entry for pass `name`: its options at their defaults."""
    if name not in EPOCH_PASSES:
        raise ValueError(f"unknown per-epoch pass {name!r}; known: {sorted(EPOCH_PASSES)}")
    return ml_collections.ConfigDict(dict(EPOCH_PASSES[name].options))


def enabled_passes(config: ml_collections.ConfigDict) -> dict[str, EpochPass]:
    """The passes a run runs, by name (an unknown name in config.epoch_passes is an error)."""
    for name in config.epoch_passes:
        pass_options(name)
    return {
        name: epoch_pass
        for name, epoch_pass in EPOCH_PASSES.items()
        if (epoch_pass.enabled(config) if epoch_pass.enabled else name in config.epoch_passes)
    }


def batch_fields(
    passes: dict[str, EpochPass], tables: dict[str, np.ndarray], indices: np.ndarray, context: PassContext | None = None,
    batch: dict | None = None,
) -> dict[str, np.ndarray]:
    """Each pass's table rows for a batch's example `indices` [B] (`missing` beyond the table)
    under its field, or the fields its `to_batch` makes of them and of the `batch`."""
    fields = {}
    for name, table in tables.items():
        inside = indices < len(table)
        rows = np.where(inside, table[np.minimum(indices, len(table) - 1)], passes[name].missing).astype(table.dtype)
        if passes[name].to_batch is None:
            fields[passes[name].field] = rows
        else:
            fields.update(passes[name].to_batch(context, rows, batch))
    return fields
