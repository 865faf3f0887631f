"""The study runner: the smoke study end to end (pretraining per objective, cleaning, report), a
second invocation that finds everything done, and config merging that rejects unknown keys."""

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from bclip import config as run_configs
from bclip import experiment, run_files, train
from bclip.sweep import runs as sweep_runs

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
    assert list(study.pretrain) == ["MMCL", "MMCL+SSL"]
    del study.pretrain["MMCL"]  # one model is enough to follow the study through (and half the time)
    study.proportions.pretrain_epochs = 1  # one epoch, its checkpoint and evaluations: half again
    study.detectors, study.detection_k = ("dao",), 4
    workdir = str(tmp_path / "study")
    train_fn = CountingTrainFn()
    summary = experiment.run_study(study, workdir, train_fn)
    study = experiment.apply_proportions(study)

    # Each pretrained model, then its cleaning by every method at every learning rate.
    models = list(study.pretrain)
    assert models == ["MMCL+SSL"] and list(study.cleaning_methods) == ["CleanCLIP"]
    clean_runs = {
        model: [
            os.path.join(workdir, "clean", model, method, sweep_runs.run_name(experiment.cleaning_grid_entry(lr)))
            for method in study.cleaning_methods
            for lr in study.cleaning_learning_rates
        ]
        for model in models
    }
    assert train_fn.run_dirs == [
        run_dir for model in models for run_dir in [os.path.join(workdir, "pretrain", model), *clean_runs[model]]
    ]
    for run_dir in train_fn.run_dirs:
        assert os.path.exists(os.path.join(run_dir, run_files.DONE_FILE))

    # The cleaning runs start from their pretrained model and leave its poisons out.
    pretrain_dir = os.path.join(workdir, "pretrain", "MMCL+SSL")
    with open(os.path.join(clean_runs["MMCL+SSL"][0], "config.json")) as f:
        clean_config = json.load(f)
    assert clean_config["train"]["init_from"] == pretrain_dir
    assert clean_config["train"]["exclude_indices_file"] == os.path.join(pretrain_dir, run_files.POISON_FILE)
    assert clean_config["objective"]["ssl_weight"] == 1.0 and clean_config["poison"]["count"] == 0

    # The detector scored the pretrained model's pairs; the report's figures are its scores' against
    # the run's own poisons (the highest-scoring as many as there are poisons flagged).
    scores = np.load(os.path.join(workdir, "detect", "MMCL+SSL", "dao", "scores.npy"))
    with open(os.path.join(pretrain_dir, run_files.POISON_FILE)) as f:
        poisoned = np.isin(np.arange(len(scores)), json.load(f)["indices"])
    order = np.argsort(-scores, kind="stable")[: poisoned.sum()]
    detected = summary["MMCL+SSL"]["detection"]["dao"]
    assert (detected["detector"], detected["k"], detected["num_examples"]) == ("dao", 4, study.world.num_train)
    assert detected["recall"] == poisoned[order].sum() / poisoned.sum() == detected["precision"]
    pairs = [(p, c) for p in scores[poisoned] for c in scores[~poisoned]]
    assert detected["auroc"] == pytest.approx(np.mean([1.0 if p > c else 0.5 if p == c else 0.0 for p, c in pairs]))

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
        original = dict(entry["original"])
        # The retrieval and probe sets are evaluated at the end of pretraining only.
        evaluations = original.pop("evaluations")
        assert [("retrieval/retrieval_asr" in record, "probe/lp_acc1" in record) for record in evals] == [
            (False, False)
        ] * base.train.num_epochs + [(True, True)]
        assert evaluations == {k: v for k, v in evals[-1].items() if k.startswith(("retrieval/", "probe/"))}
        assert {"retrieval/text_retrieval_recall@5", "retrieval/image_retrieval_recall@5", "probe/lp_acc1", "probe/lp_asr"} <= set(evaluations)
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
            # Every cleaning evaluation but the start's (the pretrained model's, known) has them.
            assert ["probe/lp_asr" in record for record in clean_evals] == [False] + [True] * clean_epochs
            for record in clean_evals[1:]:
                points[(os.path.relpath(run_dir, workdir), record["epoch"])] = (lr, record["test/top1"], record["test/asr"])
        chosen = method["chosen_on_selection"]
        assert points[(chosen["run"], chosen["epoch"])] == (chosen["learning_rate"], chosen["top1"], chosen["asr"])
        # Every cleaning point has the retrieval and probe figures; the chosen one's are reported,
        # and written as CLIP_benchmark files beside the pretrained model's.
        chosen_record = experiment.read_evals(os.path.join(workdir, chosen["run"]))[chosen["epoch"]]
        assert chosen["evaluations"] == {k: v for k, v in chosen_record.items() if k.startswith(("retrieval/", "probe/"))}
        benchmark_dir = os.path.join(workdir, "clip_benchmark", model.replace("+", "_"))
        with open(os.path.join(benchmark_dir, "CleanCLIP_chosen", "probe_linear_probe.json")) as f:
            lp = json.load(f)
        assert lp["task"] == "linear_probe" and lp["metrics"]["lp_acc1"] == chosen_record["probe/lp_acc1"]
        with open(os.path.join(benchmark_dir, "pretrained", "test_zeroshot_classification.json")) as f:
            assert json.load(f)["metrics"]["acc1"] == evals[-1]["test/top1"]
        with open(os.path.join(benchmark_dir, "pretrained", "retrieval_zeroshot_retrieval.json")) as f:
            assert json.load(f)["metrics"]["image_retrieval_recall@1"] == evaluations["retrieval/image_retrieval_recall@1"]
        best = method["best_top1_with_asr_at_most_5pct"]
        if best is not None:
            assert points[(best["run"], best["epoch"])] == (best["learning_rate"], best["top1"], best["asr"])

    with open(os.path.join(workdir, "report.md")) as f:
        report = f.read()
    for model in models:
        assert f"| {model} | " in report and f"## Cleaning {model}\n" in report
    assert report.count(f"| CleanCLIP | {clean_epochs * len(study.cleaning_learning_rates)} |") == len(models)
    assert f"| MMCL+SSL | dao (k 4) | {detected['auroc']:.3f} |" in report
    assert "## Retrieval and linear probe" in report and "| MMCL+SSL | CleanCLIP, chosen on selection (" in report
    with Image.open(os.path.join(workdir, "report.png")) as image:
        assert image.format == "PNG" and image.width > image.height > 100
        assert np.asarray(image.convert("L")).std() > 0

    # Run again: every run is finished, so nothing trains and the report comes out the same.
    again = CountingTrainFn()
    assert experiment.run_study(study, workdir, again) == summary
    assert again.run_dirs == []


def test_clean_config_starts_from_the_pretrained_run():
    study = experiment.apply_proportions(study_synthetic().get_config("smoke"))
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
    # The method's learning-rate grid is a sweep: one run per rate, in a folder named by it.
    base, runs = experiment.cleaning_sweep(study, pretrain, "/runs/pretrain/MMCL", "CleanCLIP", "/runs/clean/MMCL/CleanCLIP")
    assert [run.workdir for run in runs] == [
        f"/runs/clean/MMCL/CleanCLIP/{sweep_runs.run_name({'optim.learning_rate': lr})}" for lr in study.cleaning_learning_rates
    ]
    for run in runs:
        run_config = run_configs.override(base, run.overrides)
        expected = experiment.clean_config(study, pretrain, "/runs/pretrain/MMCL", "CleanCLIP", run.overrides["optim.learning_rate"])
        assert run_config.to_dict() == expected.to_dict()


def test_proportions_set_the_study_sizes():
    study = experiment.study_config()
    study.pretrain_base = run_configs.run_config("micro-vit")
    study.pretrain_base.data.batch_size = 100
    study.clean_base = {"data": {"batch_size": 50}}
    # Unset proportions leave the study as written.
    assert experiment.apply_proportions(study) is study
    study.proportions.update(
        {"num_train": 12_000, "pretrain_epochs": 6, "poison_rate": 0.004, "clean_share": 0.033,
         "clean_budget": 0.01, "width": 48, "clean_points": 4}
    )
    scaled = experiment.apply_proportions(study)
    base = scaled.pretrain_base
    assert scaled.world.num_train == 12_000 and base.train.num_epochs == 6
    assert base.poison.count == 48 and base.poison.rate is None
    assert (base.model.image.width, base.model.text.width, base.model.embed_dim) == (48, 48, 48)
    # 3.3 % of 12,000 = 396 pairs; 1 % of 72,000 pretraining pair-steps = 720 -> round(1.82) = 2 epochs.
    assert scaled.clean_base.to_dict() == {
        "train": {"subset_size": 396, "num_epochs": 2},
        "eval": {"every_epochs": 1},
        "data": {"batch_size": 50},
    }
    scale = experiment.scale_summary(scaled)
    assert scale["clean_budget"] == pytest.approx(396 * 2 / 72_000)
    assert scale["poison_rate"] == pytest.approx(0.004) and scale["clean_share"] == pytest.approx(0.033)
    # A larger budget: 15 % -> round(27.3) = 27 epochs, evaluated every ceil(27 / 4) = 7 epochs.
    study.proportions.clean_budget = 0.15
    scaled = experiment.apply_proportions(study)
    assert scaled.clean_base["train"]["num_epochs"] == 27 and scaled.clean_base["eval"]["every_epochs"] == 7
    # A clean share below one cleaning batch is raised to one batch; at least one poison.
    study.proportions.update({"clean_share": 0.001, "poison_rate": 1e-6})
    scaled = experiment.apply_proportions(study)
    assert scaled.clean_base["train"]["subset_size"] == 50 and scaled.pretrain_base.poison.count == 1


ABLATION_CONFIG = """
import ml_collections
from bclip import config as run_configs
from bclip import experiment

def get_config(arg=None):
    study = experiment.study_config()
    study.world.enabled = False
    study.pretrain_base = run_configs.run_config("micro-vit")
    study.pretrain = {"A": {}, "B": {"objective": {"ssl_weight": 1.0}}}
    study.clean_base = {"data": {"batch_size": 10}}
    study.cleaning_methods = {"CleanCLIP": {}}
    study.cleaning_learning_rates = (1e-4, 1e-3)
    study.proportions.update({"num_train": 1000, "pretrain_epochs": 2, "poison_rate": 0.01,
                              "clean_share": 0.1, "clean_budget": 0.05})
    return study

def get_sweep(arg=None):
    return [{"proportions.poison_rate": rate, "proportions.clean_budget": budget}
            for rate in (0.01, 0.02) for budget in (0.05, 0.1)]
"""


class FakeTrainFn:
    """Writes what a finished run leaves (evals.jsonl, done.json, poison_indices.json) with figures
    that are functions of its config: a pretraining run's ASR is its poison count / 20, and a
    cleaning run's ASR falls with its learning rate and epoch."""

    def __init__(self):
        self.run_dirs = []

    def __call__(self, config, run_dir):
        self.run_dirs.append(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        if config.train.init_from:
            records = [{"step": 0, "epoch": 0, "test/top1": 0.5, "test/asr": 0.9}]
            for epoch in range(1, config.train.num_epochs + 1):
                asr = max(0.0, 0.9 - config.optim.learning_rate * 100 * epoch)
                records.append({"step": epoch, "epoch": epoch, "test/top1": 0.49, "test/asr": asr})
        else:
            with open(os.path.join(run_dir, run_files.POISON_FILE), "w") as f:
                json.dump([1, 2], f)
            records = [{"step": 1, "epoch": 1, "test/top1": 0.5, "test/asr": config.poison.count / 20}]
        with open(os.path.join(run_dir, run_files.EVALS_FILE), "w") as f:
            f.write("".join(json.dumps(record) + "\n" for record in records))
        with open(os.path.join(run_dir, run_files.DONE_FILE), "w") as f:
            json.dump({"steps": 1}, f)
        return records[-1]


def test_ablation_runs_one_study_per_sweep_entry_sharing_pretraining(tmp_path):
    config_path = tmp_path / "ablation.py"
    config_path.write_text(ABLATION_CONFIG)
    workdir = str(tmp_path / "ablation")
    train_fn = FakeTrainFn()
    rows = experiment.run_ablation(str(config_path), workdir, train_fn)

    pretraining = [run for run in train_fn.run_dirs if "/pretrain/" in run]
    # Two poison rates, each pretrained once per model; the cleaning budget shares them.
    assert len(pretraining) == 4 and len(set(pretraining)) == 4
    assert len(train_fn.run_dirs) == 4 + 4 * 2 * 2  # 4 points x 2 models x 2 learning rates
    assert [row["overrides"] for row in rows] == [
        {"proportions.poison_rate": r, "proportions.clean_budget": b} for r in (0.01, 0.02) for b in (0.05, 0.1)
    ]
    # 1 % and 2 % of 1,000 pairs; ASR of the fake pretraining = poisons / 20.
    assert [row["scale"]["num_poisoned"] for row in rows] == [10, 10, 20, 20]
    assert [row["models"]["A"]["asr"] for row in rows] == [0.5, 0.5, 1.0, 1.0]
    # Budget 5 % of 2,000 pair-steps on 100 pairs = 1 epoch; 10 % = 2 epochs. At lr 1e-3 the fake
    # cleaning's ASR is 0.9 - 0.1 * epoch, and its top-1 stays within 2 points.
    assert [row["models"]["B"]["cleaned_asr_within_2pt"] for row in rows] == pytest.approx([0.8, 0.7, 0.8, 0.7])
    assert [row["scale"]["clean_epochs"] for row in rows] == [1, 2, 1, 2]
    with open(os.path.join(workdir, "ablation.md")) as f:
        table = f.read()
    assert table.count("\n| ") == 1 + 4  # header and one row per point
    assert "| 3 | 0.02 | 0.1 | 20 | 10.0 % | 50.0 | 100.0 | 70.0 (49.0) |" in table
    with open(os.path.join(workdir, "ablation.json")) as f:
        assert json.load(f)["rows"] == rows

    # Run again: everything is finished, and the same figures come back.
    again = FakeTrainFn()
    rerun = experiment.run_ablation(str(config_path), workdir, again)
    assert again.run_dirs == []
    assert [(row["models"], row["scale"]) for row in rerun] == [(row["models"], row["scale"]) for row in rows]
