"""The study runner: poisoned pretraining per objective, a cleaning sweep per pretrained model, and
the report — from one study config.

  python -m bclip.experiment --config configs/study_synthetic.py --workdir runs/study

Layout of the workdir: world/ (the embedded synthetic data, when the study uses it),
pretrain/NAME/, clean/NAME/METHOD/lr=LR/, and summary.json, report.md, report.png. Every run
directory with a done.json is finished and is not redone when the command runs again. The workdir
may be on GCS (gs://…) when the study reads no synthetic world, which is written locally.
"""

import json
import math
import os
import time
from typing import Callable

import ml_collections
from absl import logging
from etils import epath

from bclip import config as run_configs
from bclip import checkpointing, report, train
from bclip.data import synthetic

TrainFn = Callable[[ml_collections.ConfigDict, str], dict]


def study_config() -> ml_collections.ConfigDict:
    """The sections a study config fills in (see configs/study_synthetic.py)."""
    config = ml_collections.ConfigDict()
    # The embedded synthetic world; when enabled, the runner writes it and points data/eval at it.
    config.world = ml_collections.ConfigDict(
        {"enabled": True, "image_size": 32, "num_train": 8000, "num_test": 480, "num_selection": 240, "seed": 0}
    )
    # A complete run config for pretraining; per-objective entries are merged into it.
    config.pretrain_base = ml_collections.ConfigDict()
    config.pretrain = ml_collections.ConfigDict()
    # Merged into the pretraining config to make a cleaning config (epochs, batch, clean subset).
    config.clean_base = ml_collections.ConfigDict()
    config.cleaning_methods = ml_collections.ConfigDict()
    config.cleaning_learning_rates = (1e-4,)
    return config


def merge(config: ml_collections.ConfigDict, partial) -> ml_collections.ConfigDict:
    """A copy of the locked run `config` with the nested `partial` merged in; unknown keys fail."""
    merged = ml_collections.ConfigDict(config.to_dict())
    _merge_into(merged, partial.to_dict() if isinstance(partial, ml_collections.ConfigDict) else dict(partial), "")
    merged.lock()
    return merged


def _merge_into(config, partial: dict, prefix: str) -> None:
    for key, value in partial.items():
        name = f"{prefix}{key}"
        if key not in config:
            raise KeyError(f"study config sets {name!r}, which is not a run config key")
        if isinstance(value, dict) and isinstance(config[key], ml_collections.ConfigDict):
            if key == "sets":  # eval sets are a free-form mapping of name -> eval set
                for set_name, set_value in value.items():
                    if set_name not in config[key]:
                        config[key][set_name] = run_configs.eval_set_config()
                    _merge_into(config[key][set_name], set_value, f"{name}.{set_name}.")
                continue
            _merge_into(config[key], value, name + ".")
        else:
            config[key] = value


def _join(directory: str | os.PathLike, *parts: str) -> str:
    """`directory`/parts as a string for configs and train_fn; gs://… stays remote."""
    return os.fspath(epath.Path(directory).joinpath(*parts))


def _with_world(config: ml_collections.ConfigDict, world_dir: str) -> ml_collections.ConfigDict:
    """Point a run config's data and eval sets at the synthetic world on disk."""
    return merge(
        config,
        {
            "data": {
                "train_csv": os.path.join(world_dir, "train", "train.csv"),
                "tokenizer": {"kind": "word", "path": os.path.join(world_dir, synthetic.VOCAB_FILE)},
                "synonyms": os.path.join(world_dir, synthetic.SYNONYMS_FILE),
            },
            "eval": {
                "sets": {
                    "test": {"kind": "folder", "path": os.path.join(world_dir, "test")},
                    "selection": {"kind": "folder", "path": os.path.join(world_dir, "selection")},
                },
                "selection_set": "selection",
            },
        },
    )


def prepare_world(world: ml_collections.ConfigDict, workdir: str) -> str:
    """Write the synthetic world (skipped when already complete); returns its directory."""
    if "://" in os.fspath(workdir):
        raise ValueError(f"the synthetic world is written to local disk; {workdir} is remote (use world.enabled=False)")
    world_dir = os.path.join(workdir, "world")
    synthetic.write_world(
        world_dir,
        image_size=world.image_size,
        num_train=world.num_train,
        num_test=world.num_test,
        num_selection=world.num_selection,
        seed=world.seed,
    )
    return world_dir


def run_once(train_fn: TrainFn, config: ml_collections.ConfigDict, run_dir: str) -> bool:
    """Run unless `run_dir` already holds a finished run; True when it ran now."""
    if (epath.Path(run_dir) / train.DONE_FILE).exists():
        logging.info("Already finished: %s", run_dir)
        return False
    start = time.perf_counter()
    train_fn(config, run_dir)
    logging.info("Finished %s in %.1f s", run_dir, time.perf_counter() - start)
    return True


def read_evals(run_dir: str) -> list[dict]:
    text = (epath.Path(run_dir) / train.EVALS_FILE).read_text()
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def _original_figures(run_dir: str) -> dict:
    last = read_evals(run_dir)[-1]
    return {
        "test_top1": last["test/top1"],
        "test_asr": last["test/asr"],
        "selection_top1": last.get("selection/top1", math.nan),
        "selection_asr": last.get("selection/asr", math.nan),
    }


def pretrain_configs(study: ml_collections.ConfigDict, world_dir: str | None) -> dict[str, ml_collections.ConfigDict]:
    base = study.pretrain_base
    if world_dir is not None:
        base = _with_world(base, world_dir)
    return {name: merge(base, entry) for name, entry in study.pretrain.items()}


def clean_config(study, pretrain_config, pretrain_dir: str, method: str, learning_rate: float) -> ml_collections.ConfigDict:
    config = merge(pretrain_config, study.clean_base)
    config = merge(config, study.cleaning_methods[method])
    return merge(
        config,
        {
            "optim": {"learning_rate": float(learning_rate)},
            "train": {
                "init_from": pretrain_dir,
                "exclude_indices_file": _join(pretrain_dir, train.POISON_FILE),
            },
            # The cleaning set is clean; the trigger stays configured so ASR can be measured.
            "poison": {"count": 0, "rate": None},
        },
    )


def clean_run_dir(workdir: str, pretrained: str, method: str, learning_rate: float) -> str:
    return _join(workdir, "clean", pretrained, method, f"lr={learning_rate:g}")


def run_study(study: ml_collections.ConfigDict, workdir: str, train_fn: TrainFn = train.train_and_evaluate) -> dict:
    """Run every step not yet finished, then write the report; returns the summary."""
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    world_dir = prepare_world(study.world, workdir) if study.world.enabled else None
    pretrain = pretrain_configs(study, world_dir)
    originals, points = {}, {}
    for name, config in pretrain.items():
        pretrain_dir = _join(workdir, "pretrain", name)
        run_once(train_fn, config, pretrain_dir)
        originals[name] = _original_figures(pretrain_dir)
        points[name] = []
        for method in study.cleaning_methods:
            for lr in study.cleaning_learning_rates:
                run_dir = clean_run_dir(workdir, name, method, lr)
                run_once(train_fn, clean_config(study, config, pretrain_dir, method, lr), run_dir)
                run = os.fspath(epath.Path(run_dir).relative_to(epath.Path(workdir)))
                points[name] += report.points_from_evals(read_evals(run_dir), method, run, lr)
    return report.write_report(workdir, originals, points)


def headline(summary: dict) -> list[str]:
    """A few lines a person reads at the end of the run."""
    lines = []
    for model, entry in summary.items():
        original = entry["original"]
        lines.append(f"{model}: pretrained top-1 {100 * original['test_top1']:.1f}%, ASR {100 * original['test_asr']:.1f}%")
        for method, s in entry["methods"].items():
            within = s["lowest_asr_within"]["2pt"]
            best = s["best_top1_with_asr_at_most_5pct"]
            within_text = f"{100 * within['asr']:.1f}% (top-1 {100 * within['top1']:.1f}%)" if within else "no point"
            best_text = f"{100 * best['top1']:.1f}%" if best else "no point"
            lines.append(f"  {method}: lowest ASR keeping top-1 within 2 pt: {within_text}; best top-1 with ASR <= 5%: {best_text}")
    return lines


def main(argv):
    del argv
    from absl import flags

    study = flags.FLAGS.config
    workdir = flags.FLAGS.workdir
    start = time.perf_counter()
    summary = run_study(study, workdir)
    print("\n".join(headline(summary)))
    print(f"Report: {checkpointing.absolute(workdir) / 'report.md'} (and report.png, summary.json)")
    print(f"Study time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a study config file.")
    flags.DEFINE_string("workdir", None, "Directory for the study's runs and report.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
