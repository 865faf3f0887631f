"""The embedded study: the paper's experiment on the synthetic world, end to end on a laptop CPU.

  python -m bclip.experiment --config configs/study_synthetic.py --workdir runs/study
  python -m bclip.experiment --config configs/study_synthetic.py:par --workdir runs/study
  python -m bclip.experiment --config configs/study_synthetic.py:par,detect --workdir runs/study

`:par` adds Perturb and Recover (PAR) as a second cleaning method beside CleanCLIP (see PAR below);
`:detect` scores each pretrained model's training pairs with the three poison detectors
(bclip.detection: k-distance, SLOF, DAO; k = 16) and reports their AUROC, precision and recall.
The default study's runs and figures are the same with or without either. `:zoo` is every attack
against every defence (see ZOO below; docs/zoo.md):

  python -m bclip.experiment --config configs/study_synthetic.py:zoo --workdir runs/zoo

Pretrains a small CLIP on the synthetic world's image–caption pairs, a few of which carry a BadNets
checkerboard patch at a random place and a caption naming "banana", once with MMCL and once with
MMCL+SSL; cleans each with CleanCLIP (MMCL + SSL on a small clean subset) at learning rates spanning
the paper's grid; writes report.md / report.png / summary.json and scale.json (the sizes and their
ratios). 7 min 22 s on a 2-core Intel Xeon. `:smoke` is a seconds-long version for tests.

How the default scale was chosen (the rule was fixed before any cleaning result was looked at):
keep the paper's proportions wherever the 10-minute, 2-core budget allows, in this order —
  1. cleaning reads 1 % of pretraining's pair-steps (the paper: 100K pairs x 20 epochs against
     3M x 64 = 1.0 % on CC3M, 0.5 % on CC6M), on a clean subset of 3.3 % of the pairs (100K of 3M),
     with batch 64 and no warm-up to speak of (the paper: 50 of 31K steps), as the paper;
  2. cleaning learning rates spanning the paper's 5e-5 … 5e-3 around the same pretraining rate,
     1e-3 (every other value of its 7-point grid);
  3. the rest of the budget goes to pretraining: as many pairs and epochs as fit (the paper
     pretrains 64 epochs; here NUM_TRAIN pairs x PRETRAIN_EPOCHS);
  4. the lowest poison rate on the ladder 0.25, 0.5, 1, 2, 4, 7 % at which both objectives'
     pretrained models reach ASR >= 90 % (the paper poisons 0.05 %, which a model this small, this
     briefly trained, does not learn). docs/study_proportions.md records the search.
The BadNets patch is a checkerboard: the study's mean-coloured noise patch is not learned by a model
this small in this few steps (ASR <= 3.5 % even at 10 % poisoning, measured at 5 epochs).
`configs/study_ablation.py` varies these choices (poison rate, cleaning budget, width, pretraining
length); docs/study_proportions.md holds its table.
"""

import os

import ml_collections

from bclip import config as run_configs
from bclip import epoch_passes, experiment, objectives
from bclip.data import triggers

_HERE = os.path.dirname(os.path.abspath(__file__))

NUM_TRAIN = 12_000
PRETRAIN_EPOCHS = 6
POISON_RATE = 0.07  # the ladder's first rung with both ASRs >= 90 % (4 %: MMCL+SSL 86 %)
CLEAN_SHARE = 0.033
CLEAN_BUDGET = 0.01
WIDTH = 64
# The paper's grid is 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3 with pretraining at 1e-3.
CLEANING_LEARNING_RATES = (5e-5, 2e-4, 1e-3, 5e-3)

# Perturb and Recover (Singh, Croce & Hein, arXiv 2412.00727; the authors' code,
# nmndeep/PerturbAndRecover): the CLIP loss minus half of each tower's mean squared distance to the
# poisoned model's embeddings, each counted while at most τ = 2.15 (objectives.par_loss), AdamW with
# β2 = 0.98 and weight decay 1e-4. Their CC3M setting (configs/clean_cc.py:par) is 2 epochs over
# 250K pairs at global batch 2,048 and a learning rate of 3e-5 falling to ~0. Scaled as the study
# scales CleanCLIP, it keeps CleanCLIP's clean set, epochs, batch and learning-rate grid (the rule
# of item 2 above; PAR's own 3e-5 sits just under the grid's 5e-5); τ bounds a distance between
# unit vectors, which no scale changes, and its AdamW settings are kept. Figures: README.md.
PAR = {
    "objective": objectives.objective_config(mmcl=1.0, par=1.0).to_dict(),
    "optim": {"b2": 0.98, "weight_decay": 1e-4},
}


# ZOO: every attack x defence on the toy (`:zoo`), at a scale fixed by this rule before any zoo
# run. Keep the default study's proportions (7 % poisons, 6 epochs, width 64, batch 128, cleaning 1 %
# of pretraining's pair-steps on 3.3 % of the pairs, the 4-point learning-rate grid) and divide its
# 12,000 pairs by the smallest whole k for which the estimated zoo takes at most 25 minutes on a quiet
# 2-core host (5 minutes under the 30, for a shared host). The estimate, in units U of the
# default study's MMCL pretraining (the default study, 7 min 22 s quiet, is 1 U + 2.1 U for
# MMCL+SSL — their ratio in a timed run — + about 0.3 U of cleaning, so U is about 130 s): per
# attack, the undefended models 3.1 U, RoCLIP 1.2 U (its matching passes), SafeCLIP 2 U (SSL views),
# detect-drop-retrain 2.8 U (both objectives on 90 % of the pairs), DAO detection 0.4 U, CleanCLIP
# and PAR 0.6 U: 10.1 U, so 44 min for two attacks at 12,000 pairs, plus about 20 s of compiling per
# run (24 runs: 8 min). k = 2: 22 + 8 = 30 min; k = 3: 15 + 8 = 23 min -> 4,000 pairs. The
# retrieval and probe sets are left out (they are not in the zoo's table).
#   attacks   BadNets (the study's 8 px checkerboard at a random place) and blended (the triggers
#             module's default: 0.8 image + 0.2 fixed U[0, 1) noise, the reference code's pattern).
#             The optimised patch (configs/optimised_trigger.py) is left out: it needs a clean
#             pretrained model and 500 optimisation steps (9 min on this host) before its ~10 U of
#             runs, twice the budget. A targeted-poisoning attack goes in ZOO_ATTACKS as one more
#             experiment.attack entry (its poison-section settings).
#   defences  none; post-hoc CleanCLIP and PAR on both objectives' models (as the default study
#             and :par); pretraining-time RoCLIP and SafeCLIP on MMCL (both replace the CLIP loss's
#             pairs; configs/roclip.py and configs/pretrain_safeclip_synthetic.py state their
#             published settings and how they are scaled: RoCLIP's pool 0.66 % of the pairs, K = 2;
#             SafeCLIP's 32-epoch schedule scaled to 6), and detect-drop-retrain on both objectives:
#             DAO (k 16) scores the undefended model's pairs and the retrain leaves out the top 10 %
#             (Huang et al., ICLR 2025, remove 10 % of CC3M by DAO score before retraining).
ZOO_NUM_TRAIN_DIVISOR = 3
ZOO_DROP_SHARE = 0.10
ZOO_ATTACKS = {
    "BadNets": experiment.attack(),
    "blended": experiment.attack(trigger=triggers.default_trigger_config("blended")),
}


def zoo_defences(num_train: int, num_epochs: int) -> dict:
    """The zoo's pretraining-time defences for a world of `num_train` pairs and `num_epochs`."""
    roclip = run_configs.load_config_file(os.path.join(_HERE, "roclip.py"))
    safeclip = run_configs.load_config_file(os.path.join(_HERE, "pretrain_safeclip_synthetic.py"))
    schedule = safeclip.scaled_schedule(num_epochs)
    return {
        "RoCLIP": experiment.pretrain_defence(("MMCL",), {
            "epoch_passes": {"roclip": {"pool_size": roclip.synthetic_pool_size(num_train), "every_epochs": roclip.EVERY_EPOCHS}},
        }),
        "SafeCLIP": experiment.pretrain_defence(("MMCL",), {
            "objective": objectives.objective_config(mmcl=0.0, safe_mmcl=1.0, risky_ssl=1.0).to_dict(),
            "epoch_passes": {"safeclip": schedule},
            # The cross-modal warm-up epoch at the published constant 5e-6.
            "optim": {"epoch_learning_rates": epoch_passes.safeclip_learning_rates(schedule)},
        }),
        "detect-drop-retrain": experiment.pretrain_defence(("MMCL", "MMCL+SSL"), drop_detector="dao", drop_share=ZOO_DROP_SHARE),
    }


def _model_overrides(width: int, smoke: bool) -> dict:
    return {
        "image": {"size": 32, "patch_size": 4 if not smoke else 8, "width": width, "layers": 2, "heads": 2},
        "text": {"context_length": 24, "vocab_size": 256, "width": width, "layers": 2, "heads": 2},
        "embed_dim": width,
    }


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    options = arg.split(",")
    smoke = "smoke" in options
    unknown = sorted(set(options) - {"default", "smoke", "par", "detect", "zoo"})
    if unknown:
        raise ValueError(f"study_synthetic takes 'default', 'smoke', 'par', 'detect' or 'zoo' (comma-separated), got {arg!r}")
    study = experiment.study_config()
    study.world.num_test = 96 if smoke else 480
    study.world.num_selection = 48 if smoke else 240
    # Retrieval (5 captions per image) and linear-probe sets, evaluated on the final models.
    study.world.num_retrieval = 24 if smoke else 120
    study.world.captions_per_image = 3 if smoke else 5
    study.world.num_probe_train = 48 if smoke else 480
    study.proportions.num_train = 480 if smoke else NUM_TRAIN
    study.proportions.pretrain_epochs = 2 if smoke else PRETRAIN_EPOCHS
    study.proportions.poison_rate = 0.05 if smoke else POISON_RATE
    # The smoke study cleans on a third of its pairs for an epoch, enough to move its figures.
    study.proportions.clean_share = 1 / 3 if smoke else CLEAN_SHARE
    study.proportions.clean_budget = 1 / 6 if smoke else CLEAN_BUDGET
    study.proportions.width = 32 if smoke else WIDTH

    base = run_configs.run_config("micro-vit", **_model_overrides(32 if smoke else WIDTH, smoke))
    base.data.batch_size = 32 if smoke else 128
    base.data.image_augment = "simclr"
    base.optim.learning_rate = 1e-3
    # About 5 % of pretraining's steps, as the paper's 10,000 warm-up steps of its 94K-188K.
    base.optim.warmup_steps = 5 if smoke else 30
    base.train.log_every_steps = 5 if smoke else 20
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
        "optim": {"warmup_steps": 2 if smoke else 0},
    }
    study.cleaning_methods = {
        "CleanCLIP": {"objective": objectives.objective_config(mmcl=1.0, ssl=1.0).to_dict()},
    }
    if "par" in options:
        study.cleaning_methods.PAR = PAR
    if "detect" in options:
        study.detectors = ("k_distance", "slof", "dao")
    study.cleaning_learning_rates = (5e-4,) if smoke else CLEANING_LEARNING_RATES
    if "zoo" in options:
        _make_zoo(study, smoke)
    return study


def _make_zoo(study: ml_collections.ConfigDict, smoke: bool) -> None:
    """Turns the study into the zoo (ZOO above); smoke keeps the smoke scale with 3 epochs, the
    fewest SafeCLIP's scaled schedule takes (two warm-ups and a split epoch)."""
    if not smoke:
        study.proportions.num_train = NUM_TRAIN // ZOO_NUM_TRAIN_DIVISOR
    else:
        study.proportions.pretrain_epochs = 3
    study.world.num_retrieval = study.world.num_probe_train = 0
    study.cleaning_methods.PAR = PAR
    study.detectors = ("dao",)
    study.attacks = ZOO_ATTACKS
    study.pretrain_defences = zoo_defences(study.proportions.num_train, study.proportions.pretrain_epochs)
