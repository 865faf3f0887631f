"""bclip's train step against open_clip's on the same CLIP, in alternating rounds on this host:

  python -m bclip.bench versus_open_clip --torch_python /path/to/venv-with-torch/bin/python \\
      [--model tiny-vit --batch_size 128 --objectives mmcl,mmcl_ssl --rounds 4]

Each round runs `python -m bclip.bench step` and bclip/bench/open_clip_step.py (under
--torch_python, a Python with torch and open_clip) once per objective, each in a fresh process,
one after the other, so a shared host's load falls on both alike. Prints each measurement as a
JSON line, then a table of pairs/s per round with bclip's ratio to open_clip's, and the host's CPU.
"""

import argparse
import json
import os
import subprocess
import sys

from bclip import cpu_runtime

OPEN_CLIP_SCRIPT = os.path.join(os.path.dirname(__file__), "open_clip_step.py")


def _last_json_line(output: str, command: list[str]) -> dict:
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{' '.join(command)} printed no result:\n{output[-2000:]}")


def _run(command: list[str], env: dict | None = None) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return _last_json_line(done.stdout, command)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bclip.bench versus_open_clip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch_python", required=True, help="A Python with torch and open_clip installed.")
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--objectives", default="mmcl,mmcl_ssl", help="comma-separated: mmcl, mmcl_ssl")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    common = ["--model", args.model, "--batch_size", str(args.batch_size), "--steps", str(args.steps)]
    rows = []
    for round_number in range(1, args.rounds + 1):
        for objective in args.objectives.split(","):
            ours = _run([sys.executable, "-m", "bclip.bench", "step", *common, "--objective", objective])
            # open_clip as its users run it: without the heap settings bclip's commands give themselves.
            default_heap = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", cpu_runtime.RETAINED_HEAP_ENV)}
            theirs = _run([args.torch_python, OPEN_CLIP_SCRIPT, *common, "--objective", objective], env=default_heap)
            print(json.dumps(ours), json.dumps(theirs), sep="\n", flush=True)
            rows.append((round_number, objective, ours["pairs_per_s"], theirs["pairs_per_s"], ours["minor_faults_per_step"]))
    cpu = cpu_runtime.host_cpu()
    print(f"\n{cpu['cpu_model']} ({cpu['cpu_isa']}), {os.cpu_count()} cores; {args.model}, batch {args.batch_size}, fp32")
    print("| round | objective | bclip pairs/s | open_clip pairs/s | bclip / open_clip | bclip minor faults/step |")
    print("|---|---|---|---|---|---|")
    for round_number, objective, ours, theirs, faults in rows:
        print(f"| {round_number} | {objective} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} | {faults:.0f} |")
    return 0
