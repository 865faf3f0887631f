"""The trainer: one loop for poisoned pretraining and for cleaning; the config decides which.

Stages: setup → data → model and state (restored, or initialised from a pretrained checkpoint, or
fresh) → evaluators → loop (train step, logging, evaluation, checkpoints). Side effects live here;
everything jitted is pure and comes from `train_step`, `objectives`, `evaluation` and `cleaning`.
"""

import functools
import io
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath

from bclip import checkpointing, cleaning, cpu_runtime, evaluation, objectives, optim, sharding, train_step
from bclip.data import pipeline, poisoning, sources, text_augment
from bclip.data import tokenizer as tokenizer_lib
from bclip.models import clip

DONE_FILE = "done.json"
EVALS_FILE = "evals.jsonl"
METRICS_FILE = "metrics.jsonl"
CLUSTERS_DIR = "clusters"
POISON_FILE = "poison_indices.json"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stops without saving the broken state."""


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def make_tokenizer(config: ml_collections.ConfigDict):
    """The caption tokenizer, with ids laid out for the model's vocabulary (end-of-text last)."""
    tokenizer_config = ml_collections.ConfigDict(config.data.tokenizer.to_dict())
    if tokenizer_config.kind == "word":
        tokenizer_config.vocab_size = config.model.text.vocab_size
    tokenizer = tokenizer_lib.build_tokenizer(tokenizer_config)
    if tokenizer.vocab_size != config.model.text.vocab_size:
        raise ValueError(
            f"tokenizer vocabulary ({tokenizer.vocab_size}) != model.text.vocab_size "
            f"({config.model.text.vocab_size}): the end-of-text id would not match"
        )
    return tokenizer


def make_synonyms(data: ml_collections.ConfigDict):
    """The synonym source for caption augmentation: WordNet or a JSON lexicon file."""
    if data.synonyms == "wordnet":
        return text_augment.wordnet_synonyms()
    return text_augment.lexicon_synonyms(json.loads(epath.Path(data.synonyms).read_text()))


class IndexSubset:
    """The examples of `source` at `indices`, in that order; records keep their original index."""

    def __init__(self, source, indices: np.ndarray):
        self.source = source
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[int(self.indices[i])]

    @property
    def captions(self):
        captions = self.source.captions
        return [captions[int(i)] for i in self.indices]


def clean_training_source(source, train: ml_collections.ConfigDict):
    """The training source less excluded indices (e.g. a pretraining run's poisons), optionally cut
    to a random `subset_size` of the examples left, drawn with `train.subset_seed` (kept in index
    order). Fails if an excluded index would still be read."""
    indices = np.arange(len(source), dtype=np.int64)
    if train.exclude_indices_file:
        excluded = read_excluded_indices(train.exclude_indices_file)
        indices = np.setdiff1d(indices, excluded)
    if train.subset_size:
        if train.subset_size > len(indices):
            raise ValueError(f"train.subset_size={train.subset_size} but only {len(indices)} examples remain")
        indices = random_subset(indices, train.subset_size, train.subset_seed)
    if train.exclude_indices_file and np.intersect1d(indices, excluded).size:
        raise AssertionError("clean training set still holds excluded indices")
    if len(indices) == len(source):
        return source
    return IndexSubset(source, indices)


def random_subset(indices: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` of `indices` int64 [N] drawn without replacement by `seed`, sorted.

    The reference cleaned on a random 100K of the non-poisoned pairs; the first 100K of a web
    crawl's CSV would be a biased (e.g. by crawl date or domain) sample.
    """
    chosen = np.random.default_rng(seed).choice(len(indices), size=size, replace=False)
    return np.sort(np.asarray(indices, np.int64)[chosen])


def read_excluded_indices(path: str | os.PathLike) -> np.ndarray:
    """int64 [N] indices from a poison plan (a run's poison_indices.json) or a plain JSON list."""
    record = json.loads(epath.Path(path).read_text())
    if isinstance(record, list):
        return np.asarray(record, dtype=np.int64).reshape(-1)
    return poisoning.PoisonPlan.from_record(record, os.fspath(path)).indices


def make_training_input(config, objective, tokenizer, process_index: int, process_count: int, log_dir):
    """The clean training source, its poison plan (None when clean) and the checkpointable batch
    pipeline over it for this process; bad records are logged under `log_dir` (None: not logged).

    Returns:
      (source, plan, pipeline)
    """
    with_views = objectives.needs_augmented_views(objective)
    synonyms = make_synonyms(config.data) if with_views else None
    source = clean_training_source(pipeline.training_source(config.data), config.train)
    plan = pipeline.make_poison_plan(source, config.poison)
    data = pipeline.make_train_pipeline(
        source,
        image_size=config.model.image.size,
        context_length=config.model.text.context_length,
        tokenizer=tokenizer,
        data=config.data,
        poison=config.poison,
        with_views=with_views,
        synonyms=synonyms,
        process_index=process_index,
        process_count=process_count,
        run_dir=log_dir,
        plan=plan,
    )
    return source, plan, data


class Evaluator:
    """Zero-shot top-1/top-5 and ASR on one eval set; every device encodes its share."""

    def __init__(self, name, source, *, model, tokenizer, config, mesh, process_index, process_count):
        self.name = name
        self.source = source
        self.classnames = _read_override(config.eval.sets[name].classnames_file) or source.classnames
        self.templates = _read_override(config.eval.sets[name].templates_file) or source.templates
        self.target = evaluation.target_class_id(self.classnames, config.poison.target_label)
        self.config = config
        self.mesh = mesh
        self.process_index, self.process_count = process_index, process_count
        self.tokenizer = tokenizer
        context_length = config.model.text.context_length
        # Tokenised once, for every run and evaluation.
        self.prompt_tokens = evaluation.prompt_tokens(
            lambda texts: tokenizer.encode_batch(texts, context_length), self.classnames, self.templates
        )
        apply = functools.partial(model.apply, method=clip.CLIP.encode_text)
        options = cpu_runtime.compiler_options(mesh.devices.flat, forward_only=True)
        self.encode_text = jax.jit(lambda variables, tokens: apply(variables, tokens), compiler_options=options)
        encode_image = functools.partial(model.apply, method=clip.CLIP.encode_image)

        def counts(variables, batch, class_emb, target):
            n = batch["image"].shape[0]
            emb = encode_image(variables, jnp.concatenate([batch["image"], batch["triggered"]]))
            return evaluation.eval_counts(emb[:n], emb[n:], batch["label"], batch["valid"], class_emb, target)

        self.counts = jax.jit(counts, compiler_options=options)

    def __call__(self, variables) -> dict[str, float]:
        return self.evaluate_runs([variables])[0]

    def evaluate_runs(self, run_variables) -> list[dict[str, float]]:
        """The figures of `__call__` for each of several runs' variables, decoding and triggering
        the eval images once for all of them (a vectorised sweep's runs)."""
        class_embeddings = [
            evaluation.class_embeddings(
                lambda tokens, variables=variables: self.encode_text(variables, tokens),
                self.prompt_tokens,
                len(self.classnames),
            )
            for variables in run_variables
        ]
        batches = pipeline.eval_batches(
            self.source,
            image_size=self.config.model.image.size,
            batch_size=self.config.eval.batch_size,
            trigger=self.config.poison.trigger,
            seed=self.config.eval.seed,
            squash_triggered=self.config.poison.squash,
            process_index=self.process_index,
            process_count=self.process_count,
            num_workers=self.config.eval.num_workers,
        )
        keys = ("image", "triggered", "label", "valid")
        per_run = [[] for _ in run_variables]
        for batch in batches:
            global_batch = sharding.global_batch_from_local({k: batch[k] for k in keys}, self.mesh)
            for counts, variables, class_emb in zip(per_run, run_variables, class_embeddings):
                counts.append(self.counts(variables, global_batch, class_emb, self.target))
        return [evaluation.summarise_counts(jax.device_get(counts)) for counts in per_run]


def _read_override(path: str) -> list[str] | None:
    if not path:
        return None
    return [line for line in epath.Path(path).read_text().split("\n") if line.strip()]


def make_eval_source(set_config: ml_collections.ConfigDict):
    if set_config.kind == "folder":
        return sources.ImageFolderEvalSource(set_config.path)
    if set_config.kind == "tfds":
        templates = _read_override(set_config.templates_file)
        if not templates:
            raise ValueError(f"TFDS eval set {set_config.path} needs eval templates_file")
        return sources.TfdsEvalSource(
            set_config.path,
            set_config.split,
            templates,
            classnames=_read_override(set_config.classnames_file),
            data_dir=set_config.data_dir or None,
            manual_dir=set_config.manual_dir or None,
        )
    raise ValueError(f"eval set kind must be 'folder' or 'tfds', got {set_config.kind!r}")


class JsonLines:
    """Append-only JSON-lines file, written only by process 0.

    Object stores (gs://…) cannot append to a file: there every record rewrites the whole file,
    whose text this writer keeps (the logs hold one line per logged step, so they stay small).
    """

    def __init__(self, path: str | os.PathLike, enabled: bool):
        self.path, self.enabled = epath.Path(path), enabled
        self._remote_text = None  # the remote file's text as last written, once read

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        if not _is_remote(self.path):
            with self.path.open("a") as f:
                f.write(line)
            return
        if self._remote_text is None:
            self._remote_text = self.path.read_text() if self.path.exists() else ""
        self._remote_text += line
        self.path.write_text(self._remote_text)

    def keep_through(self, step: int) -> None:
        """Drop the records of steps after `step`: a restarted run writes them again from there,
        so each step is logged once."""
        if not self.enabled or not self.path.exists():
            return
        lines = [line + "\n" for line in self.path.read_text().split("\n") if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            _write_atomically(self.path, "".join(kept))
        self._remote_text = None


def _is_remote(path: str | os.PathLike) -> bool:
    """True for object-store paths (gs://…), which have no append and no local directory."""
    return "://" in os.fspath(path)


def _write_atomically(path: epath.Path, data: str | bytes) -> None:
    """A reader sees the old file or the new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    if isinstance(data, bytes):
        temporary.write_bytes(data)
    else:
        temporary.write_text(data)
    temporary.replace(path)


def _variables(state) -> dict:
    params = _model_params(state["params"])
    return {"params": params, **({"batch_stats": state["batch_stats"]} if state["batch_stats"] else {})}


# ---------------------------------------------------------------------------------------------
# Deep clustering
# ---------------------------------------------------------------------------------------------


class _ClusteringView:
    """Training records seen as unlabelled eval records, for embedding the whole cleaning set."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        record = self.source[i]
        return {**record, "label": -1}


def cluster_assignments(model, variables, source, config, mesh, num_clusters, rng) -> np.ndarray:
    """k-means cluster id per source example index (int32 [max index + 1], -1 where none)."""
    encode_image = jax.jit(functools.partial(model.apply, method=clip.CLIP.encode_image))
    embeddings, indices, valid = [], [], []
    for batch in pipeline.eval_batches(
        _ClusteringView(source),
        image_size=config.model.image.size,
        batch_size=config.eval.batch_size,
        trigger=None,
        seed=config.eval.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=config.eval.num_workers,
        # Unusable training records, which training drops, get no cluster (-1) instead of failing.
        skip_bad_records=True,
    ):
        global_batch = sharding.global_batch_from_local(
            {"image": batch["image"], "index": batch["index"], "valid": batch["valid"]}, mesh
        )
        embeddings.append(encode_image(variables, global_batch["image"]))
        indices.append(global_batch["index"])
        valid.append(global_batch["valid"])
    embeddings, indices, valid = (jnp.concatenate(x) for x in (embeddings, indices, valid))
    kmeans = jax.jit(cleaning.spherical_kmeans, static_argnums=(2, 3))
    assign, _ = kmeans(embeddings, valid, num_clusters, config.cleaning.kmeans_iterations, rng)
    from jax.experimental import multihost_utils

    assign, indices, valid = (np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in (assign, indices, valid))
    max_index = int(indices[valid].max()) + 1 if valid.any() else 0
    return cleaning.assignment_table(np.where(valid, indices, -1), assign, max_index)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (pretraining or cleaning) as configured; returns the last evaluation's results.

    Run again in the same `workdir`, it resumes from the newest checkpoint (model, optimiser and
    data position), so an interrupted run ends exactly as an uninterrupted one; log records written
    after that checkpoint are dropped and written again.
    """
    # ---- Setup ---------------------------------------------------------------------------------
    check_start_keys(config.train)
    # Every run file goes through epath, so the workdir may be on GCS (gs://bucket/run).
    run_dir = epath.Path(workdir)
    workdir = os.fspath(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    process_index, process_count = jax.process_index(), jax.process_count()
    is_chief = process_index == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    metrics_log = JsonLines(run_dir / METRICS_FILE, is_chief)
    evals_log = JsonLines(run_dir / EVALS_FILE, is_chief)
    if is_chief:
        (run_dir / "config.json").write_text(config.to_json_best_effort(indent=2))
    mesh = sharding.make_mesh()
    rng = jax.random.key(config.seed)

    # ---- Data ----------------------------------------------------------------------------------
    tokenizer = make_tokenizer(config)
    source, plan, data = make_training_input(
        config, config.objective, tokenizer, process_index, process_count, workdir if is_chief else None
    )
    if plan is not None and is_chief:
        plan.write(run_dir / POISON_FILE)
    steps_per_epoch = len(source) // config.data.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(source)} training examples cannot fill one batch of {config.data.batch_size}")
    total_steps = config.train.num_epochs * steps_per_epoch

    # ---- Model and state -----------------------------------------------------------------------
    model = clip.build_model(config.model)
    deep_clustering = bool(config.objective.cluster_weight)
    tx = optim.make_optimizer(config.optim, total_steps, resettable_head=cleaning.CLUSTER_HEAD if deep_clustering else None)
    num_clusters = min(config.cleaning.num_clusters, len(source))

    def init_variables(rng):
        """Random model variables {"params", "batch_stats"}, plus the deep-clustering head."""
        variables = train_step.init_variables(model, rng, config.model.image.size, config.model.text.context_length)
        if deep_clustering:
            head = cleaning.init_cluster_head(rng, config.model.embed_dim, num_clusters)
            variables["params"] = {**variables["params"], "cluster_head": head}
        return variables

    abstract = jax.eval_shape(lambda rng: _state_from_variables(init_variables(rng), tx), rng)
    shardings = sharding.state_shardings(abstract, mesh, config.sharding)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    variable_shardings = {"params": shardings["params"], "batch_stats": shardings["batch_stats"]}
    # Epoch ends are always saved; every k-th is kept for good, and epochs.json maps them to steps.
    keep_every_steps = config.train.keep_checkpoint_every_epochs * steps_per_epoch
    manager = checkpointing.make_manager(run_dir / "checkpoints", config.train.keep_checkpoints, keep_every_steps)
    if is_chief:
        checkpointing.write_epoch_steps(run_dir / "checkpoints", steps_per_epoch)
    # An init_from checkpoint is read before any compute so a bad path fails at once.
    init_from = saved_opt = None
    if config.train.init_from and manager.latest_step() is None:
        variables_abstract = {"params": _model_params(abstract["params"]), "batch_stats": abstract["batch_stats"]}
        init_from, where = checkpointing.load_model_variables(
            config.train.init_from, variables_abstract, config.train.init_from_epoch
        )
        logging.info("Initialising from %s", where)
        if config.train.reload_optimizer_state:
            # Read in the structure of the pretraining run's optimiser: `tx` may also hold a
            # deep-clustering head's AdamW, which pretraining never had.
            saved_opt, saved_weight_decay = reloaded_optimizer_state(
                where, optim.make_optimizer(config.optim, total_steps), variables_abstract["params"], mesh, config
            )
    state, start_step = checkpointing.restore_latest(manager, abstract, data.iterator)
    original_variables = None
    if state is not None:
        logging.info("Resumed from step %d", start_step)
        # Records written after the checkpoint (before an interruption) are redone from it.
        metrics_log.keep_through(start_step)
        evals_log.keep_through(start_step)
    else:
        # No checkpoint: whatever an earlier attempt logged is redone from the start.
        metrics_log.keep_through(-1)
        evals_log.keep_through(-1)
        start_step = 0
        if init_from is not None and config.eval.at_start and shrinks_start_weights(config.cleaning):
            # The step-0 evaluation is the model being cleaned, as pretrained: reports compare
            # every cleaning point with it. Kept (copied: the state below takes the loaded buffers)
            # until then; the shrunk start is evaluated too and logged beside it.
            original_variables = jax.tree.map(jnp.copy, init_from)
        variables = initial_variables(config, init_from, init_variables, variable_shardings, rng, num_clusters)
        # The optimiser starts fresh, also from a pretrained checkpoint, unless asked to reload it.
        make_state = jax.jit(functools.partial(_state_from_variables, tx=tx), out_shardings=shardings, donate_argnums=0)
        state = make_state(variables)
        if saved_opt is not None:
            opt = optim.with_reloaded_adam(state["opt"], saved_opt, saved_weight_decay)
            state = {**state, "opt": jax.device_put(opt, shardings["opt"])}
    step_fn = train_step.shard_and_jit_train_step(train_step.make_train_step(model, tx, config.objective), shardings, mesh)

    # ---- Evaluators ----------------------------------------------------------------------------
    evaluators = make_evaluators(config, model, tokenizer, mesh, process_index, process_count)

    def evaluate(variables) -> dict[str, float]:
        return {f"{name}/{key}": value for name, evaluator in evaluators.items() for key, value in evaluator(variables).items()}

    def run_evals(step: int, original_variables=None) -> dict[str, float]:
        """Evaluates the state (at step 0 of a shrink-and-perturb run: the unshrunk original, with
        the shrunk start under "after_start_transform") and logs the figures."""
        results = evaluate(_variables(state) if original_variables is None else original_variables)
        extra = {} if original_variables is None else {"after_start_transform": evaluate(_variables(state))}
        epoch = step // steps_per_epoch
        evals_log.write({"step": step, "epoch": epoch, **results, **extra})
        writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
        logging.info("eval at step %d (epoch %d): %s", step, epoch, results)
        return results

    # ---- Loop ----------------------------------------------------------------------------------
    try:
        results = None
        if start_step == 0 and config.eval.at_start:
            results = run_evals(0, original_variables)
            original_variables = None  # freed: only the step-0 evaluation reads it
        hooks = []
        if is_chief:
            hooks.append(periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer, every_steps=config.train.log_every_steps))
            if config.train.profile_steps:
                hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.train.profile_steps))
        cluster_table = None
        pending = None  # (step, metrics) of the previous step, read one step late to keep dispatch async
        last_log_time, last_log_step = time.perf_counter(), start_step
        for step in range(start_step, total_steps):
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            if deep_clustering and (cluster_table is None or step_in_epoch == 0):
                table_path = _cluster_table_path(run_dir, epoch)
                if step_in_epoch != 0 and table_path.exists():
                    # Resumed mid-epoch: keep the epoch's assignments, which the restored head was
                    # trained on; recomputing them from the current weights would change the run.
                    cluster_table = np.load(io.BytesIO(table_path.read_bytes()), allow_pickle=False)
                else:
                    if step_in_epoch != 0:
                        logging.warning("No cluster assignments saved for epoch %d: recomputing them mid-epoch", epoch)
                    rng_epoch = jax.random.fold_in(rng, epoch)
                    cluster_table = cluster_assignments(model, _variables(state), source, config, mesh, num_clusters, rng_epoch)
                    state = cleaning.reset_cluster_head(state, rng_epoch, config.model.embed_dim, num_clusters)
                    state = jax.device_put(state, shardings)
                    if is_chief:
                        _save_cluster_table(run_dir, epoch, cluster_table)
            batch = next(data)
            model_batch = {key: batch[key] for key in train_step.MODEL_BATCH_KEYS if key in batch}
            if deep_clustering:
                ids = np.asarray(batch["index"])
                model_batch["cluster"] = np.where(ids < len(cluster_table), cluster_table[np.minimum(ids, len(cluster_table) - 1)], -1)
            global_batch = sharding.global_batch_from_local(model_batch, mesh)
            state, metrics = step_fn(state, global_batch, jax.random.fold_in(rng, step))
            if pending is not None:
                _check_finite(*pending, manager, workdir)
            pending = (step, metrics)
            for hook in hooks:
                hook(step + 1)
            end_of_epoch = (step + 1) % steps_per_epoch == 0
            should_save = end_of_epoch or (step + 1) % config.train.checkpoint_every_steps == 0
            if should_save:
                # Waits for this step, so a diverged state is never evaluated or saved.
                _check_finite(step, metrics, manager, workdir)
                if not bool(_all_finite(state["params"])):
                    raise NonFiniteLossError(
                        f"parameters became non-finite in step {step + 1}; "
                        f"last good checkpoint: {_last_checkpoint(manager, workdir)}"
                    )
            if (step + 1) % config.train.log_every_steps == 0 or step + 1 == total_steps:
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                _check_finite(step, metrics, manager, workdir)
                now = time.perf_counter()
                scalars["pairs_per_s"] = (step + 1 - last_log_step) * config.data.batch_size / (now - last_log_time)
                scalars["bad_records"] = data.bad_records.num_bad
                last_log_time, last_log_step = now, step + 1
                writer.write_scalars(step + 1, scalars)
                metrics_log.write({"step": step + 1, "epoch": epoch, **scalars})
            if end_of_epoch and ((epoch + 1) % config.eval.every_epochs == 0 or step + 1 == total_steps):
                results = run_evals(step + 1)
            if should_save:
                checkpointing.save(manager, step + 1, state, data.iterator)
        if pending is not None:
            _check_finite(*pending, manager, workdir)
        if results is None:  # Resumed after the last evaluation: report what it found.
            results = _last_eval(run_dir / EVALS_FILE)
        if results is None:
            results = run_evals(total_steps)
    finally:
        # Also when the loop fails: a checkpoint being written is finished, not left half-done, and
        # data worker processes stop now.
        manager.wait_until_finished()
        manager.close()
        data.close()
        writer.flush()
    if is_chief:
        # Atomic: done.json marks the run finished for sweeps and reports, so it is never partial.
        _write_atomically(run_dir / DONE_FILE, json.dumps({"steps": total_steps, "results": results}, indent=2))
    return results


def _state_from_variables(variables: dict, tx) -> dict:
    """The training state (see `train_step.init_state`) at step 0 with a fresh optimiser."""
    return {
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt": tx.init(variables["params"]),
        "step": jnp.zeros((), jnp.int32),
    }


def make_evaluators(config, model, tokenizer, mesh, process_index: int, process_count: int) -> dict[str, Evaluator]:
    """One Evaluator per config.eval.sets entry, by name."""
    return {
        name: Evaluator(
            name,
            make_eval_source(set_config),
            model=model,
            tokenizer=tokenizer,
            config=config,
            mesh=mesh,
            process_index=process_index,
            process_count=process_count,
        )
        for name, set_config in config.eval.sets.items()
    }


def shrinks_start_weights(cleaning_config: ml_collections.ConfigDict) -> bool:
    """Whether shrink-and-perturb changes the weights a cleaning run starts from."""
    return cleaning_config.shrink != 1.0 or cleaning_config.perturb != 0.0


def check_start_keys(train: ml_collections.ConfigDict) -> None:
    """Fail before anything is written when the keys that choose a run's start contradict each other."""
    if train.keep_checkpoint_every_epochs < 0:
        raise ValueError(f"train.keep_checkpoint_every_epochs must be >= 0, got {train.keep_checkpoint_every_epochs}")
    if not train.init_from:
        if train.init_from_epoch != -1:
            raise ValueError(
                f"train.init_from_epoch={train.init_from_epoch} needs train.init_from (the run to start from)"
            )
        if train.reload_optimizer_state:
            raise ValueError("train.reload_optimizer_state needs train.init_from (the run whose optimiser to reload)")


def reloaded_optimizer_state(step_dir: str, tx, abstract_params, mesh, config) -> tuple[Any, float]:
    """The optimiser state saved in `step_dir` and the weight decay of the run that saved it (its
    config.json), for train.reload_optimizer_state. abstract_params: the model's params (no
    deep-clustering head) with shardings; the saved state must be `tx`'s for them."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = sharding.state_shardings(abstract_opt, mesh, config.sharding)
    abstract_opt = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_opt, opt_shardings
    )
    saved_opt = checkpointing.load_optimizer_state(step_dir, abstract_opt)
    saved_config = checkpointing.saved_run_config(step_dir)
    try:
        weight_decay = float(saved_config["optim"]["weight_decay"])
    except (KeyError, TypeError, ValueError) as error:
        raise checkpointing.CheckpointError(
            f"the config of the run that saved {step_dir} has no optim.weight_decay ({type(error).__name__}: {error})"
        ) from None
    logging.warning(
        "train.reload_optimizer_state: Adam's moments and step count %d come from %s, and its run's weight decay %g "
        "replaces the configured optim.weight_decay %g (as the reference's optimizer.load_state_dict did); "
        "the learning-rate schedule starts fresh",
        int(optim.adam_state(saved_opt).count),
        step_dir,
        weight_decay,
        config.optim.weight_decay,
    )
    return saved_opt, weight_decay


def initial_variables(config, init_from, init_variables, variable_shardings, rng, num_clusters: int) -> dict:
    """The variables a run without a checkpoint starts from: `init_variables(rng)`, or the
    pretrained `init_from` variables, shrunk and perturbed towards that random init when
    config.cleaning asks for it, or given a fresh deep-clustering head when the variables have
    one (`num_clusters` centroids). variable_shardings: {"params", "batch_stats"} of the result."""
    shrink_and_perturb = shrinks_start_weights(config.cleaning)
    if init_from is None or shrink_and_perturb:
        variables = jax.jit(init_variables, out_shardings=variable_shardings)(rng)
    if init_from is None:
        return variables
    params = dict(init_from["params"])
    if shrink_and_perturb:
        mix = functools.partial(cleaning.shrink_and_perturb, shrink=config.cleaning.shrink, perturb=config.cleaning.perturb)
        mix = jax.jit(mix, out_shardings=_model_params(variable_shardings["params"]))
        params = {**variables["params"], **mix(params, _model_params(variables["params"]))}
    elif "cluster_head" in variable_shardings["params"]:
        init_head = functools.partial(cleaning.init_cluster_head, embed_dim=config.model.embed_dim, num_clusters=num_clusters)
        params["cluster_head"] = jax.jit(init_head, out_shardings=variable_shardings["params"]["cluster_head"])(rng)
    return {"params": params, "batch_stats": init_from["batch_stats"]}


def _model_params(params: dict) -> dict:
    """The CLIP model's parameters without the deep-clustering head."""
    return {k: v for k, v in params.items() if k != "cluster_head"}


def _last_eval(path: epath.Path) -> dict | None:
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().split("\n") if line.strip()]
    if not lines:
        return None
    return {k: v for k, v in lines[-1].items() if k not in ("step", "epoch")}


@jax.jit
def _all_finite(params) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)]))


def _last_checkpoint(manager, workdir: str) -> str:
    manager.wait_until_finished()
    last = manager.latest_step()
    if last is None:
        return "none (no checkpoint saved yet)"
    return os.fspath(epath.Path(workdir) / "checkpoints" / str(last))


def _check_finite(step: int, metrics, manager, workdir: str) -> None:
    """Stop the run when the loss of (0-based) `step` is NaN or infinite.

    That loss was computed from the state after `step` steps, so a checkpoint of that state (or of
    a later one) is deleted: a restart from it would only diverge again.
    """
    loss = float(metrics["loss"])
    if math.isfinite(loss):
        return
    manager.wait_until_finished()
    for saved in manager.all_steps():
        if saved >= step:
            manager.delete(saved)
    raise NonFiniteLossError(
        f"loss is {loss} at step {step + 1}; last good checkpoint: {_last_checkpoint(manager, workdir)}"
    )


def _cluster_table_path(workdir: str | os.PathLike, epoch: int) -> epath.Path:
    return epath.Path(workdir) / CLUSTERS_DIR / f"epoch_{epoch}.npy"


def _save_cluster_table(workdir: str | os.PathLike, epoch: int, table: np.ndarray) -> None:
    """Keep an epoch's k-means assignments for a restart within the epoch. The previous epoch's
    stay too (its last checkpoint may not be finished yet); older ones are no longer needed."""
    path = _cluster_table_path(workdir, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, table, allow_pickle=False)
    _write_atomically(path, buffer.getvalue())
    for old_epoch in range(epoch - 1):
        _cluster_table_path(workdir, old_epoch).unlink(missing_ok=True)
