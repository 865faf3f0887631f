"""Command-line entry point for one run (pretraining or cleaning):

  python -m bclip.main --config configs/synthetic.py:pretrain_mmcl --workdir /tmp/run \
      [--config.optim.learning_rate=1e-4 ...]

Overrides are checked against the config: an unknown key is an error.
"""

if __name__ == "__main__":
    # First, before the heavy imports below: on a CPU host this restarts the command with a glibc
    # heap that keeps XLA's step buffers mapped (see bclip/cpu_runtime.py).
    from bclip import cpu_runtime

    cpu_runtime.reexec_with_retained_heap()

from absl import app, flags, logging
from ml_collections import config_flags

from bclip import distributed, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (optionally ':arg').")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize()
    logging.info("Config:\n%s", _CONFIG.value)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
