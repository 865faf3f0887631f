"""Vectorised sweeps end to end: N runs that differ only in scalar hyperparameters (bclip.vmap_sweep)
train as one jitted program on one shared input stream, and each run still gets a normal run's folder.

Every run's folder ends up as `bclip.train` leaves it: config.json, metrics.jsonl, evals.jsonl (same
keys), its final checkpoint and done.json. What the runs share lives in a group folder: the stacked
state and the data position, saved together so a killed group resumes on exactly the next batch
(removed once the group has finished), the bad-records log and failed.json.

A run whose loss or parameters become NaN or infinite fails alone: it is named on stderr and in
failed.json, gets no further log records and no done.json, and the other runs train on (runs
share no arithmetic, so a diverged one cannot disturb the others). The group stops early only when
every run has failed; rerunning the sweep retrains the failed runs from the start.
"""

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from bclip import checkpointing, cpu_runtime, sharding, train, train_step, vmap_sweep
from bclip.models import clip

CHECKPOINTS_DIR = "checkpoints"
FAILED_FILE = "failed.json"


class NotVectorisableError(ValueError):
    """The runs cannot share one vectorised program."""


@dataclasses.dataclass
class GroupOutcome:
    """What became of each run of a group, keyed by workdir."""

    results: dict[str, dict]  # the last evaluation of every finished run
    failed: dict[str, str]  # why each failed run stopped


# ---------------------------------------------------------------------------------------------
# Which runs can share a program
# ---------------------------------------------------------------------------------------------


def _lookup(tree: dict, dotted_key: str):
    for part in dotted_key.split("."):
        tree = tree[part]
    return tree


def vectorisation_problems(configs: Sequence[ml_collections.ConfigDict], names: Sequence[str]) -> list[str]:
    """Why these run configs cannot train as one vectorised program (empty when they can)."""
    problems = []
    as_dicts = [config.to_dict() for config in configs]
    for key, runs in vmap_sweep.non_sweepable_differences(configs).items():
        values = ", ".join(f"{names[i]}: {_lookup(as_dicts[i], key)!r}" for i in [0, *runs][:4])
        problems.append(f"{key} differs between runs ({values}{', ...' if len(runs) > 3 else ''})")
    if any(config.train.reload_optimizer_state for config in configs):
        problems.append(
            "train.reload_optimizer_state is set: a vectorised group's optimiser carries per-run "
            "hyperparameters and cannot take over a lone run's saved AdamW state"
        )
    if any(config.train.keep_checkpoint_every_epochs for config in configs):
        problems.append(
            "train.keep_checkpoint_every_epochs is set: a vectorised group keeps only each run's final checkpoint"
        )
    if any(config.objective.cluster_weight for config in configs):
        problems.append(
            "objective.cluster_weight is set: deep clustering recomputes cluster ids from each run's "
            "own model before every epoch, which one shared input stream cannot carry"
        )
    return problems


def check_vectorisable(configs: Sequence[ml_collections.ConfigDict], names: Sequence[str]) -> None:
    """Raise NotVectorisableError naming every key that keeps the runs from sharing one program."""
    if not configs:
        raise NotVectorisableError("no runs to vectorise")
    problems = vectorisation_problems(configs, names)
    if problems:
        raise NotVectorisableError(
            "these runs cannot train as one vectorised program: "
            + "; ".join(problems)
            + f". Only {', '.join(vmap_sweep.SWEEPABLE_KEYS)} may differ between the runs of a "
            "vectorised sweep; run this sweep without --vectorize"
        )


def default_run_loop(devices) -> str:
    """How a vectorised group's step goes over its runs (vmap_sweep.RUN_LOOPS) on `devices`.

    "vmap" on GPUs and TPUs, whose fixed per-op costs batching the runs spreads, and on CPUs with
    AVX-512, where YNNPACK's batched products were faster: 8 micro-vit runs' steps at 1.36x the
    speed of separate runs (the in-program loop: 0.74x). "dispatch" on other CPUs: on a 2-core AMD
    EPYC (AVX2) the clean_tiny.py runs' vmapped step ran at 0.71-0.92x the speed of separate runs,
    the N-fold working set costing more than batching saves, and "dispatch" at 0.93-1.00x
    (compiled once, at single-run size).
    """
    if all(device.platform == "cpu" for device in devices) and not cpu_runtime.has_avx512():
        return "dispatch"
    return "vmap"


# ---------------------------------------------------------------------------------------------
# The group
# ---------------------------------------------------------------------------------------------


def _with_run_axis(run_sharding: NamedSharding) -> NamedSharding:
    """A run's leaf sharding for the stacked leaf: the new leading run axis is not split."""
    return NamedSharding(run_sharding.mesh, P(None, *run_sharding.spec))


def _write_json(path: epath.Path, record) -> None:
    """Atomically: a reader (a sweep deciding what is finished) never sees half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, indent=2))
    temporary.replace(path)


def _read_failed(group_dir: epath.Path) -> dict[str, str]:
    path = group_dir / FAILED_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _last_eval(run_dir: epath.Path) -> dict | None:
    path = run_dir / train.EVALS_FILE
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().split("\n") if line.strip()]
    return {k: v for k, v in lines[-1].items() if k not in ("step", "epoch")} if lines else None


def _all_finite(params) -> jax.Array:
    """bool: whether every parameter of one run is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)]))


def with_finite_check(step):
    """The vectorised step, its metrics also holding "params_finite" bool [N] (part of the
    compiled program, so the check costs neither a dispatch nor a compile of its own)."""
    if isinstance(step, vmap_sweep.PerRunStep):

        def checked_run(run_step):
            def checked(state, batch, rng, hparams):
                state, metrics = run_step(state, batch, rng, hparams)
                return state, {**metrics, "params_finite": _all_finite(state["params"])}

            return checked

        return step.wrap(checked_run)

    def checked_step(states, batch, rng, hparams):
        states, metrics = step(states, batch, rng, hparams)
        return states, {**metrics, "params_finite": jax.vmap(_all_finite)(states["params"])}

    return checked_step


def train_and_evaluate_vectorised(
    configs: Sequence[ml_collections.ConfigDict],
    workdirs: Sequence[str],
    group_dir: str,
    run_loop: str | None = None,
) -> GroupOutcome:
    """Train the runs `configs[i]` (into `workdirs[i]`) together; their outputs equal separate runs'.

    The configs must differ only in vmap_sweep.SWEEPABLE_KEYS (NotVectorisableError otherwise).
    Each run starts from the same variables a lone run of its config would (same seed, init_from,
    shrink-and-perturb), reads the same batches and takes the same steps. Called again with the
    same group_dir, the group resumes from its newest checkpoint.

    Args:
      configs, workdirs: one per run (local folders or gs://…).
      group_dir: the group's own folder (stacked checkpoints, bad-records log, failed.json).
      run_loop: one of vmap_sweep.RUN_LOOPS; default `default_run_loop` of the mesh's devices.
    """
    if len(configs) != len(workdirs):
        raise ValueError(f"{len(configs)} configs but {len(workdirs)} workdirs")
    run_dirs = [epath.Path(workdir) for workdir in workdirs]
    names = [run_dir.name for run_dir in run_dirs]
    check_vectorisable(configs, names)
    train.check_start_keys(configs[0].train)  # the same in every run: train.* keys are not swept
    template, optim_config, hparams = vmap_sweep.sweep_from_configs(configs)
    config = configs[0]  # Everything but the swept scalars is the same in every run.
    num_runs = len(configs)

    # ---- Setup ---------------------------------------------------------------------------------
    process_index, process_count = jax.process_index(), jax.process_count()
    is_chief = process_index == 0
    group_dir = epath.Path(group_dir)
    group_dir.mkdir(parents=True, exist_ok=True)
    for run_config, run_dir in zip(configs, run_dirs):
        run_dir.mkdir(parents=True, exist_ok=True)
        if is_chief:
            (run_dir / "config.json").write_text(run_config.to_json_best_effort(indent=2))
    writers = [metric_writers.create_default_writer(os.fspath(d), just_logging=not is_chief) for d in run_dirs]
    metrics_logs = [train.JsonLines(run_dir / train.METRICS_FILE, is_chief) for run_dir in run_dirs]
    evals_logs = [train.JsonLines(run_dir / train.EVALS_FILE, is_chief) for run_dir in run_dirs]
    mesh = sharding.make_mesh()
    rng = jax.random.key(config.seed)

    # ---- Data: one stream for every run --------------------------------------------------------
    tokenizer = train.make_tokenizer(config)
    source, plan, data = train.make_training_input(
        config, template, tokenizer, process_index, process_count, os.fspath(group_dir) if is_chief else None
    )
    if plan is not None and is_chief:
        for run_dir in run_dirs:
            plan.write(run_dir / train.POISON_FILE)
    steps_per_epoch = len(source) // config.data.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(source)} training examples cannot fill one batch of {config.data.batch_size}")
    total_steps = config.train.num_epochs * steps_per_epoch

    # ---- Model and stacked state ---------------------------------------------------------------
    model = clip.build_model(config.model)
    tx = vmap_sweep.make_sweep_optimizer(optim_config)

    def init_variables(rng):
        return train_step.init_variables(model, rng, config.model.image.size, config.model.text.context_length)

    abstract_run = jax.eval_shape(lambda rng: vmap_sweep.init_sweep_state(tx, init_variables(rng)), rng)
    run_shardings = sharding.state_shardings(abstract_run, mesh, config.sharding)
    abstract_run = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_run, run_shardings)
    stacked_shardings = jax.tree.map(_with_run_axis, run_shardings)
    abstract_stacked = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct((num_runs, *a.shape), a.dtype, sharding=s), abstract_run, stacked_shardings
    )
    variable_shardings = {"params": run_shardings["params"], "batch_stats": run_shardings["batch_stats"]}
    manager = checkpointing.make_manager(group_dir / CHECKPOINTS_DIR, config.train.keep_checkpoints)
    # An init_from checkpoint is read before any compute so a bad path fails at once.
    init_from = None
    if config.train.init_from and manager.latest_step() is None:
        abstract_variables = {"params": abstract_run["params"], "batch_stats": abstract_run["batch_stats"]}
        init_from, where = checkpointing.load_model_variables(
            config.train.init_from, abstract_variables, config.train.init_from_epoch
        )
        logging.info("Initialising %d runs from %s", num_runs, where)
    states, start_step = checkpointing.restore_latest(manager, abstract_stacked, data.iterator)
    if states is not None:
        logging.info("Resumed the group from step %d", start_step)
        failed_by_name = _read_failed(group_dir)
        for log in metrics_logs + evals_logs:
            log.keep_through(start_step)
    else:
        failed_by_name = {}
        if is_chief:
            _write_json(group_dir / FAILED_FILE, failed_by_name)
        for log in metrics_logs + evals_logs:
            log.keep_through(-1)
        start_step = 0
        # As bclip.train starts a lone run: the same variables for every run of the group (deep
        # clustering is never vectorised, so there is no cluster head).
        variables = train.initial_variables(config, init_from, init_variables, variable_shardings, rng, num_clusters=0)
        stack = jax.jit(
            lambda v: vmap_sweep.stack_states(vmap_sweep.init_sweep_state(tx, v), num_runs),
            out_shardings=stacked_shardings,
        )
        states = stack(variables)
    live = [i for i in range(num_runs) if names[i] not in failed_by_name]

    run_loop = run_loop or default_run_loop(mesh.devices.flat)
    step = vmap_sweep.make_vectorised_train_step(model, template, optim_config, total_steps, run_loop)
    step_fn = vmap_sweep.shard_and_jit_vectorised_step(with_finite_check(step), stacked_shardings, mesh)
    hparams = jax.device_put(hparams, vmap_sweep.run_sharding(mesh))
    take_run_state = jax.jit(lambda states, i: jax.tree.map(lambda x: x[i], states), out_shardings=run_shardings)
    # Evaluations need only the model variables, not the optimizer state (twice their size).
    take_run_variables = jax.jit(
        lambda variables, i: jax.tree.map(lambda x: x[i], variables), out_shardings=variable_shardings
    )

    def run_variables(i: int) -> dict:
        variables = take_run_variables({"params": states["params"], "batch_stats": states["batch_stats"]}, i)
        return variables if variables["batch_stats"] else {"params": variables["params"]}

    def fail(i: int, why: str) -> None:
        live.remove(i)
        failed_by_name[names[i]] = why
        print(f"run {names[i]} failed: {train.NonFiniteLossError.__name__}: {why}", file=sys.stderr, flush=True)
        logging.warning("Run %s failed: %s", names[i], why)
        if is_chief:
            _write_json(group_dir / FAILED_FILE, failed_by_name)

    def check_finite(step: int, metrics) -> None:
        """Fail the live runs whose loss in (0-based) `step`, or parameters after it, are not finite."""
        values = jax.device_get({"loss": metrics["loss"], "params_finite": metrics["params_finite"]})
        for i in list(live):
            if not math.isfinite(values["loss"][i]):
                fail(i, f"loss is {values['loss'][i]} at step {step + 1}")
            elif not values["params_finite"][i]:
                fail(i, f"parameters became non-finite in step {step + 1}")

    # ---- Evaluators: one set, compiled once, used for every run --------------------------------
    evaluators = train.make_evaluators(config, model, tokenizer, mesh, process_index, process_count)
    last_results: list[dict | None] = [None] * num_runs

    def run_evals(step: int, runs: Sequence[int], identical: bool = False) -> None:
        """Evaluate `runs` at `step`; `identical`: they hold the same variables, so evaluate one."""
        runs = list(runs)
        evaluated = runs[:1] if identical else runs
        variables = [run_variables(i) for i in evaluated]
        results = [{} for _ in evaluated]
        for name, evaluator in evaluators.items():
            for run_results, figures in zip(results, evaluator.evaluate_runs(variables)):
                run_results.update({f"{name}/{key}": value for key, value in figures.items()})
        if identical:
            results = results * len(runs)
        epoch = step // steps_per_epoch
        for i, run_results in zip(runs, results):
            evals_logs[i].write({"step": step, "epoch": epoch, **run_results})
            writers[i].write_scalars(step, {f"eval/{k}": v for k, v in run_results.items()})
            logging.info("eval of %s at step %d (epoch %d): %s", names[i], step, epoch, run_results)
            last_results[i] = run_results

    # ---- Loop ----------------------------------------------------------------------------------
    outcome = GroupOutcome(results={}, failed={})
    try:
        if start_step == 0 and config.eval.at_start and live:
            run_evals(0, live, identical=True)  # Every run starts from the same variables.
        hooks = []
        if is_chief:
            hooks.append(periodic_actions.ReportProgress(num_train_steps=total_steps, every_steps=config.train.log_every_steps))
            if config.train.profile_steps:
                hooks.append(periodic_actions.Profile(logdir=os.fspath(group_dir), num_profile_steps=config.train.profile_steps))
        pending = None  # (step, metrics) of the previous step, read one step late to keep dispatch async
        last_log_time, last_log_step = time.perf_counter(), start_step
        for step in range(start_step, total_steps):
            if not live:
                break
            epoch = step // steps_per_epoch
            batch = next(data)
            global_batch = sharding.global_batch_from_local({k: batch[k] for k in train_step.MODEL_BATCH_KEYS if k in batch}, mesh)
            states, metrics = step_fn(states, global_batch, jax.random.fold_in(rng, step), hparams)
            if pending is not None:
                check_finite(*pending)
            pending = (step, metrics)
            for hook in hooks:
                hook(step + 1)
            end_of_epoch = (step + 1) % steps_per_epoch == 0
            should_save = end_of_epoch or (step + 1) % config.train.checkpoint_every_steps == 0
            is_log_step = (step + 1) % config.train.log_every_steps == 0 or step + 1 == total_steps
            if should_save or is_log_step:
                # Waits for this step, so a diverged run is never logged, evaluated or finished.
                check_finite(step, metrics)
            if is_log_step:
                values = jax.device_get(metrics)
                now = time.perf_counter()
                # Pairs of the shared stream per second: every run of the group trained on each.
                pairs_per_s = (step + 1 - last_log_step) * config.data.batch_size / (now - last_log_time)
                last_log_time, last_log_step = now, step + 1
                for i in live:
                    scalars = {k: float(v[i]) for k, v in values.items() if k != "params_finite"}
                    scalars["pairs_per_s"] = pairs_per_s
                    scalars["bad_records"] = data.bad_records.num_bad
                    writers[i].write_scalars(step + 1, scalars)
                    metrics_logs[i].write({"step": step + 1, "epoch": epoch, **scalars})
            if end_of_epoch and live and ((epoch + 1) % config.eval.every_epochs == 0 or step + 1 == total_steps):
                run_evals(step + 1, live)
            if should_save:
                checkpointing.save(manager, step + 1, states, data.iterator)
        if pending is not None:
            check_finite(*pending)

        # ---- Each finished run's own checkpoint and done.json ----------------------------------
        for i in live:
            if last_results[i] is None:  # Resumed after the last evaluation: report what it found.
                last_results[i] = _last_eval(run_dirs[i])
        unevaluated = [i for i in live if last_results[i] is None]
        if unevaluated:
            run_evals(total_steps, unevaluated)
        run_managers = []
        for i in live:
            # The run's folder holds its final state as a lone run's would, e.g. for init_from.
            run_manager = checkpointing.make_manager(run_dirs[i] / CHECKPOINTS_DIR, config.train.keep_checkpoints)
            if total_steps in run_manager.all_steps():
                # Left by an attempt stopped before done.json (this group's, or a lone run's).
                run_manager.delete(total_steps)
            checkpointing.save(run_manager, total_steps, take_run_state(states, i), data.iterator)
            if is_chief:  # so init_from_epoch can name the final epoch, as of a lone run
                checkpointing.write_epoch_steps(run_dirs[i] / CHECKPOINTS_DIR, steps_per_epoch)
            run_managers.append(run_manager)
        for run_manager in run_managers:
            run_manager.wait_until_finished()
            run_manager.close()
        for i in live:
            if is_chief:
                _write_json(run_dirs[i] / train.DONE_FILE, {"steps": total_steps, "results": last_results[i]})
            outcome.results[workdirs[i]] = last_results[i]
        outcome.failed = {workdirs[names.index(name)]: why for name, why in failed_by_name.items()}
    finally:
        # Also when the loop fails: a checkpoint being written is finished, not left half-done, and
        # data worker processes stop now.
        manager.wait_until_finished()
        manager.close()
        data.close()
        for writer in writers:
            writer.flush()
    # Every run has its own final checkpoint now; the stacked ones (N models) are no longer needed.
    multihost_utils.sync_global_devices("bclip vectorised group finished")
    if is_chief:
        (group_dir / CHECKPOINTS_DIR).rmtree(missing_ok=True)
    return outcome
