"""`python -m bclip.sweep`: see bclip/sweep/__init__.py."""

if __name__ == "__main__":
    # First, before the heavy imports below: on a CPU host this restarts the command with a glibc
    # heap that keeps XLA's step buffers mapped (see bclip/cpu_runtime.py).
    from bclip import cpu_runtime

    cpu_runtime.reexec_with_retained_heap()

import argparse
import sys
from collections.abc import Sequence

import bclip.sweep
from bclip import config as run_configs
from bclip import distributed
from bclip.sweep.execute import MODES, run_one_from_plan, sweep


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher_argv: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, launcher_argv = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m bclip.sweep", description=bclip.sweep.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )
    parser.add_argument("--config", help="Config file defining get_config and get_sweep, optionally ':arg'.")
    parser.add_argument("--workdir", help="Root folder; each run gets a sub-folder.")
    parser.add_argument("--mode", choices=MODES, default="local")
    parser.add_argument("--parallel", type=int, default=1, help="Runs at once (local subprocesses / array tasks).")
    parser.add_argument("--vectorize", action="store_true",
                        help="Train the runs together as one vmapped program on one input stream (local mode).")
    parser.add_argument("--dry_run", action="store_true", help="Print what would run; run and write nothing.")
    parser.add_argument("--plan", help="Array-task mode: a sweep.json written by an earlier sweep.")
    parser.add_argument("--run_index", type=int, help="Array-task mode: which run of --plan.")
    args = parser.parse_args(argv)
    if args.plan is not None or args.run_index is not None:
        if args.plan is None or args.run_index is None:
            parser.error("--plan and --run_index go together")
        return run_one_from_plan(args.plan, args.run_index)
    if not args.config or not args.workdir:
        parser.error("--config and --workdir are required")
    if args.mode == "local" and args.parallel == 1 and not args.dry_run:
        distributed.initialize()  # Multi-host JAX when started on every host; else nothing.
    try:
        return sweep(args.config, args.workdir, args.mode, args.parallel, args.dry_run, launcher_argv,
                     vectorize=args.vectorize)
    except (run_configs.UnknownOverrideError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
