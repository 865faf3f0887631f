"""Runs bclip on a SLURM cluster: writes an sbatch script (one process per GPU, any number of
nodes) and submits it; sweeps use its array-job mode, one array task per run.

  python launch/slurm.py --config configs/X.py:arg --workdir /shared/runs/x \
      --nodes 2 --gpus_per_node 8 --partition gpu --time 24:00:00 \
      --setup "source /shared/venv/bin/activate" [--config.optim.learning_rate=1e-4 ...] [--dry_run]

Flags after `--`, and any `--config.KEY=VALUE`, go to `python -m bclip.main` unchanged.
With --dry_run the script and the sbatch command are printed and nothing is written or run.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

# Each job picks its coordinator port from its own id, so jobs sharing a node do not collide.
_PORT_FROM_JOB_ID = "$((20000 + SLURM_JOB_ID % 20000))"


def split_main_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher arguments, flags for bclip.main): everything after `--`, and `--config.*` flags."""
    if "--" in argv:
        at = argv.index("--")
        argv, after = argv[:at], argv[at + 1 :]
    else:
        after = []
    own = [arg for arg in argv if not arg.startswith("--config.")]
    return own, [arg for arg in argv if arg.startswith("--config.")] + after


def add_resource_flags(parser: argparse.ArgumentParser) -> None:
    """The job's shape and environment: shared by single runs and sweep array jobs."""
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", type=int, default=8, help="0 for CPU nodes (one process per node).")
    parser.add_argument("--cpus_per_task", type=int, default=None)
    parser.add_argument("--mem", default=None, help="Memory per node, e.g. 200G.")
    parser.add_argument("--time", default=None, help="Wall-clock limit, e.g. 24:00:00.")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--qos", default=None)
    parser.add_argument("--job_name", default="bclip")
    parser.add_argument(
        "--sbatch_option", action="append", default=[], metavar="KEY=VALUE",
        help="Any other sbatch option, e.g. constraint=a100 (repeatable).",
    )
    parser.add_argument(
        "--setup", action="append", default=[], metavar="SHELL_LINE",
        help="A shell line run before the processes start, e.g. 'module load cuda' (repeatable).",
    )
    parser.add_argument(
        "--python", default=sys.executable,
        help="Python on the compute nodes (default: this one, assuming a shared filesystem).",
    )


def _directive(key: str, value: object) -> str:
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError(f"sbatch option {key}={text!r} contains a line break")
    return f"#SBATCH --{key}={shlex.quote(text)}"


def sbatch_directives(resources: argparse.Namespace, output: str, array: str | None = None) -> list[str]:
    processes_per_node = resources.gpus_per_node if resources.gpus_per_node > 0 else 1
    options: list[tuple[str, object]] = [
        ("job-name", resources.job_name),
        ("nodes", resources.nodes),
        # One process per GPU: each task keeps the GPU numbered SLURM_LOCALID (bclip.distributed).
        ("ntasks-per-node", processes_per_node),
    ]
    if resources.gpus_per_node > 0:
        options.append(("gpus-per-node", resources.gpus_per_node))
    for key in ("cpus_per_task", "mem", "time", "partition", "account", "qos"):
        value = getattr(resources, key)
        if value is not None:
            options.append((key.replace("_", "-"), value))
    options.append(("output", output))
    options.append(("chdir", os.getcwd()))
    if array is not None:
        options.append(("array", array))
    for option in resources.sbatch_option:
        key, equals, value = option.partition("=")
        if not equals or not re.fullmatch(r"[a-z][a-z0-9-]*", key.lstrip("-")):
            raise ValueError(f"--sbatch_option {option!r}: expected KEY=VALUE, e.g. constraint=a100")
        options.append((key.lstrip("-"), value))
    return [_directive(key, value) for key, value in options]


def sbatch_script(resources: argparse.Namespace, command: str, output: str, array: str | None = None) -> str:
    """The whole script. `command` is one shell line, already quoted, that every task runs."""
    backend = "gpu" if resources.gpus_per_node > 0 else "cpu"
    # No `set -u`: some environment set-up scripts (conda's activate) read unset variables.
    lines = ["#!/bin/bash", *sbatch_directives(resources, output, array), "", "set -eo pipefail"]
    lines += list(resources.setup)
    lines += [
        "",
        "# Process 0 runs on the first node and hosts the coordinator; the process count and",
        "# each process's id come from SLURM_NTASKS / SLURM_PROCID inside srun.",
        'coordinator_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f'export BCLIP_COORDINATOR_ADDRESS="${{coordinator_host}}:{_PORT_FROM_JOB_ID}"',
        f"export BCLIP_BACKEND={backend}",
        "",
        f"srun --kill-on-bad-exit=1 {command}",
        "",
    ]
    return "\n".join(lines)


def run_command(python: str, config: str, workdir: str, main_flags: list[str]) -> str:
    return shlex.join([python, "-m", "bclip.main", "--config", config, "--workdir", workdir, *main_flags])


def array_command(python: str, plan_path: str) -> str:
    # The task id is the only thing the shell fills in; each run's overrides are read by Python
    # from the plan file, never pasted into the script.
    return shlex.join([python, "-m", "bclip.sweep", "--plan", plan_path, "--run_index"]) + ' "$SLURM_ARRAY_TASK_ID"'


def array_spec(indices: list[int], parallel: int = 0) -> str:
    """sbatch --array value: [0, 1, 2, 5] with parallel=4 -> "0-2,5%4" (at most 4 at once)."""
    if not indices:
        raise ValueError("an array job needs at least one index")
    parts, sorted_indices = [], sorted(set(indices))
    start = previous = sorted_indices[0]
    for index in sorted_indices[1:] + [None]:
        if index is not None and index == previous + 1:
            previous = index
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if index is not None:
            start = previous = index
    spec = ",".join(parts)
    return f"{spec}%{parallel}" if parallel > 0 else spec


def submit(script: str, script_path: str, dry_run: bool) -> int:
    """Writes the script and runs sbatch on it; with dry_run prints both instead."""
    sbatch = ["sbatch", script_path]
    if dry_run:
        print(f"# {script_path}")
        print(script)
        print(shlex.join(sbatch))
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(script_path)), exist_ok=True)
    with open(script_path, "w") as f:
        f.write(script)
    return subprocess.run(sbatch, check=False).returncode


def submit_run(resources: argparse.Namespace, config: str, workdir: str, main_flags: list[str], dry_run: bool) -> int:
    """One multi-node run of bclip.main."""
    workdir = os.path.abspath(workdir)
    if not dry_run:
        os.makedirs(workdir, exist_ok=True)  # SLURM does not create the --output folder.
    command = run_command(resources.python, config, workdir, main_flags)
    script = sbatch_script(resources, command, output=os.path.join(workdir, "slurm-%j.out"))
    return submit(script, os.path.join(workdir, "job.sbatch"), dry_run)


def submit_array(
    resources: argparse.Namespace, plan_path: str, indices: list[int], parallel: int, dry_run: bool
) -> int:
    """One array task per sweep run: task i runs run i of the plan file written by bclip.sweep."""
    root = os.path.dirname(os.path.abspath(plan_path))
    command = array_command(resources.python, os.path.abspath(plan_path))
    script = sbatch_script(
        resources, command, output=os.path.join(root, "slurm-%A_%a.out"), array=array_spec(indices, parallel)
    )
    return submit(script, os.path.join(root, "sweep.sbatch"), dry_run)


def resource_parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, **kwargs)
    add_resource_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    own, main_flags = split_main_flags(sys.argv[1:] if argv is None else argv)
    parser = resource_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="Config file, optionally with ':arg'.")
    parser.add_argument("--workdir", required=True, help="Run folder on the shared filesystem.")
    parser.add_argument("--dry_run", action="store_true", help="Print the script and command; run nothing.")
    args = parser.parse_args(own)
    return submit_run(args, args.config, args.workdir, main_flags, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
