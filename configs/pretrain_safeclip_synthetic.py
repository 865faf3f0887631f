"""SafeCLIP pretraining on the embedded study's poisoned synthetic world, beside its MMCL model.

  python -m bclip.main --config configs/pretrain_safeclip_synthetic.py:runs/study/world \
    --workdir runs/safeclip_synthetic

`arg` is the world folder a study wrote (`python -m bclip.experiment --config
configs/study_synthetic.py --workdir runs/study` writes runs/study/world). The run is the study's
MMCL pretraining run (same pairs, the same 7 % BadNets poisons, model, batch 128, lr 1e-3, 6
epochs, test-set top-1 and ASR after each epoch) with SafeCLIP's objective and per-epoch split
(bclip.epoch_passes.safeclip_split; configs/pretrain_safeclip_cc.py states the published setup),
and the published constant learning rate of 5e-6 in the cross-modal warm-up epoch
(optim.epoch_learning_rates = {1: 5e-6}; the cosine schedule counts that epoch's steps).
About 10 min on a 2-core Xeon (SSL views and one embedding pass over the pairs per split epoch).

The published schedule spans 32 epochs; it is scaled to these 6 by a rule fixed before any
SafeCLIP run here: each warm-up keeps its share of the epochs, rounded, at least 1 (in-modal
5/32 of 6 -> 1, cross-modal 1/32 of 6 -> 1); the safe share keeps its start (15 %) and cap (85 %),
and grows so that it reaches the published run's last-epoch share (15 % + 25 x 1 % = 40 %) at the
last epoch here (15 % + 3 x 8.33 %).
"""

import os

import ml_collections

from bclip import config as run_configs
from bclip import epoch_passes, experiment, objectives

_HERE = os.path.dirname(os.path.abspath(__file__))

PUBLISHED_EPOCHS, PUBLISHED_INMODAL_WARMUP, PUBLISHED_MULTIMODAL_WARMUP = 32, 5, 1
PUBLISHED_SHARE_START, PUBLISHED_SHARE_STEP = 0.15, 0.01


def scaled_schedule(num_epochs: int) -> dict:
    """The published schedule's options scaled to a run of `num_epochs` (see the docstring)."""
    inmodal = max(1, round(PUBLISHED_INMODAL_WARMUP * num_epochs / PUBLISHED_EPOCHS))
    multimodal = max(1, round(PUBLISHED_MULTIMODAL_WARMUP * num_epochs / PUBLISHED_EPOCHS))
    published_splits = PUBLISHED_EPOCHS - PUBLISHED_INMODAL_WARMUP - PUBLISHED_MULTIMODAL_WARMUP
    splits = num_epochs - inmodal - multimodal
    if splits < 1:
        raise ValueError(f"a SafeCLIP run of {num_epochs} epochs leaves no epoch after its warm-ups")
    final_share = PUBLISHED_SHARE_START + (published_splits - 1) * PUBLISHED_SHARE_STEP
    step = (final_share - PUBLISHED_SHARE_START) / max(splits - 1, 1)
    return {"inmodal_warmup_epochs": inmodal, "multimodal_warmup_epochs": multimodal, "safe_share_step": step}


def get_config(arg: str = "runs/study/world") -> ml_collections.ConfigDict:
    study_synthetic = run_configs.load_config_file(os.path.join(_HERE, "study_synthetic.py"))
    study = experiment.apply_proportions(study_synthetic.get_config("default"))
    config = experiment.pretrain_configs(study, arg)["MMCL"]
    config = run_configs.override(
        config, {f"objective.{key}": value for key, value in objectives.objective_config(mmcl=0.0, safe_mmcl=1.0, risky_ssl=1.0).items()}
    )
    schedule = scaled_schedule(config.train.num_epochs)
    run_configs.enable_epoch_pass(config, "safeclip", **schedule)
    return run_configs.override(config, {"optim.epoch_learning_rates": epoch_passes.safeclip_learning_rates(schedule)})
