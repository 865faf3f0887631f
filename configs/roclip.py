"""RoCLIP (Yang, Gao & Mirzasoleiman, "Robust Contrastive Language-Image Pretraining against Data
Poisoning and Backdoor Attacks", NeurIPS 2023) as a pretraining-time defence: poisoned pretraining
with bclip's "roclip" per-epoch pass (bclip/epoch_passes.py).

Every `every_epochs`-th epoch (counted from 1; the epochs before the first are the warm-up on the
original pairs) a fresh random pool of `pool_size` training captions is drawn from the run's seed,
every training image (poisoned ones with their trigger) is embedded with the current model, and the
epoch trains each image against its nearest pool caption by cosine similarity instead of its own
caption; the other epochs train on the original pairs.

  CC3M, RN50, 1,500 BadNets poisons, target "banana" (configs/pretrain_cc.py:cc3m_mmcl plus the pass):
    python -m bclip.main --config configs/roclip.py:cc3m --workdir gs://BUCKET/bclip/cc3m_roclip \
      --config.data.train_csv=/data/cc3m/train.csv \
      --config.data.tokenizer.path=/data/clip/bpe_simple_vocab_16e6.txt.gz \
      --config.eval.sets.imagenet.path=/data/imagenet/val
    Hardware and time as configs/pretrain_cc.py's cc3m_mmcl (8xA100 or 8xH100, 12-14 h), plus one
    pass over the 3.3M training images and 21,845 pool captions every other epoch (about the cost
    of a training epoch's forward passes, a third of an epoch's compute).

  The embedded study's world (configs/study_synthetic.py's MMCL pretraining run plus the pass):
    python -m bclip.main --config configs/roclip.py:synthetic,runs/study/world --workdir runs/roclip
    The world is the one `python -m bclip.experiment --config configs/study_synthetic.py --workdir
    runs/study` writes; the run is compared with runs/study/pretrain/MMCL.

Hyper-parameters. The paper's text could not be read where this config was written; the values are
those of the authors' public code (BigML-CS-UCLA/RoCLIP, src/parser.py and src/train.py):
  - pool: 21,845 captions (--memory_bank_size's default);
  - K = 2 (--break_epoch): epochs 2, 4, 6, ... (1-based) match, epoch 1 is the warm-up;
  - matching by the cosine of the image embedding and the pool's caption embeddings (the pool's
    nearest neighbour of each image), the caption loss then computed against the matched caption.
  - its runs: 24 epochs, batch 512, AdamW lr 5e-5 with 10,000 warm-up steps (its defaults); here
    the study's pretraining setup is kept so RoCLIP is compared with the study's MMCL model.
How this pass differs from that code, knowingly:
  - the code's pool is a FIFO queue of caption *embeddings* from earlier batches, refreshed every
    step, and the matched embedding enters the loss without gradient (the text tower learns nothing
    in a matching epoch); here the pool is a fresh draw of captions each matching epoch, embedded at
    the epoch's start, and the matched caption is encoded in the step, with gradient, as a caption;
  - the code also trains on augmented pairs (--cross_aug: random flip, resized crop, colour jitter
    0.5/0.5/0.5/0.1 with p 0.8, grayscale p 0.2, Gaussian blur 21 px on the image every epoch; EDA
    on the caption once); bclip augments only SSL views, so these runs train on the plain pairs.

The embedded world's pool, by a rule fixed before any RoCLIP run: the pool keeps the public code's
share of a CC3M-sized training set (21,845 / 3.3M = 0.66 %), so 79 of the study's 12,000 pairs; K
stays 2 (epochs 2, 4, 6 of the study's 6 match).
"""

import importlib.util
import os

import ml_collections

from bclip import config as run_configs
from bclip import experiment

POOL_SIZE = 21_845  # the public code's --memory_bank_size
EVERY_EPOCHS = 2  # the public code's --break_epoch
CC3M_PAIRS = 3_300_000


def _sibling_config(name: str):
    """configs/<name>.py, loaded by path as the config flags load a config file."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_pool_size(num_train: int) -> int:
    """The public code's pool share of a CC3M-sized set, for a training set of `num_train` pairs."""
    return max(1, round(POOL_SIZE / CC3M_PAIRS * num_train))


def get_config(arg: str = "cc3m") -> ml_collections.ConfigDict:
    """`arg`: "cc3m", or "synthetic,WORLD" with WORLD the embedded study's world directory."""
    name, _, world = arg.partition(",")
    if name == "cc3m" and not world:
        config = _sibling_config("pretrain_cc").get_config("cc3m_mmcl")
        run_configs.enable_epoch_pass(config, "roclip", pool_size=POOL_SIZE, every_epochs=EVERY_EPOCHS)
        return config
    if name == "synthetic" and world:
        study = experiment.apply_proportions(_sibling_config("study_synthetic").get_config("default"))
        config = experiment.pretrain_configs(study, world)["MMCL"]
        pool_size = synthetic_pool_size(study.proportions.num_train)
        run_configs.enable_epoch_pass(config, "roclip", pool_size=pool_size, every_epochs=EVERY_EPOCHS)
        return config
    raise ValueError(f"configs/roclip.py takes 'cc3m' or 'synthetic,WORLD_DIR', got {arg!r}")
