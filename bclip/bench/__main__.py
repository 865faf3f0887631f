"""`python -m bclip.bench`: see bclip/bench/__init__.py."""

if __name__ == "__main__":
    # First, before the heavy imports below: on a CPU host this restarts the command with a glibc
    # heap that keeps XLA's step buffers mapped (see bclip/cpu_runtime.py).
    from bclip import cpu_runtime

    cpu_runtime.reexec_with_retained_heap()

import argparse
import json
import sys

import bclip.bench
from bclip.bench import data, step, sweep, versus_open_clip
from bclip.data import tokenizer as tokenizer_lib
from bclip.models import clip


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"]:  # its own flags: python -m bclip.bench sweep --help
        sweep.main(argv[1:])
        return
    if argv[:1] == ["versus_open_clip"]:  # its own flags too
        versus_open_clip.main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m bclip.bench", description=bclip.bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("sweep", help="vectorised sweeps against separate runs (its flags: sweep --help)")
    commands.add_parser("versus_open_clip", help="the train step against open_clip's, alternating (its flags: versus_open_clip --help)")
    step_parser = commands.add_parser("step", help="time the jitted train step")
    step_parser.add_argument("--model", default="tiny-vit", choices=sorted(clip.PRESETS))
    step_parser.add_argument("--batch_size", type=int, default=128)
    step_parser.add_argument("--objective", default="mmcl", choices=sorted(step.OBJECTIVES))
    step_parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    step_parser.add_argument("--params_sharding", default="replicated", choices=["replicated", "fsdp"])
    step_parser.add_argument("--steps", type=int, default=10)
    step_parser.add_argument(
        "--views_on_device", action="store_true",
        help="with an SSL objective: send view keys and make the AutoAugment views in the step",
    )
    step_parser.add_argument(
        "--warmup_steps", type=int, default=3, help="untimed steps first, at least; more while the heap grows"
    )
    step_parser.add_argument(
        "--max_warmup_steps", type=int, default=10,
        help="untimed steps at most: warm-up goes on until 3 steps in a row each fault in at most 1,000 pages",
    )
    data_parser = commands.add_parser("data", help="time the input pipeline against a bare Pillow loop")
    data_parser.add_argument("--data_dir", default="/tmp/bclip_bench_world", help="synthetic world to write or reuse")
    data_parser.add_argument("--csv", default="", help="a real image-caption CSV instead of the synthetic world")
    data_parser.add_argument("--tokenizer_kind", default="word", choices=sorted(tokenizer_lib.TOKENIZER_BUILDERS))
    data_parser.add_argument("--tokenizer_path", default="", help="with --csv: vocabulary or BPE merges file")
    data_parser.add_argument("--synonyms", default="wordnet", help="with --csv: 'wordnet' or a JSON lexicon")
    data_parser.add_argument("--image_size", type=int, default=224)
    data_parser.add_argument("--source_size", type=int, default=0, help="side of the world's JPEGs (0: image_size)")
    data_parser.add_argument("--num_images", type=int, default=2000)
    data_parser.add_argument("--batch_size", type=int, default=64)
    data_parser.add_argument("--workers", default="0,1,2", help="comma-separated Grain worker counts")
    data_parser.add_argument("--threads", default="1", help="comma-separated data.num_threads values")
    data_parser.add_argument("--settings", default=",".join(data.DATA_SETTINGS), help="comma-separated, from: " + ", ".join(data.DATA_SETTINGS))
    data_parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    views_parser = commands.add_parser("views", help="time AutoAugment views made on device (data.views_on_device)")
    views_parser.add_argument("--image_size", type=int, default=224)
    views_parser.add_argument("--batch_size", type=int, default=64)
    views_parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.command == "step":
        print(json.dumps(step.bench_step(args)), flush=True)
    elif args.command == "views":
        print(json.dumps(data.bench_views(args)), flush=True)
    elif args.command == "data":
        for result in data.bench_data(args):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
