"""Targeted poisoning (Carlini & Terzis, "Poisoning and Backdooring Contrastive Learning", ICLR
2022) of CLIP RN50 pretraining on CC3M or CC6M: one chosen ImageNet validation image is to be
classified as a chosen wrong class.

  python -m bclip.main --config configs/targeted_cc.py:cc3m_mmcl --workdir gs://BUCKET/bclip/cc3m_targeted_0 \
    --config.data.train_csv=/data/cc3m/train.csv \
    --config.data.tokenizer.path=/data/clip/bpe_simple_vocab_16e6.txt.gz \
    --config.eval.sets.imagenet.path=/data/imagenet/val \
    --config.poison.targeted.images=/data/imagenet/val --config.poison.seed=0

`arg` is a run of configs/pretrain_cc.py (cc3m_mmcl, cc3m_mmcl_ssl, cc6m_mmcl, cc6m_mmcl_ssl): its
data, model, optimiser, 64 epochs and zero-shot ImageNet evaluation after every epoch, with the
backdoor off (poison.count 0) and targeted poisoning on: one image of the ImageNet validation folder
drawn by poison.seed, a target class drawn by the same seed among the 999 others, and 3 training
pairs replaced by (that image, a CC3M caption naming the class). The "targeted" eval set reports
targeted/success_rate (1 or 0 for one image) after every epoch. The paper's rate is over many
runs: sweep poison.seed (each seed draws another image, class and set of replaced pairs). Time: the
pretraining run's (12-14 h for CC3M MMCL on 8xA100).

The published setting, and where this config differs:
  - CC3M (and a 15M YFCC subset); CLIP RN50 image tower and Transformer text tower; batch 1,024 on
    8 V100s, 30 epochs, learning rate 2e-4, momentum SGD, weight decay 0.02. Here the study's
    pretraining (AdamW lr 1e-3, weight decay 0.1, 64 epochs, batch 2,048 or 1,024), so that the
    targeted model is comparable with the study's backdoored ones; bclip has no SGD optimiser.
  - Each run: a random target image from the Conceptual Captions validation set and a random target
    class of ImageNet. Here the image comes from the ImageNet validation folder, whose labels let
    the target be drawn among the classes other than the image's own.
  - The poisons are (target image, caption) for captions from the training set that contain the
    class name (poison.targeted.captions="training_captions"); 3 of 3M pairs (0.0001 %) suffice
    for the attack to succeed (the paper's abstract). A class that no CC3M caption names stops the
    run with an error naming it; captions="templates" uses the 80 ImageNet prompt templates instead.
  - Success: the image's zero-shot top-1 is the target class.
"""

import os

import ml_collections

from bclip import config as run_configs

_HERE = os.path.dirname(os.path.abspath(__file__))

NUM_IMAGES = 1
COPIES = 3


def get_config(arg: str = "cc3m_mmcl") -> ml_collections.ConfigDict:
    pretrain_cc = run_configs.load_config_file(os.path.join(_HERE, "pretrain_cc.py"))
    config = pretrain_cc.get_config(arg)
    return run_configs.override(config, {
        "poison.count": 0,  # one attack per run: the backdoor is off
        # Required: --config.poison.targeted.images=/path/to/imagenet/val (the eval folder).
        "poison.targeted.images": "",
        "poison.targeted.num_images": NUM_IMAGES,
        "poison.targeted.copies": COPIES,
        "poison.targeted.captions": "training_captions",
        "eval.sets.targeted.evaluator": "targeted",
    })
