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
    """

    field: str
    run: Callable
    dtype: type = np.int32
    missing: float = -1
    head: tuple[str, Callable] | None = None
    options: dict = dataclasses.field(default_factory=dict)
    enabled: Callable[[ml_collections.ConfigDict], bool] | None = None


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


def _captions_by_index(source, plan=None, poison=None) -> dict[int, str]:
    """Each example's caption as trained on: the poisoned caption for an example the plan poisons."""
    indices = getattr(source, "indices", None)
    indices = np.arange(len(source)) if indices is None else indices
    captions = dict(zip((int(i) for i in indices), source.captions))
    if plan is not None:
        maker = poisoning.caption_maker(poison.captions)
        for index, caption in captions.items():
            if plan.contains(index):
                captions[index] = maker.caption(caption, index, poison.target_label, plan.seed)
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


def batch_fields(passes: dict[str, EpochPass], tables: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
    """Each pass's table rows for a batch's example `indices` [B] under its field (`missing`
    beyond the table)."""
    fields = {}
    for name, table in tables.items():
        inside = indices < len(table)
        rows = table[np.minimum(indices, len(table) - 1)]
        fields[passes[name].field] = np.where(inside, rows, passes[name].missing).astype(table.dtype)
    return fields
