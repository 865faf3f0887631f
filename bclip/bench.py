"""Benchmarks that print one JSON line per setting: the jitted train step and the input pipeline.

  python -m bclip.bench step --model tiny-vit --batch_size 128 --objective mmcl
  python -m bclip.bench data --help
"""

import argparse
import json
import time

import jax
import numpy as np

from bclip import objectives, optim, sharding, train_step
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


def random_batch(model_config, batch_size: int, with_views: bool, seed: int = 0) -> dict:
    """A batch of random uint8 images and token rows that each end in end-of-text."""
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
        batch["aug_image"] = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
        batch["aug_text"] = tokens()
    return batch


def bench_step(args) -> dict:
    model_config = clip.model_config(args.model, dtype=args.dtype)
    model = clip.build_model(model_config)
    objective = objectives.objective_config(**OBJECTIVES[args.objective])
    tx = optim.make_optimizer(optim.optim_config(learning_rate=1e-4, warmup_steps=10), 10_000)
    mesh = sharding.make_mesh()
    state, shardings = train_step.create_sharded_state(
        model, tx, jax.random.key(0), mesh, model_config, sharding.sharding_config(params=args.params_sharding)
    )
    step = train_step.shard_and_jit_train_step(train_step.make_train_step(model, tx, objective), shardings, mesh)
    batch = jax.device_put(
        random_batch(model_config, args.batch_size, objectives.needs_augmented_views(objective)),
        sharding.batch_sharding(mesh),
    )
    start = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - start
    for i in range(args.warmup_steps):
        state, metrics = compiled(state, batch, jax.random.key(i))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(args.steps):
        state, metrics = compiled(state, batch, jax.random.key(i))
    jax.block_until_ready(metrics)
    s_per_step = (time.perf_counter() - start) / args.steps
    result = {
        "bench": "step",
        "model": args.model,
        "objective": args.objective,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "params_sharding": args.params_sharding,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "pairs_per_s": args.batch_size / s_per_step,
        "s_per_step": s_per_step,
        "compile_s": compile_s,
        "loss": float(metrics["loss"]),
    }
    peak = peak_flops(jax.devices()[0], args.dtype)
    if peak is not None:
        # Training ≈ 3× forward; SSL views double the encoded pairs.
        views = 2 if objectives.needs_augmented_views(objective) else 1
        model_flops = 3 * clip.forward_flops_per_pair(model_config) * args.batch_size * views
        result["mfu"] = model_flops / s_per_step / (peak * jax.device_count())
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    step = commands.add_parser("step", help="time the jitted train step")
    step.add_argument("--model", default="tiny-vit", choices=sorted(clip.PRESETS))
    step.add_argument("--batch_size", type=int, default=128)
    step.add_argument("--objective", default="mmcl", choices=sorted(OBJECTIVES))
    step.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    step.add_argument("--params_sharding", default="replicated", choices=["replicated", "fsdp"])
    step.add_argument("--steps", type=int, default=10)
    step.add_argument("--warmup_steps", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "step":
        print(json.dumps(bench_step(args)), flush=True)


if __name__ == "__main__":
    main()
