"""The run config: every section's defaults in one place. Config files start from `run_config`.

A run is one pretraining or cleaning job; what it does comes from the sections: `model`,
`objective`, `optim`, `sharding`, `data`, `poison`, `cleaning`, `train`, `eval`.
The returned ConfigDict is locked: a typo in a key is an error, not a silently ignored setting.
"""

import copy
import difflib
import importlib.util
import os
import re
from typing import Any, Mapping

import ml_collections

from bclip import cleaning, epoch_passes, linear_probe, objectives, optim, sharding
from bclip.data import pipeline
from bclip.models import clip

# Config sections whose entries the user names: an override of a new name there adds an entry
# with its defaults (an eval set; a per-epoch pass's options, by the pass's name).
NAMED_ENTRIES = {"eval.sets": lambda name: eval_set_config(), "epoch_passes": epoch_passes.pass_options}


def eval_set_config(kind: str = "folder", path: str = "", **overrides) -> ml_collections.ConfigDict:
    """One eval set: an image folder with labels.csv or a TFDS dataset, and its evaluator."""
    config = ml_collections.ConfigDict(
        {
            "evaluator": "zero_shot",  # a key of bclip.evaluators.EVALUATORS
            # Evaluate after every k-th epoch (and the last); 0 = eval.every_epochs.
            "every_epochs": 0,
            # Also before the first step (when eval.at_start); False skips the set there.
            "at_start": True,
            "kind": kind,  # "folder" | "tfds"
            "path": path,  # folder path, TFDS dataset name, or (retrieval) the Karpathy JSON file
            "split": "validation",  # TFDS: its split; retrieval: the Karpathy JSON's ("test")
            "data_dir": "",  # TFDS only
            "manual_dir": "",  # TFDS only (imagenet2012)
            # Class names / templates files override the set's own (required for TFDS ImageNet).
            "classnames_file": "",
            "templates_file": "",
            # linear_probe only: the labelled image folder the probe is fitted on (scored on `path`),
            # the share of it that chooses the L2 penalty, and the penalties tried.
            "train_path": "",
            "probe_validation_share": 0.2,
            "probe_l2_grid": linear_probe.DEFAULT_L2_GRID,
        }
    )
    config.update(overrides)
    return config


def enable_epoch_pass(config: ml_collections.ConfigDict, name: str, **options) -> None:
    """Turn on per-epoch pass `name` in `config` with `options` (the rest at their defaults)."""
    entry = epoch_passes.pass_options(name)
    unknown = sorted(set(options) - set(entry))
    if unknown:
        raise ValueError(f"per-epoch pass {name!r} has no options {unknown}; it takes {sorted(entry)}")
    entry.update(options)
    with config.epoch_passes.unlocked():
        config.epoch_passes[name] = entry


def run_config(model_name: str = "micro-vit", **model_overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = clip.model_config(model_name, **model_overrides)
    config.objective = objectives.objective_config()
    config.optim = optim.optim_config()
    config.sharding = sharding.sharding_config()
    config.data = pipeline.data_config()
    config.poison = pipeline.poison_config()
    config.cleaning = cleaning.cleaning_config()
    config.train = ml_collections.ConfigDict(
        {
            "num_epochs": 1,
            # A finished checkpoint (a run's workdir, its checkpoints dir or a step dir) whose params
            # start this run; the optimiser and schedule start fresh (see reload_optimizer_state).
            # Or a .safetensors file of OpenAI / open_clip weights in open_clip's layout (model.*
            # must be its architecture: `python -m bclip.weights describe FILE` says which).
            "init_from": "",
            # The epoch of init_from (a workdir or checkpoints dir) to start from, counted as the
            # reference's epoch_21.pt: 21 = the checkpoint saved after the 21st epoch. That run must
            # have kept it (keep_checkpoint_every_epochs); -1 = its latest checkpoint.
            "init_from_epoch": -1,
            # Also take init_from's AdamW state, as the reference's cleaning did: Adam's moments and
            # step count (bias correction) continue, the learning-rate schedule starts fresh, and the
            # pretraining run's weight decay (its config.json) replaces optim.weight_decay, with a
            # warning, because PyTorch's optimizer.load_state_dict replaced the hyper-parameters too.
            "reload_optimizer_state": False,
            # For cleaning: a JSON list of indices (a pretraining run's poison_indices.json) that the
            # training set must not contain; the run fails if any is present.
            "exclude_indices_file": "",
            # Use only a random N of the training source's examples (after exclusion), drawn with
            # subset_seed; 0 = all.
            "subset_size": 0,
            "subset_seed": 0,
            "log_every_steps": 20,
            "checkpoint_every_steps": 500,
            "keep_checkpoints": 2,
            # Also keep the checkpoint of every k-th epoch's end for good (for init_from_epoch); 0 = none.
            "keep_checkpoint_every_epochs": 0,
            # Profile a few steps with jax.profiler (traces go to workdir/plugins/profile).
            "profile_steps": 0,
        }
    )
    # Per-epoch passes to run, by name (bclip.epoch_passes.EPOCH_PASSES), each with its options:
    # e.g. override {"epoch_passes.NAME.OPTION": value}, or enable_epoch_pass in a config file.
    config.epoch_passes = ml_collections.ConfigDict()
    config.eval = ml_collections.ConfigDict(
        {
            "sets": {"test": eval_set_config()},
            # The set used to choose a cleaning run's epoch (never the test set).
            "selection_set": "",
            "at_start": True,
            "every_epochs": 1,
            "batch_size": 256,
            "seed": 0,
            "num_workers": 0,
        }
    )
    config.lock()
    return config


# ---------------------------------------------------------------------------------------------
# Overrides and config files: the one way every command, sweep and study changes a config
# ---------------------------------------------------------------------------------------------


class UnknownOverrideError(KeyError, ValueError):
    """An override names a key the config does not have."""

    def __str__(self) -> str:
        return str(self.args[0])


def override(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A locked copy of `config` with each dotted key ("optim.learning_rate") set to its value.

    An unknown key is an error naming the section and the closest existing field; a value of the
    wrong type is an error naming the key. Under "eval.sets" and "epoch_passes", a new name adds
    an entry with its defaults (NAMED_ENTRIES).
    """
    config = copy.deepcopy(config)
    config.lock()
    for key, value in overrides.items():
        *parents, field = key.split(".")
        node, walked = config, []
        for part in parents + [field]:
            section = ".".join(walked)
            if section in NAMED_ENTRIES and isinstance(node, ml_collections.ConfigDict) and part not in node:
                with node.unlocked():
                    node[part] = NAMED_ENTRIES[section](part)
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                options = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                where = ".".join(walked) or "the config"
                hint = difflib.get_close_matches(part, options, n=1)
                raise UnknownOverrideError(
                    f"unknown config key {key!r}: {where} has no field {part!r}"
                    + (f"; did you mean {'.'.join(walked + hint)!r}?" if hint else "")
                    + (f" (fields: {', '.join(options)})" if options else f" ({where} is not a section)")
                )
            if part != field:
                node = node[part]
            walked.append(part)
        try:
            node[field] = value
        except (TypeError, ValueError) as error:
            raise TypeError(f"cannot set {key!r} to {value!r}: {error}") from None
    config.lock()  # also the eval sets added above
    return config


def dotted(nested: Mapping[str, Any] | ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"learning_rate": 1e-4}} -> {"optim.learning_rate": 1e-4}: nested sections as the
    dotted overrides `override` takes."""
    if isinstance(nested, ml_collections.ConfigDict):
        nested = nested.to_dict()
    flat = {}
    for key, value in nested.items():
        if isinstance(value, ml_collections.ConfigDict):
            value = value.to_dict()
        # A mapping keyed by other than names (optim.epoch_learning_rates: {epoch: rate}) is one value.
        if isinstance(value, Mapping) and value and all(isinstance(name, str) for name in value):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def split_config_path(config_path: str) -> tuple[str, str | None]:
    """"configs/x.py:arg" -> ("configs/x.py", "arg"); split at the first ':' as config_flags does."""
    path, colon, arg = config_path.partition(":")
    return path, (arg if colon else None)


def load_config_file(path: str):
    """Imports a config file by path (config files are code the user wrote, never data)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    name = "bclip_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
