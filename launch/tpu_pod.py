"""Runs bclip on every worker of a Cloud TPU pod slice through `gcloud ... tpu-vm ssh --worker=all`,
optionally creating the slice and installing bclip on it first.

  python launch/tpu_pod.py --name my-pod --zone us-central2-b [--project P] \
      [--create --accelerator_type v4-32 --version tpu-ubuntu2204-base] \
      [--install git --repo https://github.com/ORG/bclip.git --ref main | --install copy --source .] \
      --config configs/X.py:arg --workdir gs://BUCKET/runs/x [--config.optim.learning_rate=1e-4 ...] [--dry_run]

Every worker runs the same `python -m bclip.main`; JAX finds the pod topology itself, so the
workdir must be one all workers can write (gs://). The config path is relative to the copy on
the workers. Flags after `--`, and any `--config.KEY=VALUE`, go to bclip.main unchanged.
With --dry_run the commands are printed, one per line, and nothing runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile


def split_main_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher arguments, flags for bclip.main): everything after `--`, and `--config.*` flags."""
    if "--" in argv:
        at = argv.index("--")
        argv, after = argv[:at], argv[at + 1 :]
    else:
        after = []
    own = [arg for arg in argv if not arg.startswith("--config.")]
    return own, [arg for arg in argv if arg.startswith("--config.")] + after


def pod_parser(**kwargs) -> argparse.ArgumentParser:
    """The pod and how bclip gets onto it: shared by single runs and sweeps."""
    parser = argparse.ArgumentParser(allow_abbrev=False, **kwargs)
    parser.add_argument("--name", required=True, help="TPU VM name.")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None)
    parser.add_argument("--create", action="store_true", help="Create the TPU VM first.")
    parser.add_argument("--accelerator_type", default=None, help="For --create, e.g. v4-32 or v5litepod-16.")
    parser.add_argument("--version", default=None, help="For --create: the runtime, e.g. tpu-ubuntu2204-base.")
    parser.add_argument("--spot", action="store_true", help="For --create: a spot (preemptible) VM.")
    parser.add_argument(
        "--install", choices=("git", "copy", "none"), default="none",
        help="git: fetch --repo at --ref on each worker; copy: upload --source; none: already there.",
    )
    parser.add_argument("--repo", default=None, help="Git URL for --install git.")
    parser.add_argument("--ref", default="main", help="Branch, tag or commit for --install git.")
    parser.add_argument("--source", default=".", help="Local checkout for --install copy.")
    parser.add_argument("--remote_dir", default="bclip", help="Checkout folder on the workers (relative to home).")
    parser.add_argument("--python", default="python3", help="Python on the workers.")
    parser.add_argument("--pip_packages", default="jax[tpu]", help="Installed next to bclip (space separated).")
    parser.add_argument(
        "--constraints", default="constraints.txt",
        help="Pinned versions for the install, relative to the copy on the workers; '' installs the newest.",
    )
    return parser


def _gcloud(args: argparse.Namespace, *subcommand: str) -> list[str]:
    command = ["gcloud", "compute", "tpus", "tpu-vm", *subcommand, "--zone", args.zone]
    if args.project:
        command += ["--project", args.project]
    return command


def ssh_all_workers(args: argparse.Namespace, remote_command: str) -> list[str]:
    return _gcloud(args, "ssh", args.name) + ["--worker=all", "--command", remote_command]


def create_command(args: argparse.Namespace) -> list[str]:
    if not args.accelerator_type or not args.version:
        raise ValueError("--create needs --accelerator_type and --version")
    command = _gcloud(args, "create", args.name) + [
        "--accelerator-type", args.accelerator_type, "--version", args.version,
    ]
    return command + (["--spot"] if args.spot else [])


def _pip_install(args: argparse.Namespace) -> str:
    packages = args.pip_packages.split()
    # The gcs extra brings google-cloud-storage, which Orbax needs for gs:// checkpoints.
    command = [args.python, "-m", "pip", "install", "--quiet", "-e", f"{args.remote_dir}[gcs]", *packages]
    if args.constraints:
        # The versions the tests passed with (jax[tpu] then brings the libtpu of the pinned jax).
        command += ["-c", os.path.join(args.remote_dir, args.constraints)]
    return shlex.join(command)


def _local_archive(args: argparse.Namespace) -> str:
    return os.path.join(tempfile.gettempdir(), f"bclip-{args.name}.tar.gz")


def install_commands(args: argparse.Namespace) -> list[list[str]]:
    """Commands that put bclip on every worker (run here, in order)."""
    remote_dir = shlex.quote(args.remote_dir)
    if args.install == "none":
        return []
    if args.install == "git":
        if not args.repo:
            raise ValueError("--install git needs --repo")
        # fetch + checkout works for a branch, a tag or a commit, on a fresh or an existing folder.
        fetch = " && ".join([
            f"mkdir -p {remote_dir}",
            f"cd {remote_dir}",
            "git init --quiet",
            f"(git remote add origin {shlex.quote(args.repo)} || git remote set-url origin {shlex.quote(args.repo)})",
            f"git fetch --quiet --depth 1 origin {shlex.quote(args.ref)}",
            "git checkout --quiet --force FETCH_HEAD",
            "cd",
            _pip_install(args),
        ])
        return [ssh_all_workers(args, fetch)]
    archive = _local_archive(args)
    pack = ["tar", "-czf", archive, "--exclude=.git", "--exclude=__pycache__", "--exclude=*.egg-info",
            "--exclude=venv", "--exclude=.venv", "-C", args.source, "."]
    upload = _gcloud(args, "scp", archive, f"{args.name}:bclip.tar.gz") + ["--worker=all"]
    unpack = " && ".join([
        f"mkdir -p {remote_dir}", f"tar -xzf bclip.tar.gz -C {remote_dir}", "rm bclip.tar.gz", _pip_install(args),
    ])
    return [pack, upload, ssh_all_workers(args, unpack)]


def run_command(args: argparse.Namespace, config: str, workdir: str, main_flags: list[str]) -> list[str]:
    """The ssh command that starts one run of bclip.main on all workers and waits for it."""
    main = shlex.join([args.python, "-m", "bclip.main", "--config", config, "--workdir", workdir, *main_flags])
    return ssh_all_workers(args, f"cd {shlex.quote(args.remote_dir)} && BCLIP_BACKEND=tpu {main}")


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
    return ([create_command(args)] if args.create else []) + install_commands(args)


def run_all(commands: list[list[str]], dry_run: bool) -> int:
    """Runs the commands in order, stopping at the first failure; dry_run prints them."""
    for command in commands:
        if dry_run:
            print(shlex.join(command))
            continue
        print(f"+ {shlex.join(command)}", flush=True)
        returncode = subprocess.run(command, check=False).returncode
        if returncode != 0:
            print(f"failed with exit code {returncode}: {shlex.join(command)}", file=sys.stderr)
            return returncode
    return 0


def main(argv: list[str] | None = None) -> int:
    own, main_flags = split_main_flags(sys.argv[1:] if argv is None else argv)
    parser = pod_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="Config file (path on the workers), optionally ':arg'.")
    parser.add_argument("--workdir", required=True, help="Run folder all workers share, e.g. gs://bucket/run.")
    parser.add_argument("--dry_run", action="store_true", help="Print the commands; run nothing.")
    args = parser.parse_args(own)
    if "://" not in args.workdir:
        print(f"warning: --workdir {args.workdir} is a local path: each worker writes its own copy; "
              "use gs://... unless the workers share a filesystem", file=sys.stderr)
    try:
        commands = setup_commands(args) + [run_command(args, args.config, args.workdir, main_flags)]
    except ValueError as error:
        parser.error(str(error))
    return run_all(commands, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
