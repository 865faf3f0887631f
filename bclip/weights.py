"""Pretrained weights in and out, in open_clip's safetensors layout.

  python -m bclip.weights export --run RUN_DIR --out OUT [--epoch E]
  python -m bclip.weights describe FILE.safetensors [--activation gelu] [--head_width 64]

export writes a finished run's model (its latest checkpoint, or the one saved after epoch E) for
open_clip and CLIP_benchmark. OUT ending in .safetensors is the state dict alone; any other OUT
is a folder with open_clip_model.safetensors and open_clip_config.json, which open_clip loads as
`open_clip.create_model_and_transforms("local-dir:OUT")` (CLIP_benchmark: --model local-dir:OUT).

describe prints the bclip model config of an open_clip file (inferred from its tensor shapes)
and its parameter count: the `model` section a config needs to start from it with
`train.init_from=FILE.safetensors`.
"""

import argparse
import json
import sys
from typing import Sequence

import jax
import ml_collections
from etils import epath

from bclip import checkpointing
from bclip.models import open_clip_layout

MODEL_FILE, CONFIG_FILE = "open_clip_model.safetensors", "open_clip_config.json"


def export_run(run: str, out: str, epoch: int = -1) -> str:
    """Writes `run`'s model to OUT (module docstring) and returns the step directory it read."""
    step_dir = checkpointing.step_dir(run, epoch)
    config = ml_collections.ConfigDict(checkpointing.saved_run_config(step_dir))
    on_host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_host),
        open_clip_layout.abstract_variables(config.model),
    )
    variables, _ = checkpointing.load_model_variables(step_dir, abstract)
    tensors = open_clip_layout.to_open_clip(jax.device_get(variables))
    out = epath.Path(out)
    if out.name.endswith(".safetensors"):
        out.parent.mkdir(parents=True, exist_ok=True)
        open_clip_layout.write(out, tensors)
    else:
        out.mkdir(parents=True, exist_ok=True)
        open_clip_layout.write(out / MODEL_FILE, tensors)
        description = open_clip_layout.open_clip_config(config.model)
        (out / CONFIG_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return step_dir


def describe(path: str, activation: str = "quick_gelu", head_width: int = 64, text_head_width: int = 64) -> dict:
    """{"model": the bclip model config of the open_clip file at `path`, "parameters": its count}."""
    tensors = open_clip_layout.read(path)
    config = open_clip_layout.infer_model_config(tensors, activation, head_width, text_head_width)
    # Building the tables checks that every tensor has its place in that model.
    open_clip_layout.from_open_clip(tensors, open_clip_layout.abstract_variables(config), source=path)
    parameters = sum(tensor.size for name, tensor in tensors.items() if "running_" not in name and "num_batches" not in name)
    return {"model": config.to_dict(), "parameters": int(parameters)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bclip.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="A run's model in open_clip's layout.")
    export.add_argument("--run", required=True, help="A finished run's folder (or its checkpoints or step dir).")
    export.add_argument("--out", required=True, help="FILE.safetensors, or a folder for open_clip's local-dir: loader.")
    export.add_argument("--epoch", type=int, default=-1, help="The checkpoint saved after this epoch (default: the latest).")
    inspect = commands.add_parser("describe", help="The bclip model config of an open_clip safetensors file.")
    inspect.add_argument("file")
    inspect.add_argument("--activation", default="quick_gelu", choices=["quick_gelu", "gelu"],
                         help="quick_gelu for OpenAI's weights (default), gelu for most of open_clip's own.")
    inspect.add_argument("--head_width", type=int, default=64, help="Image tower channels per attention head (default 64).")
    inspect.add_argument("--text_head_width", type=int, default=64, help="Text tower channels per head (default 64).")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            where = export_run(args.run, args.out, args.epoch)
            print(json.dumps({"checkpoint": where, "out": args.out}))
        else:
            print(json.dumps(describe(args.file, args.activation, args.head_width, args.text_head_width), indent=2))
    except (FileNotFoundError, ValueError, checkpointing.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
