"""Where a run starts, in one place: fresh random variables, or a pretrained checkpoint's
(`train.init_from`, optionally a chosen epoch), then the start transforms that cleaning methods
apply once before the first step (START_TRANSFORMS: shrink-and-perturb, fresh heads of per-epoch
passes), and optionally the pretraining run's optimiser state (`train.reload_optimizer_state`)."""

import dataclasses
import functools
from typing import Callable

import jax
import ml_collections
from absl import logging

from bclip import checkpointing, cleaning, epoch_passes, optim, sharding


def check_start_keys(train: ml_collections.ConfigDict) -> None:
    """Fail before anything is written when the keys that choose a run's start contradict each other."""
    if train.keep_checkpoint_every_epochs < 0:
        raise ValueError(f"train.keep_checkpoint_every_epochs must be >= 0, got {train.keep_checkpoint_every_epochs}")
    if train.init_from and checkpointing.is_open_clip_file(train.init_from):
        if train.init_from_epoch != -1 or train.reload_optimizer_state:
            raise ValueError(
                f"train.init_from={train.init_from!r} is a set of pretrained weights, which has neither epochs "
                "(train.init_from_epoch must be -1) nor an optimiser state (train.reload_optimizer_state must be False)"
            )
    if not train.init_from:
        if train.init_from_epoch != -1:
            raise ValueError(
                f"train.init_from_epoch={train.init_from_epoch} needs train.init_from (the run to start from)"
            )
        if train.reload_optimizer_state:
            raise ValueError("train.reload_optimizer_state needs train.init_from (the run whose optimiser to reload)")


@dataclasses.dataclass(frozen=True)
class StartContext:
    config: ml_collections.ConfigDict
    fresh_variables: Callable[[], dict]  # the random init of this run (same seed), with its shardings
    param_shardings: dict
    rng: jax.Array
    num_examples: int


@dataclasses.dataclass(frozen=True)
class StartTransform:
    """Changes a pretrained run's variables once, before cleaning's first step.

    enabled: whether a config asks for it. apply: (context, variables) -> variables.
    changes_weights: whether the model it leaves differs from the pretrained one (the step-0
    evaluation then reports both: the pretrained model, and this start under "after_start_transform").
    """

    enabled: Callable[[ml_collections.ConfigDict], bool]
    apply: Callable[[StartContext, dict], dict]
    changes_weights: bool = True


def _shrink_and_perturb(context: StartContext, variables: dict) -> dict:
    config = context.config
    fresh = context.fresh_variables()
    mix = functools.partial(cleaning.shrink_and_perturb, shrink=config.cleaning.shrink, perturb=config.cleaning.perturb)
    mix = jax.jit(mix, out_shardings=epoch_passes.model_params(context.param_shardings))
    return {**variables, "params": {**fresh["params"], **mix(variables["params"], epoch_passes.model_params(fresh["params"]))}}


def _fresh_pass_heads(context: StartContext, variables: dict) -> dict:
    """A head for every enabled per-epoch pass that owns one (deep clustering's cluster head)."""
    params = dict(variables["params"])
    for epoch_pass in epoch_passes.enabled_passes(context.config).values():
        if epoch_pass.head is not None and epoch_pass.head[0] not in params:
            name, init = epoch_pass.head
            init = functools.partial(init, context.config, num_examples=context.num_examples)
            params[name] = jax.jit(init, out_shardings=context.param_shardings[name])(context.rng)
    return {**variables, "params": params}


def shrinks_start_weights(config: ml_collections.ConfigDict) -> bool:
    return config.cleaning.shrink != 1.0 or config.cleaning.perturb != 0.0


# Applied in this order to a run started from init_from.
START_TRANSFORMS = {
    "shrink_and_perturb": StartTransform(enabled=shrinks_start_weights, apply=_shrink_and_perturb),
    "fresh_pass_heads": StartTransform(
        enabled=lambda config: any(p.head for p in epoch_passes.enabled_passes(config).values()),
        apply=_fresh_pass_heads,
        changes_weights=False,
    ),
}


def changes_start_weights(config: ml_collections.ConfigDict) -> bool:
    """Whether a run started from init_from starts from other weights than the pretrained ones."""
    return any(t.changes_weights and t.enabled(config) for t in START_TRANSFORMS.values())


def initial_variables(context: StartContext, init_from: dict | None) -> dict:
    """The variables a run without a checkpoint starts from: its random init, or the pretrained
    `init_from` variables after the enabled start transforms."""
    if init_from is None:
        return context.fresh_variables()
    variables = {"params": dict(init_from["params"]), "batch_stats": init_from["batch_stats"]}
    # The shrink-and-perturb start already holds the fresh heads of the random init.
    for transform in START_TRANSFORMS.values():
        if transform.enabled(context.config):
            variables = transform.apply(context, variables)
    return variables


def reloaded_optimizer_state(step_dir: str, tx, abstract_params, mesh, config):
    """The optimiser state saved in `step_dir`, for train.reload_optimizer_state. abstract_params:
    the model's params (no pass heads) with shardings; the saved state must be `tx`'s for them."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = sharding.state_shardings(abstract_opt, mesh, config.sharding)
    abstract_opt = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_opt, opt_shardings
    )
    saved_opt = checkpointing.load_optimizer_state(step_dir, abstract_opt)
    logging.warning(
        "train.reload_optimizer_state: Adam's moments and step count %d come from %s; the learning-rate "
        "schedule starts fresh",
        int(optim.adam_state(saved_opt).count),
        step_dir,
    )
    return saved_opt


def reloaded_weight_decay(config: ml_collections.ConfigDict) -> float:
    """With train.reload_optimizer_state, the weight decay of the run init_from names (its
    config.json): it replaces optim.weight_decay, as the reference's optimizer.load_state_dict
    replaced the hyper-parameters too. Read at every start, so a resumed run keeps it."""
    where = checkpointing.step_dir(config.train.init_from, config.train.init_from_epoch)
    saved_config = checkpointing.saved_run_config(where)
    try:
        weight_decay = float(saved_config["optim"]["weight_decay"])
    except (KeyError, TypeError, ValueError) as error:
        raise checkpointing.CheckpointError(
            f"the config of the run that saved {where} has no optim.weight_decay ({type(error).__name__}: {error})"
        ) from None
    if weight_decay != config.optim.weight_decay:
        logging.warning(
            "train.reload_optimizer_state: the weight decay %g of %s replaces the configured optim.weight_decay %g",
            weight_decay,
            where,
            config.optim.weight_decay,
        )
    return weight_decay
