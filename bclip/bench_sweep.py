"""Benchmark: N cleaning runs as one vectorised program (bclip.vmap_sweep) against the same N runs
one after another, each with its own jitted bclip.train_step. Prints one JSON line.

  python -m bclip.bench_sweep --model micro-vit --num_runs 4 --steps 20 --batch_size 32
  python -m bclip.bench_sweep --model tiny-vit --num_runs 8 --steps 5 --batch_size 16

Both sides run the same steps on the same batches from the same start; compile time is measured
apart from step time; each side gets `--warmup_steps` untimed steps after compiling and the best of
`--repeats` interleaved rounds is kept, so other load on the machine hits both alike.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from bclip import objectives, optim, sharding, train_step, vmap_sweep
from bclip.bench import OBJECTIVES, random_batch
from bclip.models import clip


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


def bench_sweep(args) -> dict:
    model_config = clip.model_config(args.model, dtype=args.dtype)
    model = clip.build_model(model_config)
    template = objectives.objective_config(**OBJECTIVES[args.objective])
    with_views = objectives.needs_augmented_views(template)
    optim_config = optim.optim_config(warmup_steps=10)
    total_steps = 10_000
    # Sequential runs use every device for data parallelism; the sweep may split the runs over
    # groups of devices (--run_shards), each group splitting the batch.
    data_mesh = sharding.make_mesh()
    sweep_mesh = vmap_sweep.make_sweep_mesh(args.run_shards)
    vmap_sweep.check_runs_fit_mesh(args.num_runs, sweep_mesh)
    replicated = sharding.replicated(data_mesh)
    # The "pretrained" start every run cleans from, kept on the host so each round starts afresh.
    variables = jax.device_get(
        train_step.init_variables(model, jax.random.key(0), model_config.image.size, model_config.text.context_length)
    )
    host_batches = [random_batch(model_config, args.batch_size, with_views, seed=i) for i in range(args.steps)]
    batches = [jax.device_put(b, sharding.batch_sharding(data_mesh)) for b in host_batches]
    sweep_batches = [jax.device_put(b, sharding.batch_sharding(sweep_mesh)) for b in host_batches]
    rng = jax.device_put(jax.random.key(0), replicated)
    sweep_rng = jax.device_put(jax.random.key(0), sharding.replicated(sweep_mesh))
    per_run = sweep_values(args.num_runs, template)
    hparams = vmap_sweep.sweep_hyperparams(args.num_runs, optim_config, template, **per_run)

    # ---- Sequential: one program per run, as N separate runs would compile ----------------------
    def run_config(run):
        run_optim = optim.optim_config(
            warmup_steps=optim_config.warmup_steps,
            learning_rate=float(hparams["learning_rate"][run]),
            weight_decay=float(hparams["weight_decay"][run]),
        )
        tx = optim.make_optimizer(run_optim, total_steps)
        weights = {name: float(hparams[key][run]) for name, key in vmap_sweep.TERM_WEIGHTS.items()}
        return tx, objectives.objective_config(**weights)

    def fresh_state(tx):
        state = {
            "params": variables["params"],
            "batch_stats": variables.get("batch_stats", {}),
            "opt": tx.init(variables["params"]),
            "step": jnp.zeros((), jnp.int32),
        }
        return jax.device_put(state, jax.tree.map(lambda _: replicated, state))

    sequential_steps, sequential_compile_s = [], 0.0
    for run in range(args.num_runs):
        tx, objective = run_config(run)
        state = fresh_state(tx)
        shardings = jax.tree.map(lambda _: replicated, state)
        jitted = train_step.shard_and_jit_train_step(train_step.make_train_step(model, tx, objective), shardings, data_mesh)
        seconds, compiled = _timed(lambda: jitted.lower(state, batches[0], rng).compile())
        sequential_compile_s += seconds
        for i in range(args.warmup_steps):
            state, metrics = compiled(state, batches[i % args.steps], rng)
        jax.block_until_ready(state)
        sequential_steps.append((tx, compiled))

    def sequential_round():
        states = [fresh_state(tx) for tx, _ in sequential_steps]
        jax.block_until_ready(states)
        losses = []

        def train_one_after_another():
            for run, (_, compiled) in enumerate(sequential_steps):
                state = states[run]
                states[run] = None  # donated; lets the run's buffers go once it is done
                for batch in batches:
                    state, metrics = compiled(state, batch, rng)
                jax.block_until_ready(state)
                losses.append(metrics["loss"])

        seconds, _ = _timed(train_one_after_another)
        return seconds, np.asarray(jax.device_get(losses))

    # ---- Vectorised: one program for all runs ---------------------------------------------------
    sweep_tx = vmap_sweep.make_sweep_optimizer(optim_config)
    single = jax.device_get(vmap_sweep.init_sweep_state(sweep_tx, variables))
    stacked = jax.tree.map(lambda x: np.broadcast_to(x, (args.num_runs, *np.shape(x))), single)
    state_shardings = vmap_sweep.sweep_state_shardings(stacked, sweep_mesh)
    fresh_states = lambda: jax.device_put(stacked, state_shardings)
    hparams_on_device = jax.device_put(hparams, vmap_sweep.run_sharding(sweep_mesh))
    step = vmap_sweep.shard_and_jit_vectorised_step(
        vmap_sweep.make_vectorised_train_step(model, template, optim_config, total_steps), state_shardings, sweep_mesh
    )
    states = fresh_states()
    vectorised_compile_s, vectorised = _timed(
        lambda: step.lower(states, sweep_batches[0], sweep_rng, hparams_on_device).compile()
    )
    for i in range(args.warmup_steps):
        states, metrics = vectorised(states, sweep_batches[i % args.steps], sweep_rng, hparams_on_device)
    jax.block_until_ready(states)

    def vectorised_round():
        states = fresh_states()
        jax.block_until_ready(states)

        def train_together():
            nonlocal states
            for batch in sweep_batches:
                states, metrics = vectorised(states, batch, sweep_rng, hparams_on_device)
            jax.block_until_ready(states)
            return metrics["loss"]

        seconds, losses = _timed(train_together)
        return seconds, np.asarray(jax.device_get(losses))

    # ---- Timing: interleaved rounds, best kept --------------------------------------------------
    sequential_s = vectorised_s = float("inf")
    for round_index in range(args.repeats):
        # Alternate which side goes first so a burst of outside load does not always hit one side.
        order = (sequential_round, vectorised_round) if round_index % 2 == 0 else (vectorised_round, sequential_round)
        for measure in order:
            seconds, losses = measure()
            if measure is sequential_round:
                sequential_s, sequential_losses = min(sequential_s, seconds), losses
            else:
                vectorised_s, vectorised_losses = min(vectorised_s, seconds), losses

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
        "sequential_s": sequential_s,
        "vectorised_s": vectorised_s,
        "speedup": sequential_s / vectorised_s,
        "sequential_pairs_per_s": pairs / sequential_s,
        "vectorised_pairs_per_s": pairs / vectorised_s,
        "sequential_compile_s": sequential_compile_s,
        "vectorised_compile_s": vectorised_compile_s,
        "compile_speedup": sequential_compile_s / vectorised_compile_s,
        # Same runs, same batches, same start: the last losses should agree to round-off.
        "final_loss_max_rel_diff": float(np.max(np.abs(vectorised_losses - sequential_losses) / np.abs(sequential_losses))),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="micro-vit", choices=sorted(clip.PRESETS))
    parser.add_argument("--objective", default="mmcl_ssl", choices=sorted(OBJECTIVES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--num_runs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--warmup_steps", type=int, default=1, help="untimed steps per program after compiling")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best is kept")
    parser.add_argument("--run_shards", type=int, default=1, help="split the runs over this many device groups")
    args = parser.parse_args(argv)
    print(json.dumps(bench_sweep(args)), flush=True)


if __name__ == "__main__":
    main()
