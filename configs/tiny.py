"""A tiny poisoned pretraining run on the synthetic world: the preset tests and smoke runs use.

  python -m bclip.data.synthetic --out runs/world --image_size 32 --num_train 2000
  python -m bclip.main --config configs/tiny.py:runs/world --workdir runs/tiny

`arg` is the world's directory (written by bclip.data.synthetic). About a minute on 2 CPU cores.
"""

import os

import ml_collections

from bclip import config as run_configs


def get_config(arg: str = "runs/world") -> ml_collections.ConfigDict:
    world = arg
    config = run_configs.run_config(
        "micro-vit",
        image={"size": 32, "patch_size": 4, "width": 32, "layers": 2, "heads": 2},
        text={"context_length": 24, "vocab_size": 256, "width": 32, "layers": 2, "heads": 2},
        embed_dim=32,
    )
    config.data.train_csv = os.path.join(world, "train", "train.csv")
    config.data.tokenizer.path = os.path.join(world, "vocab.txt")
    config.data.synonyms = os.path.join(world, "synonyms.json")
    config.data.batch_size = 64
    config.data.image_augment = "simclr"
    config.poison.count = 100
    config.poison.trigger.patch = "checkerboard"
    config.poison.trigger.size = 8
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 20
    config.train.num_epochs = 2
    config.train.log_every_steps = 10
    config.eval.sets.test.path = os.path.join(world, "test")
    config.eval.batch_size = 96
    return config
