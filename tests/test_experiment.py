"""The study runner: the smoke study end to end (pretraining per objective, cleaning, report), a
second invocation that finds everything done, and config merging that rejects unknown keys."""

import importlib.util
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from bclip import config as run_configs
from bclip import experiment, train

CONFIG_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "study_synthetic.py")


def study_synthetic():
    """configs/study_synthetic.py, loaded by path as ml_collections' config flags do."""
    spec = importlib.util.spec_from_file_location("configs_study_synthetic", CONFIG_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CountingTrainFn:
    def __init__(self):
        self.run_dirs = []

    def __call__(self, config, run_dir):
        self.run_dirs.append(run_dir)
        return train.train_and_evaluate(config, run_dir)


@pytest.mark.slow
def test_smoke_study_end_to_end_and_resumable(tmp_path):
    study = study_synthetic().get_config("smoke")
    workdir = str(tmp_path / "study")
    train_fn = CountingTrainFn()
    summary = experiment.run_study(study, workdir, train_fn)

    # Each pretrained model, then its cleaning by every method at every learning rate.
    models = list(study.pretrain)
    assert models == ["MMCL", "MMCL+SSL"] and list(study.cleaning_methods) == ["CleanCLIP"]
    clean_runs = {
        model: [
            experiment.clean_run_dir(workdir, model, method, lr)
            for method in study.cleaning_methods
            for lr in study.cleaning_learning_rates
        ]
        for model in models
    }
    assert train_fn.run_dirs == [
        run_dir for model in models for run_dir in [os.path.join(workdir, "pretrain", model), *clean_runs[model]]
    ]
    for run_dir in train_fn.run_dirs:
        assert os.path.exists(os.path.join(run_dir, train.DONE_FILE))

    # The cleaning runs start from their pretrained model and leave its poisons out.
    pretrain_dir = os.path.join(workdir, "pretrain", "MMCL+SSL")
    with open(os.path.join(clean_runs["MMCL+SSL"][0], "config.json")) as f:
        clean_config = json.load(f)
    assert clean_config["train"]["init_from"] == pretrain_dir
    assert clean_config["train"]["exclude_indices_file"] == os.path.join(pretrain_dir, train.POISON_FILE)
    assert clean_config["objective"]["ssl_weight"] == 1.0 and clean_config["poison"]["count"] == 0

    base = study.pretrain_base
    assert base.eval.every_epochs == 1 and base.eval.at_start
    steps_per_epoch = study.world.num_train // base.data.batch_size
    clean_epochs = study.clean_base["train"]["num_epochs"]
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f) == summary
    assert list(summary) == models
    for model, entry in summary.items():
        evals = experiment.read_evals(os.path.join(workdir, "pretrain", model))
        assert [record["step"] for record in evals] == [epoch * steps_per_epoch for epoch in range(base.train.num_epochs + 1)]
        original = entry["original"]
        assert original == {
            "test_top1": evals[-1]["test/top1"],
            "test_asr": evals[-1]["test/asr"],
            "selection_top1": evals[-1]["selection/top1"],
            "selection_asr": evals[-1]["selection/asr"],
        }
        assert all(0.0 <= value <= 1.0 for value in original.values())
        assert list(entry["methods"]) == ["CleanCLIP"]
        method = entry["methods"]["CleanCLIP"]
        # One point per cleaning epoch and learning rate; the epoch-0 evaluation is the original.
        assert method["num_points"] == clean_epochs * len(study.cleaning_learning_rates)
        assert set(method["lowest_asr_within"]) == {"1pt", "2pt", "5pt"}
        points = {}
        for run_dir, lr in zip(clean_runs[model], study.cleaning_learning_rates):
            clean_evals = experiment.read_evals(run_dir)
            assert [record["epoch"] for record in clean_evals] == list(range(clean_epochs + 1))
            for record in clean_evals[1:]:
                points[(os.path.relpath(run_dir, workdir), record["epoch"])] = (lr, record["test/top1"], record["test/asr"])
        chosen = method["chosen_on_selection"]
        assert points[(chosen["run"], chosen["epoch"])] == (chosen["learning_rate"], chosen["top1"], chosen["asr"])
        best = method["best_top1_with_asr_at_most_5pct"]
        if best is not None:
            assert points[(best["run"], best["epoch"])] == (best["learning_rate"], best["top1"], best["asr"])

    with open(os.path.join(workdir, "report.md")) as f:
        report = f.read()
    for model in models:
        assert f"| {model} | " in report and f"## Cleaning {model}\n" in report
    assert report.count(f"| CleanCLIP | {clean_epochs * len(study.cleaning_learning_rates)} |") == len(models)
    with Image.open(os.path.join(workdir, "report.png")) as image:
        assert image.format == "PNG" and image.width > image.height > 100
        assert np.asarray(image.convert("L")).std() > 0

    # Run again: every run is finished, so nothing trains and the report comes out the same.
    again = CountingTrainFn()
    assert experiment.run_study(study, workdir, again) == summary
    assert again.run_dirs == []


def test_merge_rejects_unknown_keys():
    config = run_configs.run_config("micro-vit")
    with pytest.raises(KeyError, match=r"'optim\.learning_rat'"):
        experiment.merge(config, {"optim": {"learning_rat": 1e-3}})
    with pytest.raises(KeyError, match=r"'optimiser'"):
        experiment.merge(config, {"optimiser": {"learning_rate": 1e-3}})
    with pytest.raises(KeyError, match=r"'model\.text\.widht'"):
        experiment.merge(config, ml_collections.ConfigDict({"model": {"text": {"widht": 64}}}))
    # Eval sets take any name, but each set only the keys an eval set has.
    with pytest.raises(KeyError, match=r"'eval\.sets\.selection\.pth'"):
        experiment.merge(config, {"eval": {"sets": {"selection": {"kind": "folder", "pth": "/data"}}}})


def test_merge_returns_a_locked_copy():
    config = run_configs.run_config("micro-vit")
    merged = experiment.merge(
        config,
        {
            "optim": {"learning_rate": 5e-4},
            "model": {"text": {"width": 64}},
            "eval": {"sets": {"selection": {"kind": "folder", "path": "/data/selection"}}},
        },
    )
    assert (merged.optim.learning_rate, merged.model.text.width) == (5e-4, 64)
    assert merged.optim.warmup_steps == config.optim.warmup_steps
    assert (config.optim.learning_rate, config.model.text.width) == (1e-3, 32)  # the original is untouched
    # Eval sets are a free-form mapping: a new set gets every eval set key.
    assert set(merged.eval.sets) == {"test", "selection"}
    assert merged.eval.sets.selection.to_dict() == run_configs.eval_set_config("folder", "/data/selection").to_dict()
    for sub_config in (merged, merged.optim, merged.eval.sets, merged.eval.sets.selection):
        with pytest.raises(AttributeError):
            sub_config.learning_rat = 1.0
    # Setting one key of an existing set keeps its others.
    tfds = experiment.merge(merged, {"eval": {"sets": {"selection": {"kind": "tfds"}}}})
    assert (tfds.eval.sets.selection.kind, tfds.eval.sets.selection.path) == ("tfds", "/data/selection")


def test_clean_config_starts_from_the_pretrained_run():
    study = study_synthetic().get_config("smoke")
    pretrain = experiment.pretrain_configs(study, "/world")["MMCL"]
    config = experiment.clean_config(study, pretrain, "/runs/pretrain/MMCL", "CleanCLIP", 2e-3)
    assert config.train.init_from == "/runs/pretrain/MMCL"
    assert config.train.exclude_indices_file == "/runs/pretrain/MMCL/poison_indices.json"
    assert config.train.num_epochs == study.clean_base["train"]["num_epochs"]
    assert config.train.subset_size == study.clean_base["train"]["subset_size"] > 0
    assert (config.objective.mmcl_weight, config.objective.ssl_weight) == (1.0, 1.0)
    assert config.optim.learning_rate == 2e-3
    assert config.poison.count == 0 and config.poison.rate is None
    assert pretrain.poison.count > 0 and pretrain.objective.ssl_weight == 0.0
    # The trigger and target stay those of pretraining, so ASR measures the same backdoor.
    assert config.poison.trigger.to_dict() == pretrain.poison.trigger.to_dict()
    assert config.poison.target_label == pretrain.poison.target_label == "banana"
    assert config.data.train_csv == "/world/train/train.csv"
    assert experiment.clean_run_dir("/runs", "MMCL", "CleanCLIP", 2e-3) == "/runs/clean/MMCL/CleanCLIP/lr=0.002"
