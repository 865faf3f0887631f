"""A cleaning sweep of the tiny poisoned run (configs/tiny.py): CleanCLIP at four learning rates,
each with SSL weight 1 and then 2, on 1,024 clean pairs for 2 epochs; the runs differ only in
scalars, so they can train as one vectorised program.

  python -m bclip.data.synthetic --out runs/world --image_size 32 --num_train 2000
  python -m bclip.main --config configs/tiny.py:runs/world --workdir runs/tiny
  python -m bclip.sweep --config configs/clean_tiny.py:runs/world,runs/tiny --workdir runs/tiny_clean --vectorize

`arg` is "WORLD,PRETRAINED[,NUM_RUNS]": the world's directory, the pretraining run's directory and
optionally how many of the sweep's 8 runs to keep (the first ones). On 2 CPU cores, 8 runs take
130–290 s one after another (without --vectorize) and 50–105 s with it, depending on the host;
`python -m bclip.bench sweep --end_to_end --num_runs N` times both ways.
"""

import os

import ml_collections

from bclip import config as run_configs


LEARNING_RATES = (2e-4, 5e-4, 1e-3, 2e-3)
SSL_WEIGHTS = (1.0, 2.0)


def _parse(arg: str) -> tuple[str, str, int | None]:
    parts = arg.split(",")
    if len(parts) not in (2, 3):
        raise ValueError(f"clean_tiny takes 'WORLD,PRETRAINED[,NUM_RUNS]', got {arg!r}")
    return parts[0], parts[1], int(parts[2]) if len(parts) == 3 else None


def get_config(arg: str = "runs/world,runs/tiny") -> ml_collections.ConfigDict:
    world, pretrained, _ = _parse(arg)
    # The pretraining config itself, so the model always fits the checkpoint it starts from.
    tiny = run_configs.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    config = tiny.get_config(world)
    config.objective.mmcl_weight = 1.0
    config.objective.ssl_weight = 1.0
    config.optim.learning_rate = 5e-4
    config.optim.warmup_steps = 5
    config.poison.count = 0  # the cleaning set is clean; the trigger stays set to measure ASR
    config.train.init_from = pretrained
    config.train.exclude_indices_file = os.path.join(pretrained, "poison_indices.json")
    config.train.subset_size = 1024
    config.train.num_epochs = 2
    config.train.log_every_steps = 8
    return config


def get_sweep(arg: str = "runs/world,runs/tiny") -> list[dict]:
    """CleanCLIP at every learning rate first, then the same with SSL weight 2."""
    _, _, num_runs = _parse(arg)
    runs = [
        {"optim.learning_rate": learning_rate, "objective.ssl_weight": ssl_weight}
        for ssl_weight in SSL_WEIGHTS
        for learning_rate in LEARNING_RATES
    ]
    return runs[:num_runs]
