"""Benchmarks of vectorised sweeps (a group of runs, bclip.run_group) against the same N runs one
after another. Each prints one JSON line.

Step only: N cleaning runs' train steps as one group's program against N separately jitted
bclip.train_step programs (each a lone run's), on the same batches from the same start:

  python -m bclip.bench sweep --model micro-vit --num_runs 4 --steps 20 --batch_size 32
  python -m bclip.bench sweep --model tiny-vit --num_runs 8 --steps 5 --batch_size 16

End to end: what a researcher waits for. The N runs of configs/clean_tiny.py (CleanCLIP cleaning
of the tiny pretrained model: data, init_from, training, evaluations, checkpoints) done by
`python -m bclip.sweep` as it runs a sweep by default (one run after another) and with
`--vectorize`, each in a fresh process; wall and CPU seconds of each, plus the step-only figures
of the same model for context:

  python -m bclip.bench sweep --end_to_end --num_runs 4 [--workdir /tmp/bench_sweep]

The synthetic world and the pretrained run it cleans are made first (not timed) and kept in
--workdir for the next call. Both sides must end with the same evaluations; the line says how far
apart they are.
"""

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np

from bclip import objectives, optim, run_group, sharding, train_step
from bclip.bench.step import OBJECTIVES, random_batch
from bclip.models import clip

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLEANING_SWEEP_CONFIG = os.path.join(REPO_DIR, "configs", "clean_tiny.py")
PRETRAINING_CONFIG = os.path.join(REPO_DIR, "configs", "tiny.py")


def sweep_values(num_runs: int, objective_template) -> dict[str, np.ndarray]:
    """Per-run hyperparameters spread the way a cleaning sweep spreads them: learning rates 1e-5 to
    1e-4 (log-spaced), weight decay 0 to 0.2 and, when the objective has SSL, its weight 0.5 to 2."""
    values = {
        "learning_rate": np.geomspace(1e-5, 1e-4, num_runs),
        "weight_decay": np.linspace(0.0, 0.2, num_runs),
    }
    if objective_template.ssl_weight:
        # Nonzero in every run, so each sequential run does the same work (SSL views included).
        values["ssl_weight"] = np.linspace(0.5, 2.0, num_runs)
    return values


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# ---------------------------------------------------------------------------------------------
# Step only
# ---------------------------------------------------------------------------------------------


def bench_steps(
    model_config,
    template,
    *,
    num_runs: int,
    steps: int,
    batch_size: int,
    warmup_steps: int = 1,
    repeats: int = 2,
    run_shards: int = 1,
    run_loops: tuple[str, ...] = ("vmap",),
) -> dict:
    """Seconds for `steps` steps of N runs: N separately jitted single-run steps one after another
    against one group's step per `run_loops` entry (run_group.RUN_LOOPS); compile seconds too.

    Returns {"sequential_s", "sequential_compile_s", "vectorised": {run_loop: {"s", "compile_s",
    "speedup", "compile_speedup", "final_loss_max_rel_diff"}}}.
    """
    model = clip.build_model(model_config)
    with_views = objectives.needs_augmented_views(template)
    optim_config = optim.optim_config(warmup_steps=10)
    total_steps = 10_000
    # Sequential runs use every device for data parallelism; the sweep may split the runs over
    # groups of devices (run_shards), each group splitting the batch.
    data_mesh = sharding.make_mesh()
    sweep_mesh = run_group.make_mesh(run_shards)
    groups = {run_loop: run_group.RunGroup(num_runs, sweep_mesh, run_loop) for run_loop in run_loops}
    replicated = sharding.replicated(data_mesh)
    # The "pretrained" start every run cleans from, kept on the host so each round starts afresh.
    variables = jax.device_get(
        train_step.init_variables(model, jax.random.key(0), model_config.image.size, model_config.text.context_length)
    )
    host_batches = [random_batch(model_config, batch_size, with_views, seed=i) for i in range(steps)]
    batches = [jax.device_put(b, sharding.batch_sharding(data_mesh)) for b in host_batches]
    sweep_batches = [jax.device_put(b, sharding.batch_sharding(sweep_mesh)) for b in host_batches]
    rng = jax.device_put(jax.random.key(0), replicated)
    sweep_rng = jax.device_put(jax.random.key(0), sharding.replicated(sweep_mesh))

    # Each run's optim and objective sections, as its config would hold them.
    per_run = sweep_values(num_runs, template)
    run_configs = []
    for run in range(num_runs):
        run_config = ml_collections.ConfigDict({"optim": copy.deepcopy(optim_config), "objective": copy.deepcopy(template)})
        for key, values in per_run.items():
            run_config["optim" if key in optim.HYPERPARAMS else "objective"][key] = float(values[run])
        run_configs.append(run_config)
    hparams = run_group.group_hyperparams(run_configs)

    # ---- Sequential: one program per run, as N separate runs would compile ----------------------
    def fresh_state(tx):
        state = jax.device_get(train_step.init_state(tx, variables))
        return jax.device_put(state, jax.tree.map(lambda _: replicated, state))

    sequential_steps, sequential_compile_s = [], 0.0
    for run_config in run_configs:
        run_optim, run_objective = run_config.optim, run_config.objective
        tx = optim.make_optimizer(run_optim)
        state = fresh_state(tx)
        shardings = jax.tree.map(lambda _: replicated, state)
        jitted = train_step.shard_and_jit_train_step(
            train_step.make_train_step(model, tx, run_objective, run_optim, total_steps), shardings, data_mesh
        )
        run_hparams = train_step.run_hyperparams(run_optim, run_objective)
        seconds, compiled = _timed(lambda: jitted.lower(state, batches[0], rng, run_hparams).compile())
        sequential_compile_s += seconds
        for i in range(warmup_steps):
            state, metrics = compiled(state, batches[i % steps], rng, run_hparams)
        jax.block_until_ready(state)
        sequential_steps.append((tx, compiled, run_hparams))

    def sequential_round():
        states = [fresh_state(tx) for tx, _, _ in sequential_steps]
        jax.block_until_ready(states)
        losses = []

        def train_one_after_another():
            for run, (_, compiled, run_hparams) in enumerate(sequential_steps):
                state = states[run]
                states[run] = None  # donated; lets the run's buffers go once it is done
                for batch in batches:
                    state, metrics = compiled(state, batch, rng, run_hparams)
                jax.block_until_ready(state)
                losses.append(metrics["loss"])

        seconds, _ = _timed(train_one_after_another)
        return seconds, np.asarray(jax.device_get(losses))

    # ---- Vectorised: one program for all runs, per run loop -------------------------------------
    # The group computes every term any run weighs; each run's weights are its hparams.
    group_tx = optim.make_optimizer(optim_config)
    run_step = train_step.make_train_step(model, group_tx, run_group.group_objective(run_configs), optim_config, total_steps)
    single = jax.device_get(train_step.init_state(group_tx, variables))
    run_shardings = jax.tree.map(lambda _: sharding.replicated(sweep_mesh), single)

    def fresh_states(group):
        return group.replicate(jax.device_put(single, run_shardings), run_shardings)

    vectorised_programs = {}
    for run_loop, group in groups.items():
        step = group.jit_step(run_step, run_shardings)
        hparams_on_device = group.hyperparams(hparams)
        states = fresh_states(group)
        compile_s, compiled = _timed(lambda: step.lower(states, sweep_batches[0], sweep_rng, hparams_on_device).compile())
        for i in range(warmup_steps):
            states, _ = compiled(states, sweep_batches[i % steps], sweep_rng, hparams_on_device)
        jax.block_until_ready(states)
        vectorised_programs[run_loop] = (compiled, compile_s, hparams_on_device)

    def vectorised_round(run_loop):
        compiled, _, hparams_on_device = vectorised_programs[run_loop]
        states = fresh_states(groups[run_loop])
        jax.block_until_ready(states)

        def train_together():
            nonlocal states
            for batch in sweep_batches:
                states, metrics = compiled(states, batch, sweep_rng, hparams_on_device)
            jax.block_until_ready(states)
            return metrics["loss"]

        seconds, losses = _timed(train_together)
        return seconds, np.asarray(jax.device_get(losses))

    # ---- Timing: interleaved rounds, best kept --------------------------------------------------
    sequential_s = float("inf")
    vectorised_s = {run_loop: float("inf") for run_loop in run_loops}
    vectorised_losses = {}
    for round_index in range(repeats):
        # Alternate which side goes first so a burst of outside load does not always hit one side.
        sides = ["sequential", *run_loops]
        for side in sides if round_index % 2 == 0 else sides[::-1]:
            if side == "sequential":
                seconds, sequential_losses = sequential_round()
                sequential_s = min(sequential_s, seconds)
            else:
                seconds, vectorised_losses[side] = vectorised_round(side)
                vectorised_s[side] = min(vectorised_s[side], seconds)

    return {
        "sequential_s": sequential_s,
        "sequential_compile_s": sequential_compile_s,
        "vectorised": {
            run_loop: {
                "s": vectorised_s[run_loop],
                "compile_s": vectorised_programs[run_loop][1],
                "speedup": sequential_s / vectorised_s[run_loop],
                "compile_speedup": sequential_compile_s / vectorised_programs[run_loop][1],
                # Same runs, same batches, same start: the last losses should agree to round-off.
                "final_loss_max_rel_diff": float(
                    np.max(np.abs(vectorised_losses[run_loop] - sequential_losses) / np.abs(sequential_losses))
                ),
            }
            for run_loop in run_loops
        },
    }


def bench_sweep(args) -> dict:
    """The step-only benchmark of a model preset (the module docstring's first commands)."""
    model_config = clip.model_config(args.model, dtype=args.dtype)
    template = objectives.objective_config(**OBJECTIVES[args.objective])
    figures = bench_steps(
        model_config,
        template,
        num_runs=args.num_runs,
        steps=args.steps,
        batch_size=args.batch_size,
        warmup_steps=args.warmup_steps,
        repeats=args.repeats,
        run_shards=args.run_shards,
        run_loops=tuple(args.run_loops.split(",")),
    )
    pairs = args.num_runs * args.steps * args.batch_size
    return {
        "bench": "sweep",
        "model": args.model,
        "objective": args.objective,
        "dtype": args.dtype,
        "num_runs": args.num_runs,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "run_shards": args.run_shards,
        "sequential_pairs_per_s": pairs / figures["sequential_s"],
        **figures,
    }


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def _run_command(command: list[str], log_path: str) -> tuple[float, float]:
    """(wall, CPU) seconds of a child process (its CPU time with that of any children it waited
    for); fails with the log's tail if it fails."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_DIR)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}:\n{tail}")
    return wall, usage.ru_utime + usage.ru_stime


def prepare_cleaning_sweep(workdir: str) -> tuple[str, str]:
    """The synthetic world and a tiny poisoned pretraining run (configs/tiny.py, 1 epoch) under
    workdir, made once; returns their directories."""
    from bclip.data.synthetic import writer

    world = os.path.join(workdir, "world")
    writer.write_world(world, image_size=32, num_train=2000)
    pretrained = os.path.join(workdir, "pretrained")
    if not os.path.exists(os.path.join(pretrained, "done.json")):
        command = [sys.executable, "-m", "bclip.main", "--config", f"{PRETRAINING_CONFIG}:{world}",
                   "--workdir", pretrained, "--config.train.num_epochs=1"]
        _run_command(command, os.path.join(workdir, "pretrained.log"))
    return world, pretrained


def _run_results(root: str) -> dict[str, dict]:
    results = {}
    for name in sorted(os.listdir(root)):
        done = os.path.join(root, name, "done.json")
        if os.path.exists(done):
            with open(done) as f:
                results[name] = json.load(f)
    return results


def _evals_per_run(root: str, name: str) -> int:
    with open(os.path.join(root, name, "evals.jsonl")) as f:
        return sum(1 for line in f if line.strip())


def _load_average() -> float:
    return round(os.getloadavg()[0], 2)


def bench_end_to_end(args) -> dict:
    workdir = args.workdir or tempfile.mkdtemp(prefix="bclip-bench-sweep-")
    os.makedirs(workdir, exist_ok=True)
    world, pretrained = prepare_cleaning_sweep(workdir)
    config_arg = f"{CLEANING_SWEEP_CONFIG}:{world},{pretrained},{args.num_runs}"
    load_before = _load_average()
    sides = {"sequential": [], "vectorised": ["--vectorize"]}
    timings = {side: {"wall_s": float("inf"), "cpu_s": float("inf")} for side in sides}
    roots = {}
    for repeat in range(args.repeats):
        # Alternate which side goes first so a burst of outside load does not always hit one side.
        order = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
        for side in order:
            root = os.path.join(workdir, f"{side}_{args.num_runs}runs")
            shutil.rmtree(root, ignore_errors=True)
            command = [sys.executable, "-m", "bclip.sweep", "--config", config_arg, "--workdir", root, *sides[side]]
            wall, cpu = _run_command(command, root + ".log")
            if wall < timings[side]["wall_s"]:
                timings[side] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
            roots[side] = root
    load_after = _load_average()

    sequential, vectorised = (_run_results(roots[side]) for side in sides)
    if sorted(sequential) != sorted(vectorised) or len(sequential) != args.num_runs:
        raise RuntimeError(f"finished runs differ: {sorted(sequential)} vs {sorted(vectorised)}")
    differences = [
        abs(sequential[name]["results"][key] - vectorised[name]["results"][key])
        for name in sequential
        for key in sequential[name]["results"]
    ]
    first = sorted(sequential)[0]

    # ---- Step-only figures of the same model, batch and objective, for context -----------------
    from bclip.sweep import runs as sweep_runs

    config, _ = sweep_runs.load_sweep(config_arg)

    default_loop = run_group.default_run_loop(jax.devices())
    run_loops = tuple(dict.fromkeys([default_loop, "vmap", "dispatch"]))
    step_only = bench_steps(
        config.model,
        config.objective,
        num_runs=args.num_runs,
        steps=args.steps,
        batch_size=config.data.batch_size,
        warmup_steps=args.warmup_steps,
        repeats=args.repeats_step_only,
        run_loops=run_loops,
    )
    return {
        "bench": "sweep_end_to_end",
        "config": os.path.relpath(CLEANING_SWEEP_CONFIG, REPO_DIR),
        "num_runs": args.num_runs,
        "steps_per_run": sequential[first]["steps"],
        "evals_per_run": _evals_per_run(roots["sequential"], first),
        "batch_size": config.data.batch_size,
        "device_kind": jax.devices()[0].device_kind,
        "cpu_cores": os.cpu_count(),
        "load_average_before_after": [load_before, load_after],
        "sequential": timings["sequential"],
        "vectorised": timings["vectorised"],
        "speedup_wall": round(timings["sequential"]["wall_s"] / timings["vectorised"]["wall_s"], 2),
        "speedup_cpu": round(timings["sequential"]["cpu_s"] / timings["vectorised"]["cpu_s"], 2),
        "results_max_abs_diff": max(differences),
        "vectorised_run_loop": default_loop,
        "step_only": {
            "steps": args.steps,
            "sequential_s": round(step_only["sequential_s"], 3),
            "sequential_compile_s": round(step_only["sequential_compile_s"], 2),
            **{
                run_loop: {key: round(value, 3) for key, value in figures.items()}
                for run_loop, figures in step_only["vectorised"].items()
            },
        },
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bclip.bench sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--end_to_end", action="store_true",
                        help="time the sweep command on configs/clean_tiny.py, sequential vs --vectorize")
    parser.add_argument("--workdir", help="end to end: where the world, pretrained run and sweeps go (default: a temp dir)")
    parser.add_argument("--model", default="micro-vit", choices=sorted(clip.PRESETS))
    parser.add_argument("--objective", default="mmcl_ssl", choices=sorted(OBJECTIVES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--num_runs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (step only)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--warmup_steps", type=int, default=1, help="untimed steps per program after compiling")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best is kept")
    parser.add_argument("--repeats_step_only", type=int, default=2, help="end to end: rounds of its step-only part")
    parser.add_argument("--run_shards", type=int, default=1, help="split the runs over this many device groups")
    parser.add_argument("--run_loops", default="vmap", help="comma-separated run_group.RUN_LOOPS to time")
    args = parser.parse_args(argv)
    if args.end_to_end:
        if args.steps == parser.get_default("steps"):
            args.steps = 10
        if args.repeats == parser.get_default("repeats"):
            args.repeats = 1
        print(json.dumps(bench_end_to_end(args)), flush=True)
    else:
        print(json.dumps(bench_sweep(args)), flush=True)

