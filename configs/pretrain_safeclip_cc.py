"""SafeCLIP pretraining (Yang, Gao & Mirzasoleiman, "Better Safe than Sorry", ICML 2024) of CLIP RN50
on CC3M with the study's 1,500 BadNets poisons targeting "banana".

  python -m bclip.main --config configs/pretrain_safeclip_cc.py --workdir gs://BUCKET/bclip/cc3m_safeclip \
    --config.data.train_csv=/data/cc3m/train.csv \
    --config.data.tokenizer.path=/data/clip/bpe_simple_vocab_16e6.txt.gz \
    --config.eval.sets.imagenet.path=/data/imagenet/val

Data, poisons, model, views and evaluation are configs/pretrain_cc.py's cc3m_mmcl_ssl run (RN50,
global batch 1,024 with AutoAugment/EDA views, zero-shot ImageNet top-1 and ASR after every epoch);
the objective is SafeCLIP's: objective.safe_mmcl (CLIP's loss on the safe pairs only, risky pairs
neither anchors nor negatives) + objective.risky_ssl (the in-modal image and caption terms on the
risky pairs only), with the per-epoch split bclip.epoch_passes.safeclip_split. Time: about that of
the MMCL+SSL run (18-20 h on 8xA100 for 64 epochs, so about 9-10 h for these 32), plus one
embedding pass over the 3M pairs per epoch after the warm-ups.

What the published code (BigML-CS-UCLA/SafeCLIP, src/parser.py and src/main.py) runs, and how this
config follows it:
  - 32 epochs; AdamW lr 5e-4 for both the in-modal and the cross-modal epochs (--in_lr, --cross_lr),
    weight decay 0.1, 10,000 warm-up steps then cosine; batch 128 per GPU. Here: 32 epochs, lr
    5e-4, weight decay 0.1, 10,000 warm-up steps, global batch 1,024. (The code builds a new
    warm-up + cosine schedule after the warm-up epochs, sized to the split epochs' shrunken
    loaders; here one schedule spans the run.)
  - 5 epochs of in-modal warm-up on every pair (image-image and caption-caption contrastive terms
    on augmented views): epoch_passes.safeclip.inmodal_warmup_epochs = 5 (all pairs risky).
  - 1 epoch of the CLIP loss on every pair at a constant learning rate of 5e-6 (--filter_lr), so
    that the few poisoned pairs are not yet learned: multimodal_warmup_epochs = 1 (all pairs safe)
    and optim.epoch_learning_rates = {5: 5e-6} (epoch_passes.safeclip_learning_rates). That
    epoch's steps still count in the cosine schedule, as in the code, which sets each step's rate
    from its epoch and batch index.
  - Then before every epoch: the cosine similarity of each pair's image and caption embeddings under
    the current model, a 2-component Gaussian mixture fitted to them, and the pairs ranked by their
    posterior of the higher-mean component. In the first such epoch the safe set is the pairs with
    posterior >= 0.9; afterwards it is the top share of the ranking, growing by 1 % an epoch up to
    85 % (--update_filter_ratio 0.01, --cap_filter_ratio 0.85; --filter_ratio 0.15 is the starting
    share of the paper's description). Here: the top `safe_share_start` = 15 % by cosine similarity,
    + `safe_share_step` = 1 % an epoch, capped at `safe_share_cap` = 85 %. The mixture is left out:
    its posterior ranks pairs as the similarity does when its two components have equal spread.
  - The code trains the risky pairs (in-modal loss) and the safe pairs (CLIP loss on augmented
    views) as two passes over separate loaders each epoch; here each batch holds both and the two
    masked terms are summed, each normalised by its own pairs. The code's optional nearest-neighbour
    memory bank for in-modal positives (--memory_bank) is not used.
"""

import os

import ml_collections

from bclip import config as run_configs
from bclip import epoch_passes, objectives

_HERE = os.path.dirname(os.path.abspath(__file__))

# The published code's defaults (src/parser.py).
SAFECLIP_OPTIONS = {
    "inmodal_warmup_epochs": 5,
    "multimodal_warmup_epochs": 1,
    "safe_share_start": 0.15,
    "safe_share_step": 0.01,
    "safe_share_cap": 0.85,
}


def get_config(arg: str = "cc3m") -> ml_collections.ConfigDict:
    if arg != "cc3m":
        raise ValueError(f"pretrain_safeclip_cc takes 'cc3m', got {arg!r}")
    pretrain_cc = run_configs.load_config_file(os.path.join(_HERE, "pretrain_cc.py"))
    config = pretrain_cc.get_config("cc3m_mmcl_ssl")
    objective = objectives.objective_config(mmcl=0.0, safe_mmcl=1.0, risky_ssl=1.0)
    config = run_configs.override(config, {
        **{f"objective.{key}": value for key, value in objective.items()},
        "optim.learning_rate": 5e-4,
        "optim.weight_decay": 0.1,
        "optim.warmup_steps": 10_000,
        "train.num_epochs": 32,
    })
    run_configs.enable_epoch_pass(config, "safeclip", **SAFECLIP_OPTIONS)
    return run_configs.override(config, {"optim.epoch_learning_rates": epoch_passes.safeclip_learning_rates(SAFECLIP_OPTIONS)})
