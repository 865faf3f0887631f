"""The study's claim as a test (configs/study_claim.py): on the smoke world, poisoned MMCL
pretraining plants a backdoor that an unpoisoned control does not have, and CleanCLIP keeps it at
a low cleaning learning rate and removes it at a high one.

Every figure is deterministic (the same seeds, data order and programs); the values measured on
this host are in the comments, and the bounds leave wide margins around them. Test split: 96
images, of which 92 are not of the target class (ASR's denominator); 24 classes, chance top-1 4.2 %.
"""

import os

import pytest

from bclip import config as run_configs
from bclip import experiment, train
from bclip.sweep import runs as sweep_runs

CONFIG_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "study_claim.py")
CHANCE = 1 / 24


@pytest.fixture(scope="module")
def claim(tmp_path_factory, optimised_cpu_programs):
    """(scaled study, workdir, summary, the control's final figures)."""
    study = run_configs.load_config_file(CONFIG_PATH).get_config()
    workdir = str(tmp_path_factory.mktemp("claim") / "study")
    summary = experiment.run_study(study, workdir)
    study = experiment.apply_proportions(study)
    pretrain = experiment.pretrain_configs(study, os.path.join(workdir, "world"))["MMCL"]
    control = run_configs.override(pretrain, {"poison.count": 0, "poison.rate": None})
    control_figures = train.train_and_evaluate(control, os.path.join(workdir, "control"))
    return study, workdir, summary, control_figures


def _cleaning_evals(study, workdir, learning_rate):
    run = sweep_runs.run_name(experiment.cleaning_grid_entry(learning_rate))
    return experiment.read_evals(os.path.join(workdir, "clean", "MMCL", "CleanCLIP", run))


@pytest.mark.slow
def test_poisoned_pretraining_plants_a_backdoor_the_control_does_not_have(claim):
    study, _, summary, control = claim
    assert study.pretrain_base.poison.count == 67  # 7 % of 960
    poisoned = summary["MMCL"]["original"]
    assert poisoned["test_asr"] >= 0.8  # 0.924 (85 of 92)
    assert control["test/asr"] <= 0.1  # 0.011 (1 of 92)
    # Both models learned the task, so the ASR gap is the poisons', not an untrained model's bias.
    assert poisoned["test_top1"] >= 2 * CHANCE  # 0.135
    assert control["test/top1"] >= 2 * CHANCE  # 0.125


@pytest.mark.slow
def test_cleanclip_keeps_the_backdoor_at_a_low_rate_and_removes_it_at_a_high_one(claim):
    study, workdir, summary, _ = claim
    poisoned = summary["MMCL"]["original"]
    low, high = study.cleaning_learning_rates
    assert (low, high) == (5e-4, 5e-3)
    for learning_rate in (low, high):
        start, *cleaned = _cleaning_evals(study, workdir, learning_rate)
        # Cleaning starts from the poisoned model.
        assert (start["test/top1"], start["test/asr"]) == (poisoned["test_top1"], poisoned["test_asr"])
        assert [record["epoch"] for record in cleaned] == [1, 2, 3, 4]
    _, *cleaned_low = _cleaning_evals(study, workdir, low)
    # At 5e-4 cleaning trains (top-1 rises) and every epoch keeps the backdoor: ASR 0.978, 0.902,
    # 0.924, 0.913; top-1 0.198 at the end.
    assert min(record["test/asr"] for record in cleaned_low) >= 0.8
    assert cleaned_low[-1]["test/top1"] >= poisoned["test_top1"] + 0.03
    # At 5e-3 the backdoor goes (ASR 0.109, 0.261, 0.054, 0.022 by epoch) and the model still
    # classifies above chance at the end (top-1 0.115), as the default study's MMCL model at that
    # rate. The bounds leave room for a trajectory this steep to land a few images apart elsewhere.
    _, *cleaned_high = _cleaning_evals(study, workdir, high)
    asr_high = [record["test/asr"] for record in cleaned_high]
    assert min(asr_high) <= 0.1 and asr_high[-1] <= 0.15
    assert cleaned_high[-1]["test/top1"] > CHANCE
    # The report's figure: within 5 points of the pretrained model's top-1, the lowest ASR is the
    # 5e-3 run's, far below the pretrained model's.
    within_5pt = summary["MMCL"]["methods"]["CleanCLIP"]["lowest_asr_within"]["5pt"]
    assert within_5pt["learning_rate"] == high and within_5pt["asr"] <= 0.15  # 0.022 at epoch 4
