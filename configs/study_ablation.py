"""Ablation of the embedded study's scale: poison rate x cleaning budget x model width, and
pretraining length — one whole study (both objectives pretrained, CleanCLIP at every learning rate)
per point, so the table shows where the paper's contrast appears on the toy and where it does not.

  python -m bclip.experiment --config configs/study_ablation.py --workdir runs/ablation --sweep

Writes runs/ablation/ablation.md and .json (one row per point: both pretrained models' top-1 and
ASR, and CleanCLIP's lowest ASR keeping top-1 within 2 points of each) and each point's full study
report under runs/ablation/points/. Points that differ only in their cleaning share the synthetic
world and their pretraining runs. 82 minutes on 2 CPU cores (the 15 % cleaning budgets and the
12-epoch pretraining cost most); docs/study_proportions.md holds the measured table.

Every point is configs/study_synthetic.py's default study with the named proportions changed:
  - poison rate: the default 7 % (the lowest rate of its ladder at which both objectives' ASR
    reaches 90 %; also the earlier toy's) and 4 %, the rung below;
  - cleaning budget (cleaning pair-steps per pretraining pair-step): 1 % (the paper's CC3M; its CC6M
    0.5 %) and 15 % (the earlier toy's);
  - width of both towers and the embedding: the default 64 and 32;
  - pretraining length: the default number of epochs and twice it, at the default rate, budget
    and width;
  - and the reference code's JPEG re-encoding of poisoned training images (quality 75), at the
    default scale.
"""

import os

import ml_collections

from bclip import config as run_configs

_HERE = os.path.dirname(os.path.abspath(__file__))

# The default (7 %, the search's pick, which is also the earlier toy's) and the ladder's rung below it,
# where MMCL learned the backdoor (ASR 99.8 %) and MMCL+SSL nearly did (86 %).
POISON_RATES = (0.07, 0.04)
CLEAN_BUDGETS = (0.01, 0.15)
WIDTHS = (64, 32)


def _study_synthetic():
    return run_configs.load_config_file(os.path.join(_HERE, "study_synthetic.py"))


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    del arg
    return _study_synthetic().get_config("default")


def get_sweep(arg: str = "default") -> list[dict]:
    del arg
    default = _study_synthetic()
    points = []
    for rate in POISON_RATES:
        for width in WIDTHS:
            for budget in CLEAN_BUDGETS:
                points.append(
                    {
                        "proportions.poison_rate": rate,
                        "proportions.width": width,
                        "proportions.clean_budget": budget,
                    }
                )
    points.append({"proportions.pretrain_epochs": 2 * default.PRETRAIN_EPOCHS})
    # The one reference-mode artefact that changes this world's poisoned images: stored once as JPEG
    # (quality 75). The squash and the wrapped noise leave them bit-identical here (32 px square
    # images; a checkerboard patch), as docs/study_proportions.md shows.
    points.append({"pretrain_base.poison.jpeg_quality": 75})
    return points
