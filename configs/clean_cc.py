"""Cleaning a poisoned CC3M/CC6M RN50 (configs/pretrain_cc.py) by fine-tuning on 100K clean pairs.

`arg` picks the method:
  cleanclip        MMCL + SSL, both weight 1 (CleanCLIP)
  mmcl             MMCL only (batch 128)
  ssl              SSL only
  ssl_weight_2/4/8 MMCL + SSL with SSL weight 2, 4 or 8
  shrink_perturb   θ ← 0.95·θ + 1e-4·θ_random_init once, then CleanCLIP's loss
  heavy_wd         CleanCLIP's loss with weight decay 1.0 instead of 0.1 (see HEAVY_WEIGHT_DECAY)
  deep_clustering  CleanCLIP's loss + 5 × cross-entropy on spherical k-means ids (1,000 centroids,
                   recomputed on the cleaning set before every epoch)
  par              Perturb and Recover (Singh, Croce & Hein, arXiv 2412.00727), at its published
                   setting (PAR_SETTING below), not the study's 20 epochs and batch 64
Every other method: 20 epochs, batch 64 (128 for MMCL only), 50 warm-up steps then cosine to 0, AdamW
with a fresh optimiser state; zero-shot ImageNet accuracy and ASR before cleaning and after every
epoch, each epoch one point of the accuracy-vs-ASR plot. `get_sweep(arg)` lists the study's
learning rates, 5e-5 … 5e-3; a single run uses 5e-4, the grid's geometric middle (par: its own
3e-5). PAR's run, e.g. of the CC3M MMCL+SSL model, takes the same required paths as below:
  python -m bclip.main --config configs/clean_cc.py:par,cc3m_mmcl_ssl --workdir gs://BUCKET/bclip/cc3m_mmcl_ssl/par ...
It keeps the poisoned model's variables frozen beside the trained ones (twice the parameters,
one more inference forward pass per batch); batch 2,048 is meant for 4-8 devices.

`arg` may name the pretraining run too, "METHOD,RUN" with RUN a configs/pretrain_cc.py arg:
  cleanclip,cc6m_mmcl_ssl            bclip's cleaning of that run, from the epoch the study cleaned
  cleanclip,cc6m_mmcl_ssl_reference  the paper's: the reference code's cleaning of its reference run

Start point. By default a run starts from the pretraining run's latest (final) checkpoint. The
study's CC6M cleaning runs started earlier (PAPER_START_EPOCHS): MMCL from pretraining epoch 21,
MMCL+SSL from epoch 36, where epoch 21 is the checkpoint saved after the 21st epoch (the reference's
epoch_21.pt). Naming a CC6M run in `arg` starts there (--config.train.init_from_epoch=-1 then
cleans the final checkpoint instead); configs/pretrain_cc.py keeps every epoch's checkpoint, and a
missing one is an error listing the epochs there are.

What the paper ran (RUN ending in _reference, `use_reference_cleaning`): the reference reloaded the
pretraining AdamW state when cleaning — train.reload_optimizer_state=true does the same: Adam's
moments and step count continue, the schedule restarts, and the pretraining weight decay (0.1)
replaces the configured one (see HEAVY_WEIGHT_DECAY); it measured ASR with its own trigger geometry
(poison.squash, wrapped noise) and made one EDA view per caption. bclip's default starts a fresh
optimiser and keeps bclip's trigger.

Model selection happens on a held-out split of ImageNet TRAIN (eval.sets.selection, 10 images per
class), never on the validation set, which stays the test split. Write it once:
  python -m bclip.data.imagenet_selection /data/imagenet/train /data/imagenet/selection
(10,000 images, ≈1.1 GB, seeded; --per_class and --seed change it). TFDS alternative, no copy:
--config.eval.sets.selection.kind=tfds --config.eval.sets.selection.path=imagenet2012
--config.eval.sets.selection.split=train[:10000] plus the classnames_file / templates_file overrides
of configs/pretrain_cc.py: TFDS stores train shuffled, so that is ≈10 per class, not exactly 10.
`python -m bclip.sweep.report ROOT` then picks the (run, epoch) with the lowest selection ASR
whose selection top-1 is within 2 points of the original model's.

The clean set is the pretraining CSV minus the pretraining run's poisoned indices (the run fails if
any is left), cut to a random 100,000 of its pairs (train.subset_seed), as the reference did.
Run (paths are placeholders; every one is required):
  python -m bclip.main --config configs/clean_cc.py:cleanclip \
    --workdir gs://BUCKET/bclip/cc6m_mmcl_ssl/cleanclip_lr5e-4 \
    --config.train.init_from=gs://BUCKET/bclip/cc6m_mmcl_ssl \
    --config.train.exclude_indices_file=gs://BUCKET/bclip/cc6m_mmcl_ssl/poison_indices.json \
    --config.data.train_csv=/data/cc6m/train.csv \
    --config.data.tokenizer.path=/data/clip/bpe_simple_vocab_16e6.txt.gz \
    --config.eval.sets.imagenet.path=/data/imagenet/val \
    --config.eval.sets.selection.path=/data/imagenet/selection \
    --config.train.init_from_epoch=36 \
    --config.optim.learning_rate=5e-4
(ImageNet via TFDS: the same eval.sets.imagenet overrides as in configs/pretrain_cc.py. Leave out
init_from_epoch to clean the final checkpoint.)

Hardware: one GPU (A100/H100) or one TPU chip per run; batch 64 is too small to spread over 8
devices usefully, so run a sweep's learning rates side by side, one device each. Time (estimated
from the study's per-GPU throughput, ≈500 MMCL / ≈350 MMCL+SSL pairs/s on an A100): 2M pairs per
run ≈ 1.1 h (MMCL) to 1.6 h (with SSL), plus 21 evaluations of 1–2 min each (50,000 validation and
10,000 selection images); deep clustering adds one embedding pass over the 100K pairs per epoch. A
7-point sweep of one method ≈ 10–15 GPU-hours.
"""

import ml_collections

from bclip import config as run_configs

LEARNING_RATES = (5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3)

# Ten times pretraining's 0.1. optax's AdamW decays by lr·wd per step, so over a cleaning run's
# ~31K steps (cosine, mean lr = peak / 2) the weights alone would shrink by exp(-15600·lr·wd):
# ×0.46 at lr 5e-5, ≈0 from lr 5e-4. The reference swept 0.2 … 100; override
# --config.optim.weight_decay to reach other points. But the reference reloaded the pretraining
# AdamW state, whose load_state_dict also replaced the weight decay, so its "heavy weight decay"
# runs effectively trained with 0.1: with train.reload_optimizer_state=true this config does the
# same (the pretraining run's weight decay replaces this one, with a warning in the log).
HEAVY_WEIGHT_DECAY = 1.0

# The pretraining epoch the study's CC6M cleaning runs started from (run_cleaning_experiments.py),
# by configs/pretrain_cc.py run: the checkpoint saved after that many epochs (1-based, as the
# reference's epoch_21.pt). No start epoch is recorded for the CC3M runs: they start from the final one.
PAPER_START_EPOCHS = {"cc6m_mmcl": 21, "cc6m_mmcl_ssl": 36}
PRETRAINING_RUNS = ("cc3m_mmcl", "cc3m_mmcl_ssl", "cc6m_mmcl", "cc6m_mmcl_ssl")

# PAR as the authors' code runs it (nmndeep/PerturbAndRecover: train.py's defaults, trigger.sh,
# losses.py): the loss is CLIP's minus ½(d_img + d_txt), d the batch's mean squared distance
# between the normalised embeddings of the model being cleaned and of the frozen poisoned model
# (same augmented image, same caption), each set to 0 once above τ = 2.15 (objectives.par_loss);
# 250K CC3M pairs, 2 epochs, 512 pairs on each of 4 GPUs (global batch 2,048), AdamW β = (0.9,
# 0.98), ε = 1e-8, weight decay 1e-4 (not on biases and norms). Their learning rate starts at 3e-5,
# falls linearly to 3e-6 over the first epoch, then follows a cosine to 1e-9; bclip's schedule
# (warm-up, then cosine to 0) comes closest with a 3e-5 peak and no warm-up. Not reproduced here:
# their temperature is held fixed (bclip trains it, as in every cleaning method), and their images
# get Gaussian noise (σ = 0.2, p = 0.5) and a small random erasing (0.5-1 % of the area, p = 0.5)
# where bclip's cleaning batch is the plain resized image.
PAR_SETTING = {
    "objective.par_weight": 1.0,
    "objective.par_threshold": 2.15,
    "optim.learning_rate": 3e-5,
    "optim.warmup_steps": 0,
    "optim.b2": 0.98,
    "optim.weight_decay": 1e-4,
    "data.batch_size": 2_048,
    "train.num_epochs": 2,
    "train.subset_size": 250_000,
    "train.log_every_steps": 10,
    "train.checkpoint_every_steps": 50,
}

# name -> (MMCL weight, SSL weight, overrides of other keys)
METHODS = {
    "cleanclip": (1.0, 1.0, {}),
    "mmcl": (1.0, 0.0, {}),
    "ssl": (0.0, 1.0, {}),
    "ssl_weight_2": (1.0, 2.0, {}),
    "ssl_weight_4": (1.0, 4.0, {}),
    "ssl_weight_8": (1.0, 8.0, {}),
    "shrink_perturb": (1.0, 1.0, {"cleaning.shrink": 0.95, "cleaning.perturb": 1e-4}),
    "heavy_wd": (1.0, 1.0, {"optim.weight_decay": HEAVY_WEIGHT_DECAY}),
    "deep_clustering": (
        1.0,
        1.0,
        {"objective.cluster_weight": 5.0, "cleaning.num_clusters": 1_000},
    ),
    "par": (1.0, 0.0, PAR_SETTING),
}

CLEAN_SET_SIZE = 100_000


def _parse(arg: str) -> tuple[str, str]:
    """"METHOD[,PRETRAINING_RUN]" -> (method, pretraining run or "")."""
    method, _, pretraining_run = arg.partition(",")
    if method not in METHODS:
        raise ValueError(f"unknown cleaning method {method!r}; known: {sorted(METHODS)}")
    known_runs = [*PRETRAINING_RUNS, *(f"{run}_reference" for run in PRETRAINING_RUNS)]
    if pretraining_run and pretraining_run not in known_runs:
        raise ValueError(f"unknown pretraining run {pretraining_run!r}; known: {known_runs}")
    return method, pretraining_run


def get_config(arg: str = "cleanclip") -> ml_collections.ConfigDict:
    """`arg` is "METHOD" or "METHOD,PRETRAINING_RUN" (a configs/pretrain_cc.py arg): a CC6M run
    starts from the epoch the study cleaned it from (PAPER_START_EPOCHS), others from the final
    checkpoint, and a *_reference run is cleaned as the reference code did (`use_reference_cleaning`)."""
    arg, pretraining_run = _parse(arg)
    reference = pretraining_run.endswith("_reference")
    pretraining_run = pretraining_run.removesuffix("_reference")
    mmcl_weight, ssl_weight, overrides = METHODS[arg]

    # Same model as configs/pretrain_cc.py: the checkpoint in train.init_from must fit it.
    config = run_configs.run_config("RN50", dtype="bfloat16")
    config.objective.mmcl_weight = mmcl_weight
    config.objective.ssl_weight = ssl_weight

    config.optim.learning_rate = 5e-4
    config.optim.warmup_steps = 50
    config.optim.weight_decay = 0.1

    config.data.train_csv = ""  # required: the pretraining CSV
    config.data.tokenizer.kind = "clip_bpe"
    config.data.tokenizer.path = ""  # required: the bpe_simple_vocab_16e6.txt.gz merges file
    config.data.batch_size = 128 if ssl_weight == 0.0 else 64
    config.data.num_workers = 16
    config.data.synonyms = "wordnet"

    # The cleaning data is clean: nothing is poisoned. The target and trigger are still set because
    # ASR is measured with them; they must be the pretraining run's.
    config.poison.count = 0
    config.poison.target_label = "banana"
    config.poison.trigger.name = "badnets"
    config.poison.trigger.patch = "random"
    config.poison.trigger.location = "random"
    config.poison.trigger.size = 16

    config.train.num_epochs = 20
    config.train.init_from = ""  # required: the poisoned pretraining run's workdir or checkpoint
    config.train.init_from_epoch = PAPER_START_EPOCHS.get(pretraining_run, -1)  # -1: its final checkpoint
    # True reproduces the reference: the pretraining AdamW moments, step count and weight decay
    # carry over (replacing optim.weight_decay, see HEAVY_WEIGHT_DECAY); bclip starts fresh.
    config.train.reload_optimizer_state = False
    config.train.exclude_indices_file = ""  # required: that run's poison_indices.json
    config.train.subset_size = CLEAN_SET_SIZE
    config.train.log_every_steps = 50
    config.train.checkpoint_every_steps = 1_000

    with config.unlocked():
        config.eval.sets = {
            # Required: --config.eval.sets.imagenet.path=/path/to/imagenet/val (the test split).
            "imagenet": run_configs.eval_set_config(kind="folder", path=""),
            # Required: --config.eval.sets.selection.path=/path/to/imagenet/selection, written from
            # ImageNet train by `python -m bclip.data.imagenet_selection` (see the docstring).
            "selection": run_configs.eval_set_config(kind="folder", path=""),
        }
    config.eval.selection_set = "selection"
    config.eval.batch_size = 1_024
    config.eval.num_workers = 16
    config.eval.every_epochs = 1
    config.eval.at_start = True  # the poisoned model's own point

    config = run_configs.override(config, overrides)
    if reference:
        use_reference_cleaning(config)
    return config


def use_reference_cleaning(config: ml_collections.ConfigDict) -> None:
    """Cleans as the reference code did a model of a configs/pretrain_cc.py *_reference run: the
    pretraining AdamW state reloaded (so its weight decay 0.1 replaces the configured one), ASR
    measured with the reference's trigger (squashed images, wrapped noise bytes), one EDA caption
    view per caption, float32 compute. BatchNorm statistics stay over the whole batch: the reference cleaned on one
    GPU, whose batch is the global batch."""
    config.train.reload_optimizer_state = True
    config.poison.squash = True
    config.poison.trigger.overflow = "wrap"
    config.data.text_views_per_epoch = False
    config.model.dtype = "float32"  # the paper's fp32/TF32 compute, as configs/pretrain_cc.py's reference runs


def get_sweep(arg: str = "cleanclip") -> list[dict]:
    """One override dict per run of the method's learning-rate sweep."""
    _parse(arg)
    return [{"optim.learning_rate": learning_rate} for learning_rate in LEARNING_RATES]
