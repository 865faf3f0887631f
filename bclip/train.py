"""The trainer: one loop for poisoned pretraining and for cleaning, for one run or a group of runs
that differ only in scalar hyper-parameters (a vectorised sweep); the configs decide which.

Stages: setup → data (one input stream, shared by the group's runs) → model and state (restored,
or started as run_start says) → evaluators → loop (per-epoch passes, train step, finite check,
logging, evaluation, checkpoints) → each run's done.json. Side effects live here; everything jitted
is pure and comes from `train_step`, `run_group`, `objectives`, `evaluators` and `epoch_passes`.

Every run's folder ends up the same whether it trained alone or in a group: config.json,
metrics.jsonl, evals.jsonl, poison_indices.json (poisoned runs), its checkpoints and done.json. A
group keeps what its runs share in its own folder: the stacked checkpoints with the data position
(removed once it has finished), the bad-records log and failed.json.

Divergence: a run whose loss or parameters become NaN or infinite fails. A lone run stops with
NonFiniteLossError naming the step and its last good checkpoint (deleting checkpoints of the
diverged state); in a group, the run is named on stderr and in failed.json, gets no further records
and no done.json, and the other runs train on.
"""

import dataclasses
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from jax.experimental import multihost_utils

from bclip import checkpointing, epoch_passes, evaluators, objectives, optim, run_group, run_start, sharding, train_step
from bclip.data import training_input
from bclip.models import clip
from bclip.run_files import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    DONE_FILE,
    EVALS_FILE,
    FAILED_FILE,
    METRICS_FILE,
    POISON_FILE,
    JsonLines,
    last_eval,
    read_json,
    write_json,
)

EPOCH_TABLES = "epoch_tables"  # the per-epoch passes' tables, saved in the checkpoint with the state


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stops without saving the broken state."""


@dataclasses.dataclass
class GroupOutcome:
    """What became of each run of a group, keyed by workdir."""

    results: dict[str, dict]  # the last evaluation of every finished run
    failed: dict[str, str]  # why each failed run stopped


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train one run (pretraining or cleaning) as configured; returns its last evaluation's results.

    Run again in the same `workdir`, it resumes from the newest checkpoint (model, optimiser, data
    position and per-epoch tables), so an interrupted run ends exactly as an uninterrupted one; log
    records written after that checkpoint are dropped and written again.
    """
    return train_group([config], [workdir]).results[workdir]


def train_group(
    configs: Sequence[ml_collections.ConfigDict],
    workdirs: Sequence[str],
    group_dir: str | None = None,
    run_loop: str | None = None,
) -> GroupOutcome:
    """Train the runs `configs[i]` (into `workdirs[i]`) as one group; each run's outputs are those
    it would have alone (the same start, batches and steps).

    The configs must differ only in run_group.SWEEPABLE_KEYS (NotVectorisableError otherwise).
    Called again with the same folders, the group resumes from its newest checkpoint.

    Args:
      configs, workdirs: one per run (local folders or gs://…).
      group_dir: the folder of what a group of several runs shares (a lone run's is its workdir).
      run_loop: how a group of several runs goes over them (run_group.RUN_LOOPS); default per host.
    """
    # ---- Setup ---------------------------------------------------------------------------------
    if len(configs) != len(workdirs) or not configs:
        raise ValueError(f"{len(configs)} configs but {len(workdirs)} workdirs")
    # Every run file goes through epath, so the folders may be on GCS (gs://bucket/run).
    run_dirs = [epath.Path(workdir) for workdir in workdirs]
    names = [run_dir.name for run_dir in run_dirs]
    run_group.check_vectorisable(configs, names)
    config = configs[0]  # Everything but the swept scalars is the same in every run.
    run_start.check_start_keys(config.train)
    optim.epoch_learning_rates(config.optim, config.train.num_epochs)  # a bad entry fails before any work
    num_runs, lone = len(configs), len(configs) == 1
    if group_dir is None and not lone:
        raise ValueError("a group of several runs needs a group_dir for what they share")
    group_dir = run_dirs[0] if group_dir is None or lone else epath.Path(group_dir)
    process_index, process_count = jax.process_index(), jax.process_count()
    is_chief = process_index == 0
    for run_config, run_dir in zip(configs, run_dirs):
        run_dir.mkdir(parents=True, exist_ok=True)
        if is_chief:
            (run_dir / CONFIG_FILE).write_text(run_config.to_json_best_effort(indent=2))
    group_dir.mkdir(parents=True, exist_ok=True)
    writers = [metric_writers.create_default_writer(os.fspath(d), just_logging=not is_chief) for d in run_dirs]
    metrics_logs = [JsonLines(run_dir / METRICS_FILE, is_chief) for run_dir in run_dirs]
    evals_logs = [JsonLines(run_dir / EVALS_FILE, is_chief) for run_dir in run_dirs]
    mesh = sharding.make_mesh()
    rng = jax.random.key(config.seed)

    # ---- Data: one stream for every run --------------------------------------------------------
    objective = run_group.group_objective(configs)
    # PAR's terms read the starting (poisoned) model, kept frozen in the state beside the one trained.
    keeps_reference = objectives.needs_reference(objective)
    if keeps_reference and not config.train.init_from:
        raise ValueError(
            f"objective terms {list(objectives.active_terms(objective))} push the model away from the one it "
            "starts from, which train.init_from must name"
        )
    tokenizer = training_input.make_tokenizer(config)
    source, plan, data = training_input.make_training_input(
        config, objective, tokenizer, process_index, process_count, os.fspath(group_dir) if is_chief else None
    )
    if plan is not None and is_chief:
        for run_dir in run_dirs:
            plan.write(run_dir / POISON_FILE)
    steps_per_epoch = len(source) // config.data.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(source)} training examples cannot fill one batch of {config.data.batch_size}")
    total_steps = config.train.num_epochs * steps_per_epoch

    # ---- Model and state -----------------------------------------------------------------------
    model = clip.build_model(config.model)
    passes = epoch_passes.enabled_passes(config)
    heads = [epoch_pass.head for epoch_pass in passes.values() if epoch_pass.head]
    if len(heads) > 1:
        raise ValueError(f"per-epoch passes {sorted(passes)} each own a head; the optimiser can reset only one")
    tx = optim.make_optimizer(config.optim, resettable_head=heads[0][0] if heads else None)
    group = run_group.RunGroup(num_runs, mesh, run_loop)

    def init_variables(rng):
        """Random model variables {"params", "batch_stats"}, plus the heads of per-epoch passes."""
        variables = train_step.init_variables(model, rng, config.model.image.size, config.model.text.context_length)
        for name, init_head in heads:
            variables["params"] = {**variables["params"], name: init_head(config, rng, len(source))}
        return variables

    def start_state(variables, reference):
        return train_step.init_state(tx, variables, reference if keeps_reference else None)

    def abstract_start(rng):
        variables = init_variables(rng)
        return start_state(variables, epoch_passes.model_variables(variables))

    abstract_run = jax.eval_shape(abstract_start, rng)
    run_shardings = sharding.state_shardings(abstract_run, mesh, config.sharding)
    variable_shardings = {"params": run_shardings["params"], "batch_stats": run_shardings["batch_stats"]}
    abstract = group.abstract(abstract_run, run_shardings)
    table_size = training_input.num_examples(source)
    replicated = sharding.replicated(mesh)
    abstract_tables = {
        name: jax.ShapeDtypeStruct((table_size,), epoch_pass.dtype, sharding=replicated) for name, epoch_pass in passes.items()
    }
    # Epoch ends are always saved; every k-th is kept for good, and epochs.json maps them to steps.
    keep_every_steps = config.train.keep_checkpoint_every_epochs * steps_per_epoch
    manager = checkpointing.make_manager(group_dir / CHECKPOINTS_DIR, config.train.keep_checkpoints, keep_every_steps)
    if is_chief and lone:
        checkpointing.write_epoch_steps(group_dir / CHECKPOINTS_DIR, steps_per_epoch)
    # An init_from checkpoint is read before any compute so a bad path fails at once.
    init_from = saved_opt = None
    if config.train.init_from and manager.latest_step() is None:
        sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_run, run_shardings)
        abstract_variables = {"params": epoch_passes.model_params(sharded["params"]), "batch_stats": sharded["batch_stats"]}
        init_from, where = checkpointing.load_model_variables(
            config.train.init_from, abstract_variables, config.train.init_from_epoch
        )
        logging.info("Initialising %d run(s) from %s", num_runs, where)
        if config.train.reload_optimizer_state:
            # Read in the structure of the pretraining run's optimiser: `tx` may also hold a pass
            # head's AdamW, which pretraining never had.
            saved_opt = run_start.reloaded_optimizer_state(
                where, optim.make_optimizer(config.optim), abstract_variables["params"], mesh, config
            )
    hparams = run_group.group_hyperparams(configs)
    if config.train.reload_optimizer_state:
        hparams["weight_decay"][:] = run_start.reloaded_weight_decay(config)
    checkpointed = {**abstract, EPOCH_TABLES: abstract_tables} if passes else abstract
    restored, start_step = checkpointing.restore_latest(manager, checkpointed, data.iterator)
    start_variables = None  # the step-0 evaluation's model when it is not the state's (see below)
    tables: dict[str, np.ndarray] = {}
    if restored is not None:
        logging.info("Resumed from step %d", start_step)
        tables = {name: np.asarray(table.addressable_data(0)) for name, table in restored.pop(EPOCH_TABLES, {}).items()}
        states = restored
        failed_by_name = {} if lone else read_json(group_dir / FAILED_FILE)
        # Records written after the checkpoint (before an interruption) are redone from it.
        for log in metrics_logs + evals_logs:
            log.keep_through(start_step)
    else:
        # No checkpoint: whatever an earlier attempt logged is redone from the start.
        failed_by_name = {}
        if is_chief and not lone:
            write_json(group_dir / FAILED_FILE, failed_by_name)
        for log in metrics_logs + evals_logs:
            log.keep_through(-1)
        start_step = 0
        if init_from is not None and config.eval.at_start and run_start.changes_start_weights(config):
            # The step-0 evaluation is the model being cleaned, as pretrained: reports compare every
            # cleaning point with it. Kept (copied: the state below takes the loaded buffers) until
            # then; the transformed start is evaluated too and logged beside it.
            start_variables = jax.tree.map(jnp.copy, init_from)
        context = run_start.StartContext(
            config=config,
            fresh_variables=lambda: jax.jit(init_variables, out_shardings=variable_shardings)(rng),
            param_shardings=variable_shardings["params"],
            rng=rng,
            num_examples=len(source),
        )
        variables = run_start.initial_variables(context, init_from)
        # The optimiser starts fresh, also from a pretrained checkpoint, unless asked to reload it.
        init = jax.jit(start_state, out_shardings=run_shardings, donate_argnums=0)
        # The reference is a copy: `variables` may share init_from's buffers, and they are donated.
        run_state = init(variables, jax.tree.map(jnp.copy, init_from) if keeps_reference else None)
        if saved_opt is not None:
            run_state = {**run_state, "opt": jax.device_put(optim.with_reloaded_adam(run_state["opt"], saved_opt), run_shardings["opt"])}
        # Every run of a group starts from the same state; they differ in their hyper-parameters.
        states = group.replicate(run_state, run_shardings)
    live = [i for i in range(num_runs) if names[i] not in failed_by_name]
    step_fn = group.jit_step(
        train_step.make_train_step(model, tx, objective, config.optim, total_steps, steps_per_epoch), run_shardings
    )
    hparams_on_mesh = group.hyperparams(hparams)

    def with_tables(states) -> dict:
        """What a checkpoint holds: the states and the current epoch's tables."""
        if not passes:
            return states
        on_mesh = {
            name: jax.make_array_from_callback(table.shape, replicated, lambda index, table=table: table[index])
            for name, table in tables.items()
        }
        return {**states, EPOCH_TABLES: on_mesh}

    def last_checkpoint() -> str:
        manager.wait_until_finished()
        last = manager.latest_step()
        return "none (no checkpoint saved yet)" if last is None else os.fspath(group_dir / CHECKPOINTS_DIR / str(last))

    def fail(run: int, why: str, first_bad_state: int) -> None:
        """The divergence policy. `first_bad_state`: the step count of the first state that is not
        sound; checkpoints of it or later are of no use."""
        if lone:
            # A restart from a diverged state would only diverge again.
            manager.wait_until_finished()
            for saved in manager.all_steps():
                if saved >= first_bad_state:
                    manager.delete(saved)
            raise NonFiniteLossError(f"{why}; last good checkpoint: {last_checkpoint()}")
        live.remove(run)
        failed_by_name[names[run]] = why
        print(f"run {names[run]} failed: {NonFiniteLossError.__name__}: {why}", file=sys.stderr, flush=True)
        logging.warning("Run %s failed: %s", names[run], why)
        if is_chief:
            write_json(group_dir / FAILED_FILE, failed_by_name)

    def check_finite(step: int, metrics) -> None:
        """Fail the live runs whose loss in (0-based) `step`, or parameters after it, are not finite."""
        values = jax.device_get({"loss": metrics["loss"], "params_finite": metrics["params_finite"]})
        for run in list(live):
            if not math.isfinite(values["loss"][run]):
                fail(run, f"loss is {values['loss'][run]} at step {step + 1}", first_bad_state=step)
            elif not values["params_finite"][run]:
                fail(run, f"parameters became non-finite in step {step + 1}", first_bad_state=step + 1)

    # ---- Evaluators: built once, used for every run --------------------------------------------
    evals = evaluators.make_evaluators(config, model, tokenizer, mesh, process_index, process_count)
    last_results: list[dict | None] = [None] * num_runs

    def run_variables(run: int) -> dict:
        # Evaluations need only the model's variables, not the optimiser state (twice their size).
        variables = group.take({"params": states["params"], "batch_stats": states["batch_stats"]}, run, variable_shardings)
        return epoch_passes.model_variables(variables)

    def evaluate(variables: list[dict], due) -> list[dict]:
        results = [{} for _ in variables]
        for name, evaluator in due.items():
            for run_results, figures in zip(results, evaluator.evaluate_runs(variables)):
                run_results.update({f"{name}/{key}": value for key, value in figures.items()})
        return results

    def log_evals(step: int, runs: Sequence[int], results: Sequence[dict], extra: dict | None = None) -> None:
        epoch = step // steps_per_epoch
        for run, run_results in zip(runs, results):
            evals_logs[run].write({"step": step, "epoch": epoch, **run_results, **(extra or {})})
            writers[run].write_scalars(step, {f"eval/{k}": v for k, v in run_results.items()})
            logging.info("eval of %s at step %d (epoch %d): %s", names[run], step, epoch, run_results)
            last_results[run] = run_results

    def evaluate_start() -> None:
        """Step 0: every run holds the same variables, so they are evaluated once. For a transformed
        start (shrink-and-perturb), the pretrained model is reported, with the start beside it under
        "after_start_transform"."""
        at_start = {name: e for name, e in evals.items() if config.eval.sets[name].at_start}
        (start,) = evaluate([run_variables(live[0])], at_start)
        if start_variables is None:
            log_evals(0, live, [start] * len(live))
            return
        (pretrained,) = evaluate([start_variables], at_start)
        log_evals(0, live, [pretrained] * len(live), {"after_start_transform": start})

    # ---- Loop ----------------------------------------------------------------------------------
    outcome = GroupOutcome(results={}, failed={})
    try:
        if start_step == 0 and config.eval.at_start and live:
            evaluate_start()
            start_variables = None  # freed: only the step-0 evaluation reads it
        hooks = []
        if is_chief:
            hooks.append(
                periodic_actions.ReportProgress(
                    num_train_steps=total_steps, writer=writers[0] if lone else None, every_steps=config.train.log_every_steps
                )
            )
            if config.train.profile_steps:
                hooks.append(periodic_actions.Profile(logdir=os.fspath(group_dir), num_profile_steps=config.train.profile_steps))
        pending = None  # (step, metrics) of the previous step, read one step late to keep dispatch async
        last_log_time, last_log_step = time.perf_counter(), start_step
        for step in range(start_step, total_steps):
            if not live:
                break
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            pass_context = None
            if passes:
                pass_context = epoch_passes.PassContext(
                    config, model, mesh, source, table_size, tokenizer, poison_plan=plan, epoch=epoch
                )
            if passes and (step_in_epoch == 0 or not tables):
                # A run resumed mid-epoch has the epoch's tables from its checkpoint: recomputing them
                # from the current weights would change the run.
                for name, epoch_pass in passes.items():
                    tables[name], states = epoch_pass.run(pass_context, states, jax.random.fold_in(rng, epoch))
            batch = next(data)
            model_batch = {key: batch[key] for key in train_step.MODEL_BATCH_KEYS if key in batch}
            model_batch.update(epoch_passes.batch_fields(passes, tables, np.asarray(batch["index"]), pass_context, model_batch))
            global_batch = sharding.global_batch_from_local(model_batch, mesh)
            states, metrics = step_fn(states, global_batch, jax.random.fold_in(rng, step), hparams_on_mesh)
            if pending is not None:
                check_finite(*pending)
            pending = (step, metrics)
            for hook in hooks:
                hook(step + 1)
            end_of_epoch = (step + 1) % steps_per_epoch == 0
            should_save = end_of_epoch or (step + 1) % config.train.checkpoint_every_steps == 0
            is_log_step = (step + 1) % config.train.log_every_steps == 0 or step + 1 == total_steps
            if should_save or is_log_step:
                # Waits for this step, so a diverged run is never logged, evaluated or saved.
                check_finite(step, metrics)
            if is_log_step and live:
                values = jax.device_get(metrics)
                now = time.perf_counter()
                # Pairs of the shared stream per second: every run of the group trained on each.
                pairs_per_s = (step + 1 - last_log_step) * config.data.batch_size / (now - last_log_time)
                last_log_time, last_log_step = now, step + 1
                for run in live:
                    scalars = {k: float(v[run]) for k, v in values.items() if k != "params_finite"}
                    scalars["pairs_per_s"] = pairs_per_s
                    scalars["bad_records"] = data.bad_records.num_bad
                    writers[run].write_scalars(step + 1, scalars)
                    metrics_logs[run].write({"step": step + 1, "epoch": epoch, **scalars})
            due = {n: e for n, e in evals.items() if evaluators.is_due(e, epoch, config.train.num_epochs - 1)}
            if end_of_epoch and live and due:
                log_evals(step + 1, live, evaluate([run_variables(run) for run in live], due))
            if should_save:
                checkpointing.save(manager, step + 1, with_tables(states), data.iterator)
        if pending is not None:
            check_finite(*pending)

        # ---- Each finished run's results, final checkpoint and done.json -----------------------
        for run in live:
            if last_results[run] is None:  # Resumed after the last evaluation: report what it found.
                last_results[run] = last_eval(run_dirs[run])
        unevaluated = [run for run in live if last_results[run] is None]
        if unevaluated:
            log_evals(total_steps, unevaluated, evaluate([run_variables(run) for run in unevaluated], evals))
        if not lone:
            save_final_checkpoints(group, states, run_shardings, live, run_dirs, config, total_steps, steps_per_epoch, data, is_chief)
        # done.json is written last, once every checkpoint is complete: a run marked finished always
        # has its final checkpoint (e.g. for init_from).
        manager.wait_until_finished()
        for run in live:
            if is_chief:
                # Atomic: done.json marks the run finished for sweeps and reports, so it is never partial.
                write_json(run_dirs[run] / DONE_FILE, {"steps": total_steps, "results": last_results[run]})
            outcome.results[workdirs[run]] = last_results[run]
        outcome.failed = {workdirs[names.index(name)]: why for name, why in failed_by_name.items()}
    finally:
        # Also when the loop fails: a checkpoint being written is finished, not left half-done, and
        # data worker processes stop now.
        manager.wait_until_finished()
        manager.close()
        data.close()
        for writer in writers:
            writer.flush()
    if not lone:
        # Every run has its own final checkpoint now; the stacked ones (N models) are no longer needed.
        multihost_utils.sync_global_devices("bclip group finished")
        if is_chief:
            (group_dir / CHECKPOINTS_DIR).rmtree(missing_ok=True)
    return outcome


def save_final_checkpoints(group, states, run_shardings, runs, run_dirs, config, total_steps, steps_per_epoch, data, is_chief):
    """Each run of a group gets its final state in its own folder, as a lone run's, e.g. for
    init_from (with epochs.json, so init_from_epoch can name the final epoch)."""
    managers = []
    for run in runs:
        manager = checkpointing.make_manager(run_dirs[run] / CHECKPOINTS_DIR, config.train.keep_checkpoints)
        if total_steps in manager.all_steps():
            # Left by an attempt stopped before done.json (this group's, or a lone run's).
            manager.delete(total_steps)
        checkpointing.save(manager, total_steps, group.take(states, run, run_shardings), data.iterator)
        if is_chief:
            checkpointing.write_epoch_steps(run_dirs[run] / CHECKPOINTS_DIR, steps_per_epoch)
        managers.append(manager)
    for manager in managers:
        manager.wait_until_finished()
        manager.close()
