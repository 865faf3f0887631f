"""The embedded study's claim at test scale: poisoned MMCL pretraining plants the backdoor, and
CleanCLIP leaves it at a low cleaning learning rate and removes it, with the accuracy, at a high one.

  python -m bclip.experiment --config configs/study_claim.py --workdir runs/study_claim

tests/test_study_claim.py runs this study and an unpoisoned control (the same pretraining with no
poisons) and asserts their figures. It is configs/study_synthetic.py's `:smoke` world (96 test and
48 selection images, 24 classes) with the default study's model, trigger and objective, at a scale
chosen by a rule on pretraining figures only, fixed before any cleaning run at this scale was made:
  - the default study's width (64), pretraining learning rate (1e-3), trigger (the 8 px checkerboard
    at a random place) and objective (MMCL); the smoke study's patch 8 (half the step time of patch
    4), batch 32 and 5 warm-up steps; a world of 960 pairs;
  - the first of poison rate 7, 10, 15 % (then) epochs 2, 3, 4, 6, 8 at which the poisoned model's
    last-epoch test ASR is >= 80 % and its top-1 at least twice chance (8.3 %). Measured at 7 %
    (ASR / top-1, %): 0.0 / 4.2, 60.9 / 6.2, 48.9 / 5.2, 84.8 / 6.2, 92.4 / 13.5 at 2, 3, 4, 6, 8
    epochs, so 7 % (the default study's rate) for 8 epochs (240 steps). Fewer steps do not teach
    this model the task: at 15 % for 4 epochs (120 steps) ASR is 100 % but top-1 5.2 %;
  - the cleaning is the smoke study's, not tuned: CleanCLIP on a third of the pairs for a sixth of
    pretraining's pair-steps (4 epochs of 320 pairs), batch 32, 2 warm-up steps.
Cleaning was then measured once at the default study's rates 5e-5, 2e-4, 1e-3, 5e-3: last-epoch
test ASR (top-1) 91.3 (16.7), 92.4 (13.5), 79.3 (20.8), 2.2 (11.5) %; at the smoke study's 5e-4,
ASR 90-98 % at every epoch, top-1 19.8 % at the last. The grid here is the smoke study's rate and
the default grid's highest, picked after that measurement so that the test covers both sides of
the default study's MMCL cleaning (ASR 100 % at every rate up to 1e-3; at 5e-3, 10.4 % with top-1
falling from 60.0 to 13.1 %). About 3 CPU-minutes under the tests' XLA flags.
"""

import os

import ml_collections

from bclip import config as run_configs

_HERE = os.path.dirname(os.path.abspath(__file__))

NUM_TRAIN = 960
PRETRAIN_EPOCHS = 8
CLEANING_LEARNING_RATES = (5e-4, 5e-3)


def get_config() -> ml_collections.ConfigDict:
    study_synthetic = run_configs.load_config_file(os.path.join(_HERE, "study_synthetic.py"))
    study = study_synthetic.get_config("smoke")
    study.proportions.num_train = NUM_TRAIN
    study.proportions.pretrain_epochs = PRETRAIN_EPOCHS
    study.proportions.poison_rate = study_synthetic.POISON_RATE
    study.proportions.width = study_synthetic.WIDTH
    # The claim is about zero-shot ASR: no retrieval or probe sets to evaluate.
    study.world.num_retrieval = study.world.num_probe_train = 0
    study.pretrain = {"MMCL": study.pretrain["MMCL"].to_dict()}
    study.cleaning_learning_rates = CLEANING_LEARNING_RATES
    return study
