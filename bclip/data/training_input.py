"""What a run trains on: its examples (less excluded indices, optionally a random subset), their
poison plan, the caption tokenizer and synonyms, and the checkpointable batch pipeline over them."""

import dataclasses
import json
import os

import ml_collections
import numpy as np
from etils import epath

from bclip import objectives
from bclip.data import pipeline, poisoning, text_augment
from bclip.data import tokenizer as tokenizer_lib


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


def training_examples(config) -> tuple:
    """(the training source less excluded examples, its poison plan or None).

    The poisons are a property of the whole dataset (as a crawl's are): a run that excludes
    examples (e.g. those a detector flagged) trains on the poisons it kept, and no others.
    """
    dataset = pipeline.training_source(config.data)
    source = clean_training_source(dataset, config.train)
    plan = pipeline.make_poison_plan(dataset, config.poison)
    if plan is not None and source is not dataset:
        plan = dataclasses.replace(plan, indices=np.intersect1d(plan.indices, source.indices))
    return source, plan


def make_training_input(config, objective, tokenizer, process_index: int, process_count: int, log_dir):
    """The clean training source, its poison plan (None when clean) and the checkpointable batch
    pipeline over it for this process; bad records are logged under `log_dir` (None: not logged).

    Returns:
      (source, plan, pipeline)
    """
    with_views = objectives.needs_augmented_views(objective)
    synonyms = make_synonyms(config.data) if with_views else None
    source, plan = training_examples(config)
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


def num_examples(source) -> int:
    """One more than the largest example index a (possibly subset) training source holds: the
    length of per-example tables indexed by a record's "index"."""
    return len(source.source) if isinstance(source, IndexSubset) else len(source)
