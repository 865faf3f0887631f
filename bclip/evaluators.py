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

from bclip import cpu_runtime, evaluation, sharding
from bclip.data import pipeline, sources
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


# config.eval.sets[name].evaluator -> (name, set config, EvalContext) -> evaluator.
EVALUATORS = {"zero_shot": zero_shot}


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
