"""The embedded study: the paper's experiment on the synthetic world, end to end on a laptop CPU.

  python -m bclip.experiment --config configs/study_synthetic.py --workdir runs/study

Pretrains a small CLIP on 8,000 synthetic image–caption pairs of which 7 % carry a BadNets
checkerboard patch at a random place and a caption naming "banana", once with MMCL and once with MMCL+SSL; cleans each with CleanCLIP
(MMCL + SSL on 2,000 clean pairs) at several learning rates; writes report.md / report.png /
summary.json. About 10 minutes on 2 CPU cores. `:smoke` is a seconds-long version for tests.
"""

import ml_collections

from bclip import config as run_configs
from bclip import experiment, objectives


def _model_overrides(smoke: bool) -> dict:
    width = 32 if smoke else 64
    return {
        "image": {"size": 32, "patch_size": 4 if not smoke else 8, "width": width, "layers": 2, "heads": 2},
        "text": {"context_length": 24, "vocab_size": 256, "width": width, "layers": 2, "heads": 2},
        "embed_dim": width,
    }


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    smoke = arg == "smoke"
    if arg not in ("default", "smoke"):
        raise ValueError(f"study_synthetic takes 'default' or 'smoke', got {arg!r}")
    study = experiment.study_config()
    study.world.num_train = 480 if smoke else 8000
    study.world.num_test = 96 if smoke else 480
    study.world.num_selection = 48 if smoke else 240

    base = run_configs.run_config("micro-vit", **_model_overrides(smoke))
    base.data.batch_size = 32 if smoke else 128
    base.data.image_augment = "simclr"
    base.optim.learning_rate = 1e-3
    base.optim.warmup_steps = 5 if smoke else 30
    base.train.num_epochs = 2 if smoke else 5
    base.train.log_every_steps = 5 if smoke else 20
    # 7 % of the pairs (the study poisons 0.05 % of millions, over 64 epochs; a 5-epoch toy needs a
    # stronger dose). A BadNets checkerboard at a random place: the study's noise patch, drawn
    # around the image's mean colour, is invisible to this small a model in this few steps.
    base.poison.count = 24 if smoke else 560
    base.poison.trigger.patch = "checkerboard"
    base.poison.trigger.size = 8
    base.eval.batch_size = 48 if smoke else 240
    base.eval.every_epochs = 1
    study.pretrain_base = base

    study.pretrain = {
        "MMCL": {"objective": objectives.objective_config(mmcl=1.0).to_dict()},
        "MMCL+SSL": {"objective": objectives.objective_config(mmcl=1.0, ssl=1.0).to_dict()},
    }
    study.clean_base = {
        "data": {"batch_size": 32 if smoke else 64},
        "optim": {"warmup_steps": 2 if smoke else 10},
        "train": {"num_epochs": 1 if smoke else 3, "subset_size": 160 if smoke else 2000},
    }
    study.cleaning_methods = {
        "CleanCLIP": {"objective": objectives.objective_config(mmcl=1.0, ssl=1.0).to_dict()},
    }
    study.cleaning_learning_rates = (5e-4,) if smoke else (1e-4, 5e-4, 2e-3)
    return study
