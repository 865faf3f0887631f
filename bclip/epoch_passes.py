"""Per-epoch passes: computations at each epoch's start over the whole training source with the
current model, each returning a per-example table that the trainer attaches to that epoch's batches.

A pass is one `EpochPass` in EPOCH_PASSES, keyed by the batch field its table fills (and the loss
terms read, see bclip.objectives.Term). The trainer runs the enabled passes before every epoch,
keeps the tables in the checkpoint (a run resumed mid-epoch reads the epoch's table back instead of
recomputing it from later weights), and puts `table[batch["index"]]` into each batch. Deep
clustering is the one pass today; a pretraining-time defence that re-weights or regroups pairs
each epoch is another.
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
from bclip.data import pipeline
from bclip.models import clip


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What a pass may read besides the state: the run's config, its model, mesh and training source."""

    config: ml_collections.ConfigDict
    model: object
    mesh: object
    source: object  # the training source; records carry their example "index"
    table_size: int  # one more than the largest example index


@dataclasses.dataclass(frozen=True)
class EpochPass:
    """One per-epoch pass.

    enabled: whether a run's config turns the pass on.
    run: (context, state, rng) -> (table [table_size] of `dtype`, state), on every process; the
      table row of an example the pass has no value for is `missing`. It may also change the state
      (e.g. start a fresh head), which must stay in its shardings.
    head: (name, init(config, rng, num_examples) -> params) of a parameter subtree the pass owns
      (num_examples: the training source's size),
      trained by its own AdamW that `run` may reset (optim.make_optimizer(resettable_head=name)).
    """

    enabled: Callable[[ml_collections.ConfigDict], bool]
    run: Callable
    dtype: type = np.int32
    missing: float = -1
    head: tuple[str, Callable] | None = None


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


def image_embeddings(context: PassContext, variables: dict):
    """Every training example's image embedding, on the mesh.

    Returns:
      (embeddings [N', D] sharded over the batch, example indices int32 [N'], valid bool [N']),
      N' the source's size padded to whole eval batches.
    """
    config, mesh = context.config, context.mesh
    encode_image = jax.jit(functools.partial(context.model.apply, method=clip.CLIP.encode_image))
    embeddings, indices, valid = [], [], []
    for batch in pipeline.eval_batches(
        _UnlabelledView(context.source),
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
        global_batch = sharding.global_batch_from_local(
            {"image": batch["image"], "index": batch["index"], "valid": batch["valid"]}, mesh
        )
        embeddings.append(encode_image(variables, global_batch["image"]))
        indices.append(global_batch["index"])
        valid.append(global_batch["valid"])
    return tuple(jnp.concatenate(x) for x in (embeddings, indices, valid))


def cluster_assignments(context: PassContext, variables: dict, num_clusters: int, rng) -> np.ndarray:
    """k-means cluster id per example index (int32 [table_size], -1 where none)."""
    embeddings, indices, valid = image_embeddings(context, variables)
    kmeans = jax.jit(cleaning.spherical_kmeans, static_argnums=(2, 3))
    assign, _ = kmeans(embeddings, valid, num_clusters, context.config.cleaning.kmeans_iterations, rng)
    assign, indices, valid = (np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in (assign, indices, valid))
    return cleaning.assignment_table(np.where(valid, indices, -1), assign, context.table_size)


def num_clusters(config: ml_collections.ConfigDict, num_examples: int) -> int:
    return min(config.cleaning.num_clusters, num_examples)


def deep_clustering(context: PassContext, state: dict, rng):
    """Before each epoch: k-means on the training set's image embeddings, then a fresh cluster head
    (new weights, fresh Adam moments and count) to learn the new ids."""
    config = context.config
    k = num_clusters(config, len(context.source))
    variables = {"params": {n: p for n, p in state["params"].items() if n != cleaning.CLUSTER_HEAD}}
    if state["batch_stats"]:
        variables["batch_stats"] = state["batch_stats"]
    table = cluster_assignments(context, variables, k, rng)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    state = cleaning.reset_cluster_head(state, rng, config.model.embed_dim, k)
    return table, jax.device_put(state, shardings)


def _init_cluster_head(config, rng, num_examples: int) -> dict:
    return cleaning.init_cluster_head(rng, config.model.embed_dim, num_clusters(config, num_examples))


# Batch field -> the pass whose table fills it.
EPOCH_PASSES = {
    "cluster": EpochPass(
        enabled=lambda config: bool(config.objective.cluster_weight),
        run=deep_clustering,
        head=(cleaning.CLUSTER_HEAD, _init_cluster_head),
    ),
}


def enabled_passes(config: ml_collections.ConfigDict) -> dict[str, EpochPass]:
    return {field: epoch_pass for field, epoch_pass in EPOCH_PASSES.items() if epoch_pass.enabled(config)}


def batch_fields(tables: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
    """Each table's rows for a batch's example `indices` [B] (`missing` beyond the table)."""
    fields = {}
    for field, table in tables.items():
        inside = indices < len(table)
        rows = table[np.minimum(indices, len(table) - 1)]
        fields[field] = np.where(inside, rows, EPOCH_PASSES[field].missing).astype(table.dtype)
    return fields
