"""Evaluators built from `config.eval.sets`: each set names its evaluator (EVALUATORS), owns its
data and says how often it runs. An evaluator scores one or several runs' model variables at once
(a vectorised group's runs share the decoded and triggered eval images).

An evaluator has `name`, `every_epochs` and `evaluate_runs(list of variables) -> list of {figure:
value}`; it is built by `EVALUATORS[set_config.evaluator](name, set_config, context)`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from jax.experimental import multihost_utils

import numpy as np

from bclip import checkpointing, cpu_runtime, evaluation, linear_probe, retrieval, sharding
from bclip.data import pipeline, sources, training_input
from bclip.models import clip


class ZeroShotEvaluator:
    """Zero-shot top-1/top-5 and ASR on one eval set; every device encodes its share."""

    def __init__(self, name, source, *, model, tokenizer, config, mesh, process_index, process_count):
        self.name = name
        self.source = source
        self.every_epochs = config.eval.sets[name].every_epochs or config.eval.every_epochs
        self.classnames = read_lines(config.eval.sets[name].classnames_file) or source.classnames
        self.templates = read_lines(config.eval.sets[name].templates_file) or source.templates
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
        self.encode_text = text_encoder(model, mesh)
        options = cpu_runtime.compiler_options(mesh.devices.flat, forward_only=True)
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


def text_encoder(model, mesh):
    """The text tower as the evaluators run it: jitted, (variables, tokens) -> embeddings, with the
    forward-only CPU options on CPU meshes."""
    options = cpu_runtime.compiler_options(mesh.devices.flat, forward_only=True)
    return jax.jit(functools.partial(model.apply, method=clip.CLIP.encode_text), compiler_options=options)


def read_lines(path: str) -> list[str] | None:
    if not path:
        return None
    return [line for line in epath.Path(path).read_text().split("\n") if line.strip()]


def make_eval_source(set_config: ml_collections.ConfigDict):
    if set_config.kind == "folder":
        return sources.ImageFolderEvalSource(set_config.path)
    if set_config.kind == "tfds":
        templates = read_lines(set_config.templates_file)
        if not templates:
            raise ValueError(f"TFDS eval set {set_config.path} needs eval templates_file")
        return sources.TfdsEvalSource(
            set_config.path,
            set_config.split,
            templates,
            classnames=read_lines(set_config.classnames_file),
            data_dir=set_config.data_dir or None,
            manual_dir=set_config.manual_dir or None,
        )
    raise ValueError(f"eval set kind must be 'folder' or 'tfds', got {set_config.kind!r}")



@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What every evaluator is built with."""

    config: ml_collections.ConfigDict
    model: object
    tokenizer: object
    mesh: object
    process_index: int
    process_count: int


def zero_shot(name: str, set_config: ml_collections.ConfigDict, context: EvalContext) -> ZeroShotEvaluator:
    return ZeroShotEvaluator(
        name,
        make_eval_source(set_config),
        model=context.model,
        tokenizer=context.tokenizer,
        config=context.config,
        mesh=context.mesh,
        process_index=context.process_index,
        process_count=context.process_count,
    )


class _ImageEmbedder:
    """Every image of a source embedded on the mesh (each device its share), without and with the
    trigger, for several runs' variables at once (the images are decoded and triggered once)."""

    def __init__(self, context: EvalContext):
        self.context = context
        config, mesh = context.config, context.mesh
        encode = functools.partial(context.model.apply, method=clip.CLIP.encode_image)
        options = cpu_runtime.compiler_options(mesh.devices.flat, forward_only=True)
        # Replicated out: every process holds every embedding, in source order after `embed`.
        self.encode = jax.jit(encode, out_shardings=sharding.replicated(mesh), compiler_options=options)
        self.config = config

    def embed(self, source, run_variables, triggered: bool) -> list[dict[str, np.ndarray]]:
        """Per run: {"image" [N, D], and with `triggered` "triggered" [N, D]}, row i = source[i];
        plus "label" int [N] (the same for every run)."""
        config, context = self.config, self.context
        keys = ("image", "triggered") if triggered else ("image",)
        parts = [{key: [] for key in keys} for _ in run_variables]
        labels, indices = [], []
        for batch in pipeline.eval_batches(
            source,
            image_size=config.model.image.size,
            batch_size=config.eval.batch_size,
            trigger=config.poison.trigger if triggered else None,
            seed=config.eval.seed,
            squash_triggered=config.poison.squash,
            process_index=context.process_index,
            process_count=context.process_count,
            num_workers=config.eval.num_workers,
        ):
            global_batch = sharding.global_batch_from_local({k: batch[k] for k in keys}, context.mesh)
            # The global batch's rows are the processes' local rows in process order.
            index, valid, label = (np.asarray(multihost_utils.process_allgather(batch[k], tiled=True)) for k in ("index", "valid", "label"))
            indices.append(index[valid])
            labels.append(label[valid])
            for run_parts, variables in zip(parts, run_variables):
                for key in keys:
                    run_parts[key].append(np.asarray(self.encode(variables, global_batch[key]))[valid])
        order = np.argsort(np.concatenate(indices), kind="stable")
        label = np.concatenate(labels)[order]
        return [{"label": label, **{key: np.concatenate(v)[order] for key, v in run_parts.items()}} for run_parts in parts]


class RetrievalEvaluator:
    """Image->text and text->image recall@1/5/10 on a Karpathy-JSON retrieval set (`path`: the
    JSON file, `split`: its split), and the backdoor's success through retrieval: among the
    triggered images none of whose own captions names the target, the share whose most similar
    caption names it (`retrieval.names_target`: the target label's words, whole and in order)."""

    def __init__(self, name: str, set_config: ml_collections.ConfigDict, context: EvalContext):
        config = context.config
        self.name, self.context = name, context
        self.every_epochs = set_config.every_epochs or config.eval.every_epochs
        self.source = sources.KarpathyRetrievalSource(set_config.path, set_config.split)
        self.tokens = context.tokenizer.encode_batch(self.source.captions, config.model.text.context_length)
        self.caption_image = jnp.asarray(self.source.caption_image, jnp.int32)
        self.caption_names_target = jnp.asarray(retrieval.caption_flags(self.source.captions, config.poison.target_label))
        self.embedder = _ImageEmbedder(context)
        self.encode_text = text_encoder(context.model, context.mesh)
        self.figures = jax.jit(retrieval.retrieval_figures)

    def evaluate_runs(self, run_variables) -> list[dict[str, float]]:
        results = []
        for variables, embedded in zip(run_variables, self.embedder.embed(self.source, run_variables, triggered=True)):
            # One "class" per caption: its embedding, encoded in fixed-size chunks (one compile).
            text = evaluation.class_embeddings(lambda t, v=variables: self.encode_text(v, t), self.tokens, len(self.tokens))
            figures = self.figures(embedded["image"], embedded["triggered"], text, self.caption_image, self.caption_names_target)
            results.append({key: float(value) for key, value in jax.device_get(figures).items()})
        return results


class LinearProbeEvaluator:
    """A linear probe on frozen image features (bclip.linear_probe): fitted on the labelled image
    folder `train_path` with λ chosen on its `probe_validation_share` from `probe_l2_grid`, scored
    on the set's own folder (`path`): clean top-1/top-5/mean per-class recall, and ASR through the
    probe (triggered images of other classes assigned to the target)."""

    def __init__(self, name: str, set_config: ml_collections.ConfigDict, context: EvalContext):
        config = context.config
        if not set_config.train_path:
            raise ValueError(f"eval.sets.{name}: the linear probe needs train_path (a labelled image folder to fit on)")
        self.name, self.context = name, context
        self.every_epochs = set_config.every_epochs or config.eval.every_epochs
        self.train_source = sources.ImageFolderEvalSource(set_config.train_path)
        self.test_source = make_eval_source(set_config)
        classnames = self.test_source.classnames
        if list(self.train_source.classnames) != list(classnames):
            raise ValueError(f"eval.sets.{name}: train_path's classes differ from the test set's ({set_config.train_path} vs {set_config.path})")
        self.num_classes = len(classnames)
        self.target = evaluation.target_class_id(classnames, config.poison.target_label)
        self.is_validation = linear_probe.validation_mask(len(self.train_source), set_config.probe_validation_share, config.eval.seed)
        self.l2_grid = tuple(float(l2) for l2 in set_config.probe_l2_grid)
        if not self.l2_grid or min(self.l2_grid) <= 0:
            raise ValueError(f"eval.sets.{name}.probe_l2_grid must hold positive penalties, got {self.l2_grid}")
        self.embedder = _ImageEmbedder(context)
        self.figures = jax.jit(
            functools.partial(linear_probe.probe_figures, num_classes=self.num_classes, target=self.target, l2_grid=self.l2_grid)
        )

    def evaluate_runs(self, run_variables) -> list[dict[str, float]]:
        train = self.embedder.embed(self.train_source, run_variables, triggered=False)
        test = self.embedder.embed(self.test_source, run_variables, triggered=True)
        results = []
        for train_run, test_run in zip(train, test):
            figures = self.figures(
                train_run["image"], train_run["label"], self.is_validation, test_run["image"], test_run["triggered"], test_run["label"]
            )
            results.append({key: float(value) for key, value in jax.device_get(figures).items()})
        return results


class TargetedEvaluator:
    """Targeted poisoning's success (Carlini & Terzis, ICLR 2022): zero-shot top-1 of each image
    poison.targeted chooses, against the label it was poisoned towards (class names and templates
    of poison.targeted.images, or the set's files). Figures (evaluation.targeted_figures):
    success_rate, true_class_rate, other_target_rate, num_images, and hit_<row> (1: classified
    as its target) per chosen image. The images come from poison.targeted, so the set's `path`,
    when given, must be that folder."""

    def __init__(self, name: str, set_config: ml_collections.ConfigDict, context: EvalContext):
        config = context.config
        folder, self.image_ids, targets = pipeline.targeted_images(config.poison)
        if set_config.path and checkpointing.absolute(set_config.path) != checkpointing.absolute(config.poison.targeted.images):
            raise ValueError(
                f"eval.sets.{name}.path={set_config.path!r} differs from poison.targeted.images="
                f"{config.poison.targeted.images!r}, where the targeted images come from; leave the path empty"
            )
        self.name, self.context = name, context
        self.every_epochs = set_config.every_epochs or config.eval.every_epochs
        # The chosen rows only; records keep their row as index, and come back in row order.
        self.source = training_input.IndexSubset(folder, self.image_ids)
        self.targets = jnp.asarray(targets, jnp.int32)
        self.labels = jnp.asarray(folder.labels[self.image_ids], jnp.int32)
        classnames = read_lines(set_config.classnames_file) or folder.classnames
        templates = read_lines(set_config.templates_file) or folder.templates
        self.num_classes = len(classnames)
        context_length = config.model.text.context_length
        self.prompt_tokens = evaluation.prompt_tokens(
            lambda texts: context.tokenizer.encode_batch(texts, context_length), classnames, templates
        )
        self.encode_text = text_encoder(context.model, context.mesh)
        self.embedder = _ImageEmbedder(context)
        self.figures = jax.jit(evaluation.targeted_figures)

    def evaluate_runs(self, run_variables) -> list[dict[str, float]]:
        results = []
        for variables, embedded in zip(run_variables, self.embedder.embed(self.source, run_variables, triggered=False)):
            class_emb = evaluation.class_embeddings(lambda t, v=variables: self.encode_text(v, t), self.prompt_tokens, self.num_classes)
            figures = jax.device_get(self.figures(embedded["image"], class_emb, self.targets, self.labels))
            hits = figures.pop("hits")
            results.append({
                **{key: float(value) for key, value in figures.items()},
                "num_images": len(self.image_ids),
                **{f"hit_{int(row)}": float(hit) for row, hit in zip(self.image_ids, hits)},
            })
        return results


# config.eval.sets[name].evaluator -> (name, set config, EvalContext) -> evaluator.
EVALUATORS = {"zero_shot": zero_shot, "retrieval": RetrievalEvaluator, "linear_probe": LinearProbeEvaluator, "targeted": TargetedEvaluator}


def make_evaluators(config, model, tokenizer, mesh, process_index: int, process_count: int) -> dict:
    """One evaluator per config.eval.sets entry, by name."""
    context = EvalContext(config, model, tokenizer, mesh, process_index, process_count)
    evaluators = {}
    for name, set_config in config.eval.sets.items():
        if set_config.evaluator not in EVALUATORS:
            raise ValueError(f"eval.sets.{name}.evaluator={set_config.evaluator!r}; known: {sorted(EVALUATORS)}")
        evaluators[name] = EVALUATORS[set_config.evaluator](name, set_config, context)
    return evaluators


def is_due(evaluator, epoch: int, last_epoch: int) -> bool:
    """Whether `evaluator` runs after (0-based) `epoch`: every `every_epochs`-th epoch and the last."""
    return (epoch + 1) % evaluator.every_epochs == 0 or epoch == last_epoch
