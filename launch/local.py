"""Runs bclip on this machine: one process, or N processes on CPU devices that behave like the
hosts of a multi-host job (for testing the distributed code paths without a cluster).

  python launch/local.py --config configs/X.py:arg --workdir /tmp/run [--config.KEY=VALUE ...]
  python launch/local.py --config configs/X.py:arg --workdir /tmp/run \
      --num_processes 2 --cpu_devices_per_process 4 [--dry_run]

Flags after `--`, and any `--config.KEY=VALUE`, go to `python -m bclip.main` unchanged.
With several processes, process 0 prints to this terminal and process i writes
WORKDIR/logs/process_i.log. --dry_run prints the exact commands (with their environment) instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time


def split_main_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher arguments, flags for bclip.main): everything after `--`, and `--config.*` flags."""
    if "--" in argv:
        at = argv.index("--")
        argv, after = argv[:at], argv[at + 1 :]
    else:
        after = []
    own = [arg for arg in argv if not arg.startswith("--config.")]
    return own, [arg for arg in argv if arg.startswith("--config.")] + after


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def process_commands(
    python: str,
    config: str,
    workdir: str,
    main_flags: list[str],
    num_processes: int = 1,
    cpu_devices_per_process: int = 1,
    port: int = 0,
) -> list[tuple[dict[str, str], list[str]]]:
    """(environment additions, argv) for each process to start."""
    argv = [python, "-m", "bclip.main", "--config", config, "--workdir", workdir, *main_flags]
    if num_processes == 1:
        return [({}, argv)]
    shared = {
        "JAX_PLATFORMS": "cpu",
        "BCLIP_BACKEND": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={cpu_devices_per_process}",
        "BCLIP_COORDINATOR_ADDRESS": f"localhost:{port}",
        "BCLIP_NUM_PROCESSES": str(num_processes),
    }
    return [({**shared, "BCLIP_PROCESS_ID": str(process_id)}, argv) for process_id in range(num_processes)]


def format_command(env: dict[str, str], argv: list[str]) -> str:
    """One shell line that runs argv with env added, e.g. `env A=1 python -m ...`."""
    if not env:
        return shlex.join(argv)
    return shlex.join(["env", *(f"{key}={value}" for key, value in env.items()), *argv])


def run_processes(commands: list[tuple[dict[str, str], list[str]]], workdir: str) -> int:
    """Starts all processes; if one fails the others are stopped (they would wait for it forever)."""
    if len(commands) > 1:
        os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    processes, logs = [], []
    try:
        for process_id, (env, argv) in enumerate(commands):
            output = None
            if process_id > 0:
                output = open(os.path.join(workdir, "logs", f"process_{process_id}.log"), "w")
                logs.append(output)
            errors = subprocess.STDOUT if output else None
            processes.append(subprocess.Popen(argv, env={**os.environ, **env}, stdout=output, stderr=errors))
        while True:
            codes = [process.poll() for process in processes]
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                for process in processes:
                    if process.poll() is None:
                        process.terminate()
                for process in processes:
                    process.wait()
                return failed[0]
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.5)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        for output in logs:
            output.close()


def main(argv: list[str] | None = None) -> int:
    own, main_flags = split_main_flags(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", required=True, help="Config file, optionally with ':arg'.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_processes", type=int, default=1, help=">1: that many CPU processes.")
    parser.add_argument("--cpu_devices_per_process", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="Coordinator port (0: a free one).")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--dry_run", action="store_true", help="Print the commands; run nothing.")
    args = parser.parse_args(own)
    if args.num_processes < 1:
        parser.error("--num_processes must be at least 1")
    port = args.port or (free_port() if args.num_processes > 1 else 0)
    commands = process_commands(
        args.python, args.config, args.workdir, main_flags, args.num_processes, args.cpu_devices_per_process, port
    )
    if args.dry_run:
        for env, command in commands:
            print(format_command(env, command))
        return 0
    return run_processes(commands, args.workdir)


if __name__ == "__main__":
    sys.exit(main())
