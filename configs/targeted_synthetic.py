"""Targeted poisoning (Carlini & Terzis, ICLR 2022) on the embedded study's synthetic world.

  python -m bclip.main --config configs/targeted_synthetic.py:runs/study/world \
    --workdir runs/targeted_synthetic
  python -m bclip.main --config configs/targeted_synthetic.py:runs/study/world,control \
    --workdir runs/targeted_synthetic_control

`arg` is the world folder a study wrote (`python -m bclip.experiment --config
configs/study_synthetic.py --workdir runs/study` writes runs/study/world), then optionally
`,control`. The run is the study's MMCL pretraining run (same pairs, model, batch 128, lr 1e-3,
6 epochs, test and selection evaluations after each epoch) with the backdoor off and targeted poisoning on instead:
8 test images drawn by poison.seed, each given a wrong label drawn among the other 23 classes,
replace 4 training pairs each (32 of the 12,000 pairs, 0.27 %), paired with a prompt template
naming the label. The "targeted" eval set reports the share of the 8 classified as their label
(targeted/success_rate) and each one's hit (targeted/hit_<row>). `control` trains on the clean
pairs (copies 0) and reports the same images' rate, the chance of the label without poisons.
About 4 CPU-minutes each (8-14 min on a shared 2-core Xeon); measured figures in README.md
("Targeted poisoning").

Several images in one run: each has its own label and its own copies, and
targeted/other_target_rate counts chosen images classified as another one's label (interference).
One image per run, as the paper ran it, is this file's sweep (`get_sweep`: num_images 1, seeds
0..7; each seed draws another image, label and set of replaced pairs), about 4 min a run:
  python -m bclip.sweep --config configs/targeted_synthetic.py:runs/study/world --workdir runs/targeted_one_per_run
  python -m bclip.sweep.report runs/targeted_one_per_run

Published setting (configs/targeted_cc.py): CC3M, RN50 CLIP, a target image and a target ImageNet
class drawn at random per run, captions from the training set that name the class; three
poisoned pairs of 3M (0.0001 %) are enough for the attack to succeed.
"""

import os

import ml_collections

from bclip import config as run_configs
from bclip import experiment

_HERE = os.path.dirname(os.path.abspath(__file__))

NUM_IMAGES = 8
COPIES = 4
ONE_PER_RUN_SEEDS = tuple(range(8))


def get_config(arg: str = "runs/study/world") -> ml_collections.ConfigDict:
    world, *options = arg.split(",")
    if set(options) - {"control"}:
        raise ValueError(f"targeted_synthetic takes WORLD or WORLD,control, got {arg!r}")
    study_synthetic = run_configs.load_config_file(os.path.join(_HERE, "study_synthetic.py"))
    study = experiment.apply_proportions(study_synthetic.get_config("default"))
    config = experiment.pretrain_configs(study, world)["MMCL"]
    # The attack is measured on the test split (top-1, and the targeted set); the study's final
    # retrieval and linear-probe evaluations say nothing about it and are left out.
    with config.eval.sets.unlocked():
        for name in experiment.EXTRA_EVAL_SETS:
            if name in config.eval.sets:
                del config.eval.sets[name]
    return run_configs.override(config, {
        "poison.count": 0,  # one attack per run: the backdoor is off
        "poison.targeted.images": os.path.join(world, "test"),
        "poison.targeted.num_images": NUM_IMAGES,
        "poison.targeted.copies": 0 if "control" in options else COPIES,
        "eval.sets.targeted.evaluator": "targeted",
    })


def get_sweep(arg: str = "runs/study/world") -> list[dict]:
    """One chosen image per run, one run per seed: the paper's protocol."""
    get_config(arg)  # the same argument checks
    return [{"poison.seed": seed, "poison.targeted.num_images": 1} for seed in ONE_PER_RUN_SEEDS]
