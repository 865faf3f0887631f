"""The study runner: poisoned pretraining per objective, a cleaning sweep per pretrained model, and
the report — from one study config.

  python -m bclip.experiment --config configs/study_synthetic.py --workdir runs/study

Layout of the workdir: world/ (the embedded synthetic data, when the study uses it),
pretrain/NAME/, clean/NAME/METHOD/lr=LR/, defended/NAME/DEFENCE/ (pretraining-time defences),
detect/NAME/DETECTOR/, and summary.json, report.md, report.png. A study with attacks (study.attacks)
runs all of that once per attack under ATTACK/, sharing world/, and writes the attacks x defences
report (study_report.write_zoo_report) beside them. Every run directory with a done.json is finished
and is not redone when the command runs again. The workdir may be on GCS (gs://…) when the study
reads no synthetic world, which is written locally.
"""

import json
import math
import os
import time
from typing import Callable

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from bclip import config as run_configs
from bclip import checkpointing, clip_benchmark, detect, run_files, study_report, train
from bclip.sweep import execute as sweep_execute
from bclip.sweep import runs as sweep_runs
from bclip.data import triggers
from bclip.data.synthetic import eval_sets, writer

TrainFn = Callable[[ml_collections.ConfigDict, str], dict]


def study_config() -> ml_collections.ConfigDict:
    """The sections a study config fills in (see configs/study_synthetic.py)."""
    config = ml_collections.ConfigDict()
    # The embedded synthetic world; when enabled, the runner writes it and points data/eval at it.
    config.world = ml_collections.ConfigDict(
        {
            "enabled": True, "image_size": 32, "num_train": 8000, "num_test": 480, "num_selection": 240, "seed": 0,
            # The retrieval and linear-probe sets (bclip.data.synthetic.eval_sets), evaluated at the
            # end of pretraining and at every cleaning evaluation; 0 images: not written, not evaluated.
            "num_retrieval": 0, "captions_per_image": 5, "num_probe_train": 0,
        }
    )
    # A complete run config for pretraining; per-objective entries are merged into it.
    config.pretrain_base = ml_collections.ConfigDict()
    config.pretrain = ml_collections.ConfigDict()
    # Merged into the pretraining config to make a cleaning config (epochs, batch, clean subset).
    config.clean_base = ml_collections.ConfigDict()
    config.cleaning_methods = ml_collections.ConfigDict()
    config.cleaning_learning_rates = (1e-4,)
    # Pretraining-time defences (entries made by `pretrain_defence`): a retrain of some of the
    # pretraining entries, reported beside the cleaning methods with every evaluated epoch a point
    # (and the undefended runs' own epochs as the defence "none"). Empty: not run, not reported.
    config.pretrain_defences = ml_collections.ConfigDict()
    # Attacks (entries made by `attack`): poison settings applied to pretrain_base, the whole study
    # run once per attack under workdir/ATTACK. Empty: the one attack pretrain_base configures, with
    # the runs directly under workdir.
    config.attacks = ml_collections.ConfigDict()
    # Train each method's learning-rate grid as one group (one program, one input stream) where
    # its runs can share one; their results equal separate runs' (bclip.run_group).
    config.vectorise_cleaning = True
    # Poisoned-pair detectors (bclip.detection.DETECTORS) run on each pretrained model's own
    # embeddings of its training pairs; their AUROC, precision and recall go in the report.
    config.detectors = ()
    config.detection_k = 16
    # The study's scale as proportions of its training set (see `apply_proportions`); num_train 0
    # leaves the sections above as they are.
    config.proportions = ml_collections.ConfigDict(
        {
            "num_train": 0,  # training pairs (the world's size)
            "pretrain_epochs": 1,
            "poison_rate": 0.0,  # poisoned share of the training pairs
            "clean_share": 0.0,  # the cleaning set's share of the training pairs
            "clean_budget": 0.0,  # cleaning pair-steps per pretraining pair-step
            "width": 0,  # both towers' width and the embedding size; 0 keeps the model's
            "clean_points": 4,  # evaluations per cleaning run at most (each one a report point)
        }
    )
    return config


def apply_proportions(study: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `study` whose world, pretraining and cleaning sizes follow `study.proportions`.

    For N = num_train pairs pretrained for E epochs (N·E pretraining pair-steps):
      - poisoned pairs: round(poison_rate · N), at least 1;
      - cleaning set: round(clean_share · N) pairs, at least one cleaning batch;
      - cleaning epochs: round(clean_budget · N · E / cleaning set), at least 1, so that cleaning
        reads about clean_budget of pretraining's pair-steps;
      - cleaning evaluations every ceil(cleaning epochs / clean_points) epochs (and at the end);
      - width w > 0: image and text towers of width w, embeddings of size w.
    Unchanged when num_train is 0.
    """
    p = study.proportions
    if not p.num_train:
        return study
    study = ml_collections.ConfigDict(study.to_dict())
    base = study.pretrain_base
    num_train = int(p.num_train)
    study.world.num_train = num_train
    base.train.num_epochs = int(p.pretrain_epochs)
    base.poison.count = max(1, round(p.poison_rate * num_train)) if p.poison_rate > 0 else 0
    base.poison.rate = None
    if p.width:
        base.model.image.width = base.model.text.width = base.model.embed_dim = int(p.width)
    clean_batch = study.clean_base.get("data", {}).get("batch_size", base.data.batch_size)
    clean_pairs = max(clean_batch, round(p.clean_share * num_train))
    clean_epochs = max(1, round(p.clean_budget * num_train * p.pretrain_epochs / clean_pairs))
    clean_base = study.clean_base.to_dict()
    clean_base.setdefault("train", {}).update({"subset_size": clean_pairs, "num_epochs": clean_epochs})
    clean_base.setdefault("eval", {})["every_epochs"] = max(1, math.ceil(clean_epochs / max(1, p.clean_points)))
    study.clean_base = clean_base
    study.lock()
    return study


def scale_summary(study: ml_collections.ConfigDict) -> dict:
    """The sizes a study runs at and their ratios, as the paper's proportions are stated."""
    base, clean = study.pretrain_base, study.clean_base
    num_train = study.proportions.num_train or (study.world.num_train if study.world.enabled else None)
    clean_train = clean.get("train", {})
    clean_pairs = clean_train.get("subset_size") or None  # 0: every pair
    clean_epochs = clean_train.get("num_epochs", base.train.num_epochs)
    figures = {
        "num_train": num_train,
        "pretrain_epochs": base.train.num_epochs,
        "pretrain_batch_size": base.data.batch_size,
        "num_poisoned": base.poison.count,
        "clean_pairs": clean_pairs,
        "clean_epochs": clean_epochs,
        "clean_batch_size": clean.get("data", {}).get("batch_size", base.data.batch_size),
        "cleaning_learning_rates": list(study.cleaning_learning_rates),
        "pretrain_learning_rate": base.optim.learning_rate,
    }
    if num_train and clean_pairs:
        figures["poison_rate"] = base.poison.count / num_train
        figures["clean_share"] = clean_pairs / num_train
        figures["clean_budget"] = clean_pairs * clean_epochs / (num_train * base.train.num_epochs)
    return figures


def _join(directory: str | os.PathLike, *parts: str) -> str:
    """`directory`/parts as a string for configs and train_fn; gs://… stays remote."""
    return os.fspath(epath.Path(directory).joinpath(*parts))


# The eval sets of the world's retrieval and probe sets (when written): name -> evaluator.
EXTRA_EVAL_SETS = {"retrieval": "retrieval", "probe": "linear_probe"}


def _with_world(config: ml_collections.ConfigDict, world_dir: str, world: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Point a run config's data and eval sets at the synthetic world on disk. The retrieval and
    probe sets, when the world has them, are evaluated at the end of pretraining only (and, in
    cleaning, as often as the rest: `clean_config`), never before the first step (a pretraining
    run's random model; a cleaning run's start is the pretrained model, evaluated already); the
    probe is tested on the test split."""
    extra = {}
    if world.num_retrieval:
        extra["retrieval"] = {
            "evaluator": EXTRA_EVAL_SETS["retrieval"],
            "path": os.path.join(world_dir, eval_sets.RETRIEVAL_DIR, eval_sets.RETRIEVAL_FILE),
            "split": "test",
            "every_epochs": config.train.num_epochs,
            "at_start": False,
        }
    if world.num_probe_train:
        extra["probe"] = {
            "evaluator": EXTRA_EVAL_SETS["probe"],
            "path": os.path.join(world_dir, "test"),
            "train_path": os.path.join(world_dir, eval_sets.PROBE_TRAIN_DIR),
            "every_epochs": config.train.num_epochs,
            "at_start": False,
        }
    return run_configs.override(
        config,
        run_configs.dotted({
            "data": {
                "train_csv": os.path.join(world_dir, "train", "train.csv"),
                "tokenizer": {"kind": "word", "path": os.path.join(world_dir, writer.VOCAB_FILE)},
                "synonyms": os.path.join(world_dir, writer.SYNONYMS_FILE),
            },
            "eval": {
                "sets": {
                    "test": {"kind": "folder", "path": os.path.join(world_dir, "test")},
                    "selection": {"kind": "folder", "path": os.path.join(world_dir, "selection")},
                    **extra,
                },
                "selection_set": "selection",
            },
        }),
    )


def prepare_world(world: ml_collections.ConfigDict, workdir: str) -> str:
    """Write the synthetic world (skipped when already complete); returns its directory."""
    if "://" in os.fspath(workdir):
        raise ValueError(f"the synthetic world is written to local disk; {workdir} is remote (use world.enabled=False)")
    world_dir = os.path.join(workdir, "world")
    writer.write_world(
        world_dir,
        image_size=world.image_size,
        num_train=world.num_train,
        num_test=world.num_test,
        num_selection=world.num_selection,
        seed=world.seed,
    )
    if world.num_retrieval or world.num_probe_train:
        eval_sets.write_eval_sets(
            world_dir,
            seed=world.seed,
            image_size=world.image_size,
            num_retrieval=max(1, world.num_retrieval),
            captions_per_image=world.captions_per_image,
            num_probe_train=max(1, world.num_probe_train),
        )
    return world_dir


def run_once(train_fn: TrainFn, config: ml_collections.ConfigDict, run_dir: str) -> bool:
    """Run unless `run_dir` already holds a finished run; True when it ran now."""
    if (epath.Path(run_dir) / run_files.DONE_FILE).exists():
        logging.info("Already finished: %s", run_dir)
        return False
    start = time.perf_counter()
    train_fn(config, run_dir)
    logging.info("Finished %s in %.1f s", run_dir, time.perf_counter() - start)
    return True


def detect_once(run_dir: str, out_dir: str, detector: str, k: int) -> dict:
    """bclip.detect's metrics for a pretrained run, computed unless `out_dir` already holds them."""
    done = epath.Path(out_dir) / detect.DETECTION_FILE
    if not done.exists():
        detect.detect_run(run_dir, out_dir, detector, k)
    return json.loads(done.read_text())


def read_evals(run_dir: str) -> list[dict]:
    text = (epath.Path(run_dir) / run_files.EVALS_FILE).read_text()
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def _original_figures(run_dir: str) -> dict:
    last = read_evals(run_dir)[-1]
    figures = {
        "test_top1": last["test/top1"],
        "test_asr": last["test/asr"],
        "selection_top1": last.get("selection/top1", math.nan),
        "selection_asr": last.get("selection/asr", math.nan),
    }
    extra = study_report.extra_figures(last, EXTRA_EVAL_SETS)
    return {**figures, "evaluations": extra} if extra else figures


def pretrain_configs(study: ml_collections.ConfigDict, world_dir: str | None) -> dict[str, ml_collections.ConfigDict]:
    base = study.pretrain_base
    if world_dir is not None:
        base = _with_world(base, world_dir, study.world)
    return {name: run_configs.override(base, run_configs.dotted(entry)) for name, entry in study.pretrain.items()}


def clean_config(study, pretrain_config, pretrain_dir: str, method: str, learning_rate: float) -> ml_collections.ConfigDict:
    """The cleaning run of `pretrain_dir` by `method` at `learning_rate`: the pretraining config
    with the study's clean_base, the method's entry and these overrides, in that order."""
    return run_configs.override(pretrain_config, {
        **run_configs.dotted(study.clean_base),
        **run_configs.dotted(study.cleaning_methods[method]),
        **cleaning_grid_entry(learning_rate),
        "train.init_from": pretrain_dir,
        "train.exclude_indices_file": _join(pretrain_dir, run_files.POISON_FILE),
        # The cleaning set is clean; the trigger stays configured so ASR can be measured.
        "poison.count": 0,
        "poison.rate": None,
        # The world's retrieval and probe sets: at every cleaning evaluation, so every point has them.
        **{f"eval.sets.{name}.every_epochs": 0 for name in EXTRA_EVAL_SETS if name in pretrain_config.eval.sets},
    })


def cleaning_grid_entry(learning_rate: float) -> dict:
    """A cleaning sweep's entry: the dotted overrides of one point of the learning-rate grid."""
    return {"optim.learning_rate": float(learning_rate)}


def cleaning_sweep(study, pretrain_config, pretrain_dir: str, method: str, root: str):
    """A method's learning-rate grid as a sweep under `root`: (base config, runs)."""
    runs = sweep_runs.expand_sweep(root, [cleaning_grid_entry(lr) for lr in study.cleaning_learning_rates])
    return clean_config(study, pretrain_config, pretrain_dir, method, study.cleaning_learning_rates[0]), runs


# ---------------------------------------------------------------------------------------------
# Attacks and pretraining-time defences
# ---------------------------------------------------------------------------------------------

UNDEFENDED = "none"  # the defence name of the undefended runs' own epochs
DROP_FILE = "dropped_{share:g}.json"  # in a detector's folder: the pairs a detect-drop-retrain leaves out


def attack(trigger: ml_collections.ConfigDict | dict | None = None, **poison) -> dict:
    """A study.attacks entry: the trigger section (whole, as triggers.default_trigger_config makes
    it; None keeps pretrain_base's) and other poison-section settings (e.g. target_label)."""
    entry = {"poison": dict(poison)}
    if trigger is not None:
        entry["trigger"] = dict(trigger.to_dict() if isinstance(trigger, ml_collections.ConfigDict) else trigger)
    return entry


def _plain(entry) -> dict:
    return entry.to_dict() if isinstance(entry, ml_collections.ConfigDict) else dict(entry or {})


def with_attack(config: ml_collections.ConfigDict, name: str, entry) -> ml_collections.ConfigDict:
    """`config` poisoned by attack `name` (an `attack` entry). The trigger section is replaced
    whole, since each trigger has its own options; an option the trigger lacks is an error."""
    poison = _plain(entry.get("poison"))
    config = run_configs.override(config, run_configs.dotted({"poison": poison}) if poison else {})
    trigger = _plain(entry.get("trigger"))
    if not trigger:
        return config
    if trigger.get("name") not in triggers.TRIGGERS:
        raise ValueError(f"attack {name!r}: unknown trigger {trigger.get('name')!r}; known: {sorted(triggers.TRIGGERS)}")
    section = triggers.default_trigger_config(trigger["name"])
    unknown = sorted(set(trigger) - set(section))
    if unknown:
        raise ValueError(f"attack {name!r}: trigger {trigger['name']!r} has no options {unknown}; it takes {sorted(section)}")
    section.update(trigger)
    with config.unlocked():
        config.poison.trigger = section
    return config


def attack_study(study: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The study of one attack: `study` without attacks, its pretrain_base poisoned by `name`."""
    single = ml_collections.ConfigDict(study.to_dict())
    single.attacks = {}
    single.pretrain_base = with_attack(study.pretrain_base, name, study.attacks[name])
    single.lock()
    return single


def pretrain_defence(objectives, overrides=None, *, drop_detector: str = "", drop_share: float = 0.0) -> dict:
    """A study.pretrain_defences entry: a retrain of each pretraining entry named in `objectives`
    with `overrides` (nested run-config sections, e.g. an objective and a per-epoch pass) merged in
    and, with a drop_detector (bclip.detection.DETECTORS), without the `drop_share` of the training
    pairs that detector scores highest on the undefended model: detect, drop, retrain."""
    return {"objectives": tuple(objectives), "overrides": dict(overrides or {}), "drop_detector": drop_detector,
            "drop_share": float(drop_share)}


def check_defences(study: ml_collections.ConfigDict) -> None:
    """ValueError naming the entry when a defence names no pretraining entry, clashes with a
    cleaning method's name, or drops no pairs."""
    for name, entry in study.pretrain_defences.items():
        if name == UNDEFENDED or name in study.cleaning_methods:
            raise ValueError(f"pretrain_defences.{name}: the name is taken (by the undefended runs or a cleaning method)")
        missing = sorted(set(entry.objectives) - set(study.pretrain))
        if missing or not entry.objectives:
            raise ValueError(f"pretrain_defences.{name}.objectives names {missing or 'nothing'}; pretraining entries: {sorted(study.pretrain)}")
        if entry.drop_detector and not 0.0 < entry.drop_share < 1.0:
            raise ValueError(f"pretrain_defences.{name}.drop_share must be in (0, 1) with a drop_detector, got {entry.drop_share}")


def drop_flagged(detect_dir: str, share: float) -> str:
    """Writes the `share` of the scored training pairs with the highest scores in detect_dir's
    scores.npy (ties to the lower index) as a JSON list for train.exclude_indices_file; its path."""
    with (epath.Path(detect_dir) / detect.SCORES_FILE).open("rb") as f:
        scores = np.load(f, allow_pickle=False)
    scored = np.flatnonzero(~np.isnan(scores))  # NaN: a record training drops
    count = round(share * len(scored))
    dropped = scored[np.argsort(-scores[scored], kind="stable")[:count]]
    path = epath.Path(detect_dir) / DROP_FILE.format(share=share)
    run_files.write_json(path, sorted(int(i) for i in dropped))
    return os.fspath(path)


def defended_config(study, pretrain_config, defence: str, drop_file: str = "") -> ml_collections.ConfigDict:
    """The pretraining run of `defence` on an entry's config: its overrides, and its drop list."""
    entry = study.pretrain_defences[defence]
    overrides = run_configs.dotted(entry.overrides)
    if entry.drop_detector:
        overrides["train.exclude_indices_file"] = drop_file
    return run_configs.override(pretrain_config, overrides)


def defence_stages(study: ml_collections.ConfigDict) -> dict[str, str]:
    """Each reported defence's stage: "pretraining" (its points are a pretraining run's epochs) or
    "post-hoc" (a cleaning method of the undefended model)."""
    stages = {UNDEFENDED: "pretraining"} if study.pretrain_defences else {}
    stages.update({name: "pretraining" for name in study.pretrain_defences})
    stages.update({name: "post-hoc" for name in study.cleaning_methods})
    return stages


def _run_points(run_dir: str, workdir: str, method: str, learning_rate: float) -> list:
    """A run's evaluated epochs (all but the step-0 one) as report points of `method`."""
    relative = os.fspath(epath.Path(run_dir).relative_to(epath.Path(workdir)))
    return study_report.points_from_evals(read_evals(run_dir), method, relative, learning_rate, extra_sets=tuple(EXTRA_EVAL_SETS))


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------


def run_study(
    study: ml_collections.ConfigDict,
    workdir: str,
    train_fn: TrainFn | None = None,
    *,
    pretrain_root: str | None = None,
    world_root: str | None = None,
) -> dict:
    """Run every step not yet finished, then write the report; returns the summary.

    Each method's cleaning grid is a sweep (bclip.sweep), trained as one group where its runs can
    share a program and study.vectorise_cleaning is set. train_fn: trains one run (config,
    workdir), default bclip.train.train_and_evaluate; given, every run goes through it alone.
    pretrain_root, world_root: where the pretraining runs and the synthetic world live (default:
    under `workdir`); studies that differ only in their cleaning share them (an ablation).
    With study.attacks, the summary is the attacks x defences one (`run_zoo`).
    """
    study = apply_proportions(study)
    check_defences(study)
    if study.attacks:
        if pretrain_root is not None:
            raise ValueError("a study with attacks keeps its pretraining runs under each attack; pretrain_root must be None")
        return run_zoo(study, workdir, train_fn, world_root=world_root)
    summary, _, _ = _run_one_attack(study, workdir, train_fn, pretrain_root=pretrain_root, world_root=world_root)
    return summary


def run_zoo(study: ml_collections.ConfigDict, workdir: str, train_fn: TrainFn | None = None, *, world_root: str | None = None) -> dict:
    """Every attack's study under workdir/ATTACK (one synthetic world for all), then the attacks x
    defences report in workdir; returns its summary (study_report.zoo_summary)."""
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / "scale.json").write_text(json.dumps(scale_summary(study), indent=2) + "\n")
    summaries, originals, points = {}, {}, {}
    for name in study.attacks:
        single = attack_study(study, name)
        summaries[name], originals[name], points[name] = _run_one_attack(
            single, _join(workdir, name), train_fn, world_root=world_root or workdir
        )
    return study_report.write_zoo_report(workdir, summaries, originals, points, defence_stages(study))


def _run_one_attack(study, workdir: str, train_fn: TrainFn | None, *, pretrain_root=None, world_root=None):
    """The study of one attack (study.attacks empty): (summary, originals, points)."""
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / "scale.json").write_text(json.dumps(scale_summary(study), indent=2) + "\n")
    world_dir = prepare_world(study.world, world_root or workdir) if study.world.enabled else None
    pretrain = pretrain_configs(study, world_dir)
    train_fn_or_default = train_fn or train.train_and_evaluate
    originals, points, detections = {}, {}, {}
    for name, config in pretrain.items():
        pretrain_dir = _join(pretrain_root or _join(workdir, "pretrain"), name)
        run_once(train_fn_or_default, config, pretrain_dir)
        originals[name] = _original_figures(pretrain_dir)
        for detector in study.detectors:
            detections.setdefault(name, {})[detector] = detect_once(
                pretrain_dir, _join(workdir, "detect", name, detector), detector, study.detection_k
            )
        points[name] = []
        if study.pretrain_defences:
            points[name] += _run_points(pretrain_dir, workdir, UNDEFENDED, config.optim.learning_rate)
        for defence, entry in study.pretrain_defences.items():
            if name not in entry.objectives:
                continue
            drop_file = ""
            if entry.drop_detector:
                detect_dir = _join(workdir, "detect", name, entry.drop_detector)
                detect_once(pretrain_dir, detect_dir, entry.drop_detector, study.detection_k)
                drop_file = drop_flagged(detect_dir, entry.drop_share)
            defended = defended_config(study, config, defence, drop_file)
            defended_dir = _join(workdir, "defended", name, defence)
            run_once(train_fn_or_default, defended, defended_dir)
            points[name] += _run_points(defended_dir, workdir, defence, defended.optim.learning_rate)
        for method in study.cleaning_methods:
            root = _join(workdir, "clean", name, method)
            base, runs = cleaning_sweep(study, config, pretrain_dir, method, root)
            failed = sweep_execute.run_unfinished(base, runs, root, vectorize=study.vectorise_cleaning, train_fn=train_fn)
            if failed:
                raise RuntimeError(f"cleaning runs of {name} by {method} failed: {', '.join(failed)} (under {root})")
            for run in runs:
                points[name] += _run_points(run.workdir, workdir, method, run.overrides["optim.learning_rate"])
    summary = study_report.write_report(workdir, originals, points, detections)
    write_benchmark_files(workdir, summary, pretrain, pretrain_root, tuple(study.cleaning_methods))
    return summary, originals, points


def write_benchmark_files(workdir: str, summary: dict, pretrain: dict, pretrain_root: str | None, methods=None) -> None:
    """The pretrained models' final evaluations, and those of the cleaning points the report picks
    (chosen on the selection split; lowest ASR within 2 points), as CLIP_benchmark result files
    under workdir/clip_benchmark/<model>/<which>/. methods: the cleaning methods (default: every
    method in the summary); the points of pretraining-time defences are other runs' configs."""
    for name, entry in summary.items():
        config = pretrain[name]
        pretrain_dir = _join(pretrain_root or _join(workdir, "pretrain"), name)
        picked = {"pretrained": (pretrain_dir, read_evals(pretrain_dir)[-1])}
        for method, method_summary in entry["methods"].items():
            if methods is not None and method not in methods:
                continue
            for which, point in (("chosen", method_summary.get("chosen_on_selection")), ("within_2pt", method_summary["lowest_asr_within"]["2pt"])):
                if point is not None:
                    run_dir = _join(workdir, point["run"])
                    record = [r for r in read_evals(run_dir) if r["epoch"] == point["epoch"] and r["step"] > 0][-1]
                    picked[f"{method}_{which}"] = (f"{run_dir}@epoch{point['epoch']}", record)
        for which, (pretrained, record) in picked.items():
            records = clip_benchmark.benchmark_records(record, config, pretrained=pretrained)
            clip_benchmark.write_records(_join(workdir, "clip_benchmark", name.replace("+", "_"), which), records)


# ---------------------------------------------------------------------------------------------
# Ablations: a study config with get_sweep, one study per entry
# ---------------------------------------------------------------------------------------------

# Study keys that change only the cleaning: sweep points that differ only in these share their
# pretraining runs.
CLEANING_ONLY_KEYS = ("proportions.clean_", "clean_base.", "cleaning_")
ABLATION_FILE = "ablation"  # ROOT/ablation.md and .json


def run_ablation(config_path: str, workdir: str, train_fn: TrainFn | None = None) -> list[dict]:
    """Runs the study of `config_path` (get_config) once per entry of its get_sweep (dotted
    overrides of the study config) under workdir/points/NAME, sharing the synthetic world and the
    pretraining runs where entries allow, and writes workdir/ablation.md and .json; returns their
    rows. Finished runs are not redone."""
    base, entries = sweep_runs.load_sweep(config_path)
    rows = []
    for overrides in entries:
        study = run_configs.override(base, overrides)
        pretraining_overrides = {k: v for k, v in overrides.items() if not k.startswith(CLEANING_ONLY_KEYS)}
        point_dir = _join(workdir, "points", sweep_runs.run_name(overrides))
        start = time.perf_counter()
        summary = run_study(
            study,
            point_dir,
            train_fn,
            pretrain_root=_join(workdir, "pretrain", sweep_runs.run_name(pretraining_overrides)),
            world_root=workdir,
        )
        scale = json.loads((epath.Path(point_dir) / "scale.json").read_text())
        rows.append(ablation_row(overrides, scale, summary, time.perf_counter() - start))
        write_ablation(workdir, config_path, rows)
    return rows


def ablation_row(overrides: dict, scale: dict, summary: dict, seconds: float) -> dict:
    """One ablation point: its overrides, its sizes and, per pretrained model, the original figures
    and CleanCLIP's (the first cleaning method's) lowest test ASR keeping top-1 within 2 points."""
    models = {}
    for model, entry in summary.items():
        method = next(iter(entry["methods"].values()), None)
        within = method["lowest_asr_within"]["2pt"] if method else None
        best = method["best_top1_with_asr_at_most_5pct"] if method else None
        models[model] = {
            "top1": entry["original"]["test_top1"],
            "asr": entry["original"]["test_asr"],
            "cleaned_asr_within_2pt": within["asr"] if within else None,
            "cleaned_top1_within_2pt": within["top1"] if within else None,
            "best_top1_with_asr_at_most_5pct": best["top1"] if best else None,
        }
    return {"overrides": overrides, "scale": scale, "models": models, "seconds": round(seconds, 1)}


def _ablation_markdown(config_path: str, rows: list[dict]) -> str:
    keys = []
    for row in rows:
        keys += [key for key in row["overrides"] if key not in keys]
    models = list(rows[0]["models"]) if rows else []
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}"  # noqa: E731
    header = ["point", *keys, "poisoned", "clean budget"]
    for model in models:
        header += [f"{model} top-1", f"{model} ASR", f"{model} cleaned ASR (top-1) within 2 pt"]
    lines = [
        "# Ablation",
        "",
        f"`{config_path}`: one study per row (test split, %). 'Cleaned ASR within 2 pt' is CleanCLIP's lowest",
        "ASR over every evaluated epoch and learning rate that keeps top-1 within 2 points of the pretrained",
        "model's. The paper's contrast is a high value for MMCL+SSL beside a low one for MMCL.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for number, row in enumerate(rows):
        cells = [str(number), *[_override_cell(row["overrides"].get(key, "–")) for key in keys]]
        cells += [str(row["scale"]["num_poisoned"]), f"{100 * row['scale'].get('clean_budget', float('nan')):.1f} %"]
        for model in models:
            figures = row["models"].get(model, {})
            within = figures.get("cleaned_asr_within_2pt")
            cells += [
                pct(figures.get("top1")),
                pct(figures.get("asr")),
                "none" if within is None else f"{pct(within)} ({pct(figures['cleaned_top1_within_2pt'])})",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _override_cell(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def write_ablation(workdir: str, config_path: str, rows: list[dict]) -> None:
    root = epath.Path(workdir)
    (root / f"{ABLATION_FILE}.json").write_text(json.dumps({"config": config_path, "rows": rows}, indent=2) + "\n")
    (root / f"{ABLATION_FILE}.md").write_text(_ablation_markdown(config_path, rows))


def share_compiled_programs(workdir: str) -> None:
    """Keeps compiled XLA programs in workdir/compile_cache, so the study's runs (many of one shape:
    every cleaning run of a model) compile each program once, also across invocations. A cache the
    user configured is left alone; a remote workdir gets none."""
    import jax

    if jax.config.jax_compilation_cache_dir or "://" in os.fspath(workdir):
        return
    jax.config.update("jax_compilation_cache_dir", os.fspath(checkpointing.absolute(workdir) / "compile_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def headline(summary: dict) -> list[str]:
    """A few lines a person reads at the end of the run."""
    lines = []
    for model, entry in summary.items():
        original = entry["original"]
        lines.append(f"{model}: pretrained top-1 {100 * original['test_top1']:.1f}%, ASR {100 * original['test_asr']:.1f}%")
        lines += [_method_headline(method, s) for method, s in entry["methods"].items()]
    return lines


def _method_headline(label: str, figures: dict) -> str:
    within = figures["lowest_asr_within"]["2pt"]
    best = figures["best_top1_with_asr_at_most_5pct"]
    within_text = f"{100 * within['asr']:.1f}% (top-1 {100 * within['top1']:.1f}%)" if within else "no point"
    best_text = f"{100 * best['top1']:.1f}%" if best else "no point"
    return f"  {label}: lowest ASR keeping top-1 within 2 pt: {within_text}; best top-1 with ASR <= 5%: {best_text}"


def zoo_headline(zoo: dict) -> list[str]:
    """headline's lines for an attacks x defences summary."""
    lines = []
    for attack, models in zoo.items():
        for model, entry in models.items():
            undefended = entry["undefended"]
            lines.append(f"{attack}, {model}: undefended top-1 {100 * undefended['test_top1']:.1f}%, ASR {100 * undefended['test_asr']:.1f}%")
            lines += [_method_headline(f"{defence} ({row['stage']})", row) for defence, row in entry["defences"].items()]
    return lines


def main(argv):
    del argv
    from absl import flags
    from ml_collections import config_flags

    study = flags.FLAGS.config
    workdir = flags.FLAGS.workdir
    start = time.perf_counter()
    share_compiled_programs(workdir)
    if flags.FLAGS.sweep:
        config_path = config_flags.get_config_filename(flags.FLAGS["config"])
        run_ablation(config_path, workdir)
        print((epath.Path(workdir) / f"{ABLATION_FILE}.md").read_text())
        print(f"Ablation time: {time.perf_counter() - start:.0f} s")
        return
    summary = run_study(study, workdir)
    print("\n".join(zoo_headline(summary) if study.attacks else headline(summary)))
    print(f"Report: {checkpointing.absolute(workdir) / 'report.md'} (and report.png, summary.json)")
    print(f"Study time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a study config file.")
    flags.DEFINE_string("workdir", None, "Directory for the study's runs and report.")
    flags.DEFINE_bool("sweep", False, "Run the study once per entry of the config file's get_sweep (an ablation).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
