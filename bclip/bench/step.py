"""The jitted train step's speed: pairs/s, compile time, MFU on accelerators, host memory behaviour on CPUs."""

import os
import resource
import time

import jax
import numpy as np

from bclip import cpu_runtime, objectives, optim, sharding, train_step
from bclip.data import pipeline
from bclip.models import clip

OBJECTIVES = {
    "mmcl": dict(mmcl=1.0),
    "mmcl_ssl": dict(mmcl=1.0, ssl=1.0),
    "ssl": dict(ssl=1.0, mmcl=0.0),
    "siglip": dict(mmcl=0.0, siglip=1.0),
}


# Dense bf16 / fp32-TF32 peak FLOP/s per device, for model FLOPs utilisation.
PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float32": 495e12},
    "H200": {"bfloat16": 989e12, "float32": 495e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
}


def peak_flops(device, dtype: str) -> float | None:
    for name, peaks in PEAK_FLOPS.items():
        if name.lower() in device.device_kind.lower():
            return peaks[dtype]
    return None


def random_batch(model_config, batch_size: int, with_views: bool, seed: int = 0, views_on_device: bool = False) -> dict:
    """A batch of random uint8 images and token rows that each end in end-of-text; with views on
    device, view keys (as the pipeline sends them) stand in for the augmented images."""
    rng = np.random.default_rng(seed)
    size, ctx, vocab = model_config.image.size, model_config.text.context_length, model_config.text.vocab_size

    def tokens():
        t = rng.integers(1, vocab - 2, size=(batch_size, ctx), dtype=np.int32)
        t[:, 0] = vocab - 2
        t[:, ctx // 2] = vocab - 1
        t[:, ctx // 2 + 1 :] = 0
        return t

    batch = {"image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8), "text": tokens()}
    if with_views:
        if views_on_device:
            batch["view_key"] = pipeline.view_keys(seed, 0, np.arange(batch_size), np.zeros(batch_size, np.int64))
        else:
            batch["aug_image"] = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
        batch["aug_text"] = tokens()
    return batch


# A step that faults in at most this many pages (4 MB) leaves the heap as it found it.
SETTLED_FAULTS = 1000


def settle(run_step, min_steps: int, max_steps: int, settled_in_a_row: int = 3) -> tuple[int, int]:
    """Untimed steps before timing: at least `min_steps`, then more until `settled_in_a_row` steps
    in a row each fault in at most SETTLED_FAULTS pages (minor page faults), `max_steps` in all at
    most; returns (steps run, the most faults of the last `settled_in_a_row` steps).

    On CPU the retained heap (cpu_runtime) does not reach its steady size in a fixed number of
    steps. Measured on a 2-core Xeon (tiny-vit MMCL, batch 128): the heap grew in jumps of ~1.7 GB
    (fragmentation: a step's largest block did not fit the holes the steps before left), with
    quiet steps between the jumps, to 4.5-6.3 GB; no memory went back to the system. In 7 of 11
    runs the growth went on past 3 warm-up steps, so the timed steps took 72,000-217,000 faults
    each. This rule takes more of the growth out of the timed steps but not all of it: jumps can
    come late (one 38-step run jumped at steps 0 and 28 only; one run settled by this rule in 4
    steps still averaged 175,000 faults over 5 timed steps).
    """
    recent = []
    steps = max(max_steps, min_steps)
    for i in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run_step(i)
        recent = (recent + [resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before])[-settled_in_a_row:]
        if i + 1 >= min_steps and len(recent) == settled_in_a_row and max(recent) <= SETTLED_FAULTS:
            return i + 1, max(recent)
    return steps, max(recent, default=0)


def bench_step(args) -> dict:
    model_config = clip.model_config(args.model, dtype=args.dtype)
    model = clip.build_model(model_config)
    objective = objectives.objective_config(**OBJECTIVES[args.objective])
    optim_config = optim.optim_config(learning_rate=1e-4, warmup_steps=10)
    tx = optim.make_optimizer(optim_config)
    mesh = sharding.make_mesh()
    state, shardings = train_step.create_sharded_state(
        model, tx, jax.random.key(0), mesh, model_config, sharding.sharding_config(params=args.params_sharding)
    )
    step = train_step.shard_and_jit_train_step(
        train_step.make_train_step(model, tx, objective, optim_config, 10_000), shardings, mesh
    )
    hparams = train_step.run_hyperparams(optim_config, objective)
    batch = jax.device_put(
        random_batch(
            model_config, args.batch_size, objectives.needs_augmented_views(objective),
            views_on_device=args.views_on_device,
        ),
        sharding.batch_sharding(mesh),
    )
    start = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.key(0), hparams).compile()
    compile_s = time.perf_counter() - start
    def untimed_step(i):
        nonlocal state
        state, metrics = compiled(state, batch, jax.random.key(i), hparams)
        jax.block_until_ready(metrics)

    warmup_steps, settling_faults = settle(untimed_step, args.warmup_steps, args.max_warmup_steps)
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for i in range(args.steps):
        state, metrics = compiled(state, batch, jax.random.key(i), hparams)
    jax.block_until_ready(metrics)
    s_per_step = (time.perf_counter() - start) / args.steps
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "bench": "step",
        "model": args.model,
        "objective": args.objective,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "params_sharding": args.params_sharding,
        "views_on_device": args.views_on_device and objectives.needs_augmented_views(objective),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "pairs_per_s": args.batch_size / s_per_step,
        "s_per_step": s_per_step,
        "compile_s": compile_s,
        "loss": float(metrics["loss"]),
        # Host memory behaviour behind CPU figures (bclip/cpu_runtime.py).
        "retained_heap": os.environ.get(cpu_runtime.RETAINED_HEAP_ENV) == "1",
        "minor_faults_per_step": (usage.ru_minflt - usage_before.ru_minflt) / args.steps,
        "warmup_steps": warmup_steps,
        "last_warmup_steps_minor_faults": settling_faults,
        "kernel_s_per_step": (usage.ru_stime - usage_before.ru_stime) / args.steps,
    }
    if jax.devices()[0].platform == "cpu":
        result.update(cpu_runtime.host_cpu())
    peak = peak_flops(jax.devices()[0], args.dtype)
    if peak is not None:
        # Training ≈ 3× forward; SSL views double the encoded pairs.
        views = 2 if objectives.needs_augmented_views(objective) else 1
        model_flops = 3 * clip.forward_flops_per_pair(model_config) * args.batch_size * views
        result["mfu"] = model_flops / s_per_step / (peak * jax.device_count())
    return result
