"""Attacks x defences at the field's protocol: CLIP RN50 pretrained on CC3M with 1,500 poisons
targeting "banana", cleaned on 100K clean pairs, zero-shot ImageNet top-1 and ASR; the study
configs/study_synthetic.py:zoo runs on the toy (docs/zoo.md), at the published settings.

  python -m bclip.experiment --config configs/zoo_cc.py --workdir gs://BUCKET/bclip/zoo_cc \
    --config.pretrain_base.data.train_csv=/data/cc3m/train.csv \
    --config.pretrain_base.data.tokenizer.path=/data/clip/bpe_simple_vocab_16e6.txt.gz \
    --config.pretrain_base.eval.sets.test.path=/data/imagenet/val \
    --config.pretrain_base.eval.sets.selection.path=/data/imagenet/selection

(the selection split: `python -m bclip.data.imagenet_selection`, see configs/clean_cc.py). The
study's runner reads the eval sets "test" and "selection", so ImageNet val is named "test" here.

Per attack (BadNets: configs/pretrain_cc.py's N(0, 1) noise patch, 16 px at a random place;
blended: 0.8 image + 0.2 fixed U[0, 1) noise), six pretrainings and four cleaning sweeps:
  none                 configs/pretrain_cc.py:cc3m_mmcl and :cc3m_mmcl_ssl (64 epochs, lr 1e-3,
                       batch 2,048 / 1,024, 10,000 warm-up steps)
  CleanCLIP, PAR       configs/clean_cc.py:cleanclip's setting (100K pairs, 20 epochs, batch 64, 50
                       warm-up steps) on its 7-point grid 5e-5 ... 5e-3; PAR with its loss (τ 2.15)
                       and AdamW (β2 0.98, weight decay 1e-4) on the same grid, as the embedded study
                       runs it (its own 2-epoch, batch-2,048 setting: configs/clean_cc.py:par)
  RoCLIP               configs/roclip.py:cc3m: cc3m_mmcl plus matching against a pool of 21,845
                       captions every 2nd epoch (the authors' code's defaults)
  SafeCLIP             configs/pretrain_safeclip_cc.py: 32 epochs, lr 5e-4, batch 1,024, 5 in-modal
                       and 1 cross-modal warm-up epochs, safe share 15 % + 1 % an epoch up to 85 %
  detect-drop-retrain  DAO (k 16) on each undefended model's pairs, the top 10 % dropped (Huang et
                       al., ICLR 2025, remove 10 % of CC3M), and the model retrained (both objectives)
Cost, from configs/pretrain_cc.py's times on 8xA100 (MMCL 12-14 h, MMCL+SSL 18-20 h, SafeCLIP
9-10 h, RoCLIP about 1.3x MMCL): about 100 h of 8-GPU time per attack for the pretrainings, plus
four 7-point cleaning sweeps (10-15 GPU-hours each, one GPU per run) and two detection passes.
"""

import os

import ml_collections

from bclip import config as run_configs
from bclip import experiment, objectives
from bclip.data import triggers

_HERE = os.path.dirname(os.path.abspath(__file__))
DROP_SHARE = 0.10


def _config(name: str):
    return run_configs.load_config_file(os.path.join(_HERE, f"{name}.py"))


def get_config(arg: str = "cc3m") -> ml_collections.ConfigDict:
    if arg != "cc3m":
        raise ValueError(f"zoo_cc takes 'cc3m', got {arg!r}")
    pretrain_cc, clean_cc, roclip, safeclip = (_config(name) for name in ("pretrain_cc", "clean_cc", "roclip", "pretrain_safeclip_cc"))
    study = experiment.study_config()
    study.world.enabled = False

    base = pretrain_cc.get_config("cc3m_mmcl")
    with base.unlocked():
        # Required: the paths in the docstring. The runner reads "test" and "selection".
        base.eval.sets = {"test": run_configs.eval_set_config(kind="folder", path=""),
                          "selection": run_configs.eval_set_config(kind="folder", path="")}
    base.eval.selection_set = "selection"
    study.pretrain_base = base
    mmcl_ssl = pretrain_cc.RUNS["cc3m_mmcl_ssl"]
    study.pretrain = {
        "MMCL": {},
        "MMCL+SSL": {"objective": {"ssl_weight": mmcl_ssl[2]}, "data": {"batch_size": mmcl_ssl[3]}},
    }

    cleanclip = clean_cc.get_config("cleanclip")
    study.clean_base = {
        "optim": {"warmup_steps": cleanclip.optim.warmup_steps},
        "data": {"batch_size": cleanclip.data.batch_size},
        "train": {"num_epochs": cleanclip.train.num_epochs, "subset_size": cleanclip.train.subset_size,
                  "log_every_steps": cleanclip.train.log_every_steps, "keep_checkpoint_every_epochs": 0},
        "eval": {"at_start": True},
    }
    study.cleaning_methods = {
        "CleanCLIP": {"objective": objectives.objective_config(mmcl=1.0, ssl=1.0).to_dict()},
        "PAR": {"objective": objectives.objective_config(mmcl=1.0, par=1.0).to_dict(),
                "optim": {"b2": clean_cc.PAR_SETTING["optim.b2"], "weight_decay": clean_cc.PAR_SETTING["optim.weight_decay"]}},
    }
    study.cleaning_learning_rates = clean_cc.LEARNING_RATES

    safe = safeclip.get_config("cc3m")
    study.pretrain_defences = {
        "RoCLIP": experiment.pretrain_defence(("MMCL",), {
            "epoch_passes": {"roclip": {"pool_size": roclip.POOL_SIZE, "every_epochs": roclip.EVERY_EPOCHS}}}),
        "SafeCLIP": experiment.pretrain_defence(("MMCL",), {
            "objective": safe.objective.to_dict(),
            "optim": {
                **{key: safe.optim[key] for key in ("learning_rate", "weight_decay", "warmup_steps")},
                "epoch_learning_rates": safe.optim.epoch_learning_rates.to_dict(),
            },
            "data": {"batch_size": safe.data.batch_size},
            "train": {"num_epochs": safe.train.num_epochs},
            "epoch_passes": {"safeclip": safe.epoch_passes.safeclip.to_dict()},
        }),
        "detect-drop-retrain": experiment.pretrain_defence(("MMCL", "MMCL+SSL"), drop_detector="dao", drop_share=DROP_SHARE),
    }
    study.detectors = ("dao",)
    study.attacks = {
        "BadNets": experiment.attack(),
        "blended": experiment.attack(trigger=triggers.default_trigger_config("blended")),
    }
    return study
