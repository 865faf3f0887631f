"""Benchmarks that print one JSON line per setting: the jitted train step and the input pipeline.

  python -m bclip.bench step --model tiny-vit --batch_size 128 --objective mmcl
  python -m bclip.bench data --data_dir /tmp/bench_world --image_size 224 --num_images 2000 --workers 0,1,2
  python -m bclip.bench data --num_images 1000 --workers 0 --threads 1,2 --settings badnets_1pct
  python -m bclip.bench views --image_size 224 --batch_size 64
"""

if __name__ == "__main__":
    # First, before the heavy imports below: on a CPU host this restarts the command with a glibc
    # heap that keeps XLA's step buffers mapped (see bclip/cpu_runtime.py).
    from bclip import cpu_runtime

    cpu_runtime.reexec_with_retained_heap()

import argparse
import io
import json
import multiprocessing
import os
import pathlib
import resource
import sys
import time

import jax
import ml_collections
import numpy as np
from PIL import Image

from bclip import cpu_runtime, device_augment, objectives, optim, sharding, train_step
from bclip.data import decode, pipeline, sources, text_augment
from bclip.data import tokenizer as tokenizer_lib
from bclip.data.synthetic import captions, writer
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
    for i in range(args.warmup_steps):
        state, metrics = compiled(state, batch, jax.random.key(i), hparams)
    jax.block_until_ready(metrics)
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
        "kernel_s_per_step": (usage.ru_stime - usage_before.ru_stime) / args.steps,
    }
    peak = peak_flops(jax.devices()[0], args.dtype)
    if peak is not None:
        # Training ≈ 3× forward; SSL views double the encoded pairs.
        views = 2 if objectives.needs_augmented_views(objective) else 1
        model_flops = 3 * clip.forward_flops_per_pair(model_config) * args.batch_size * views
        result["mfu"] = model_flops / s_per_step / (peak * jax.device_count())
    return result


# ---------------------------------------------------------------------------------------------
# Input pipeline
# ---------------------------------------------------------------------------------------------

# name -> (poison overrides or None for a clean run, SSL views, image views made on device)
DATA_SETTINGS = {
    "clean": (None, False, False),
    "badnets_1pct": ({"rate": 0.01}, False, False),
    "badnets_all": ({"rate": 1.0}, False, False),  # worst case: every image gets the trigger
    "ssl_badnets_1pct": ({"rate": 0.01}, True, False),  # the study's MMCL+SSL pretraining input
    # The same with the image views left to the train step (data.views_on_device): what the host
    # still does is caption views and view keys; `bench views` times the step's side.
    "ssl_device_views_badnets_1pct": ({"rate": 0.01}, True, True),
}


def cpu_seconds() -> float:
    """CPU seconds used so far by this process (all its threads) and its child processes: the
    ended ones once joined, and the live ones read from /proc (Linux; elsewhere live children
    are not counted)."""
    live = multiprocessing.active_children()  # also joins the children that have ended
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.process_time() + ended.ru_utime + ended.ru_stime
    for child in live:
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def wait_until_idle(poll_s: float = 0.05, idle_cpu_s: float = 0.012, timeout_s: float = 60.0) -> float:
    """Waits until this process and its children use almost no CPU (under `idle_cpu_s`, about a
    /proc clock tick, during one poll): the pipeline's prefetch buffers are full, and its threads
    and workers wait for the consumer. Returns the time (time.perf_counter) at which that quiet
    poll began, which is when the work ended, to within `poll_s`."""
    deadline = time.perf_counter() + timeout_s
    last_time, last_cpu = time.perf_counter(), cpu_seconds()
    while last_time < deadline:
        time.sleep(poll_s)
        now_time, now_cpu = time.perf_counter(), cpu_seconds()
        if now_cpu - last_cpu < idle_cpu_s:
            break
        last_time, last_cpu = now_time, now_cpu
    return last_time


class Stopwatch:
    """Wall and CPU seconds (this process and its workers) between start() and stop()."""

    def start(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def bare_decode_seconds(paths: list[str], image_size: int) -> tuple[float, float]:
    """(wall, CPU) seconds to read, decode, resize and centre-crop `paths` with Pillow alone, in a
    plain loop: the floor any pipeline that decodes these files pays.

    It is the cheapest plain Pillow route to the same pixels: JPEG draft decoding (as the pipeline
    does), and a convert, resize or crop only where it changes the image (each one copies it).
    """
    watch = Stopwatch()
    watch.start()
    for path in paths:
        with open(path, "rb") as f:
            image = Image.open(io.BytesIO(f.read()))
        image.draft("RGB", (image_size, image_size))
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        new_height, new_width = decode.resized_shape(height, width, image_size)
        if (new_width, new_height) != (width, height):
            image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
        if (new_width, new_height) != (image_size, image_size):
            top, left = decode.centre_crop_offsets(new_height, new_width, image_size)
            image = image.crop((left, top, left + image_size, top + image_size))
        np.asarray(image)
    return watch.stop()


def pipeline_seconds(source, setting: str, num_workers: int, num_threads: int, num_batches: int, args, tokenizer,
                     synonyms) -> tuple[float, float]:
    """(wall, CPU) seconds the training pipeline takes to deliver `num_batches` batches.

    Timed in steady state, between two moments at which every prefetch buffer is full and every
    thread and worker idle: so what is counted is the work of exactly the batches taken, without
    start-up (workers go through it in turn) and without batches prefetched before the start or
    left over at the end.
    """
    poison_overrides, with_views, views_on_device = DATA_SETTINGS[setting]
    data = pipeline.data_config(
        batch_size=args.batch_size, num_workers=num_workers, num_threads=num_threads, views_on_device=views_on_device
    )
    train = pipeline.make_train_pipeline(
        source,
        image_size=args.image_size,
        context_length=tokenizer_lib.DEFAULT_CONTEXT_LENGTH,
        tokenizer=tokenizer,
        data=data,
        poison=pipeline.poison_config(**(poison_overrides or {})),
        with_views=with_views,
        synonyms=synonyms if with_views else None,
    )
    try:
        for _ in range(max(1, num_workers) * num_threads):
            next(train)
        wait_until_idle()
        start_wall, start_cpu = time.perf_counter(), cpu_seconds()
        for _ in range(num_batches):
            next(train)
        end_wall = wait_until_idle()  # the buffers refilled: the same state as at the start
        return end_wall - start_wall, cpu_seconds() - start_cpu
    finally:
        train.close()


def _bench_dataset(args):
    """(source, tokenizer, synonyms) for --csv, or for a synthetic world written to --data_dir."""
    if args.csv:
        source = sources.CsvImageTextSource(args.csv)
        if not args.tokenizer_path:
            raise SystemExit("--csv needs --tokenizer_kind/--tokenizer_path (a vocabulary or BPE merges file)")
        tokenizer = tokenizer_lib.build_tokenizer(
            ml_collections.ConfigDict({"kind": args.tokenizer_kind, "path": args.tokenizer_path})
        )
        synonyms = text_augment.wordnet_synonyms() if args.synonyms == "wordnet" else _lexicon(args.synonyms)
        return source, tokenizer, synonyms
    world = writer.write_world(
        args.data_dir, image_size=args.source_size or args.image_size, num_train=args.num_images,
        num_test=0, num_selection=0, num_workers=os.cpu_count() or 1,
    )
    source = sources.CsvImageTextSource(pathlib.Path(world) / "train" / "train.csv")
    tokenizer = tokenizer_lib.WordTokenizer.from_file(pathlib.Path(world) / writer.VOCAB_FILE)
    return source, tokenizer, text_augment.lexicon_synonyms(captions.lexicon().synonyms)


def _lexicon(path):
    with open(path) as f:
        return text_augment.lexicon_synonyms(json.load(f))


def bench_data(args) -> list[dict]:
    """Images/s of a bare Pillow loop and of the training pipeline per setting, worker count and
    thread count.

    Every pipeline measurement follows a bare-loop measurement in this process, over `--repeats`
    interleaved rounds, so that load from other users of the machine hits both alike; medians are
    reported, and an overhead is the ratio of the bare loop's median (over every round) to the
    setting's. (Single bare loops on a shared machine vary by up to a third, too much to divide
    each measurement by the one before it.) Per-core figures come two ways: images/s divided by
    max(1, workers) * threads and images per CPU-second actually used (main process, its threads
    and the workers), which stays honest when threads wait on each other or other users make wall
    time a poor measure of cores.
    """
    source, tokenizer, synonyms = _bench_dataset(args)
    num_images = min(args.num_images, len(source))
    num_batches = -(-num_images // args.batch_size)
    paths = [source[i]["path"] for i in range(num_images)]
    worker_counts = [int(w) for w in args.workers.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    settings = args.settings.split(",")
    unknown = set(settings) - DATA_SETTINGS.keys()
    if unknown:
        raise SystemExit(f"unknown --settings {sorted(unknown)}; known: {list(DATA_SETTINGS)}")

    modes = [(workers, threads) for workers in worker_counts for threads in thread_counts]
    keys = [(setting, workers, threads) for workers, threads in modes for setting in settings]
    images = num_batches * args.batch_size
    rounds: dict[tuple[str, int, int], list[dict]] = {key: [] for key in keys}
    for round_index in range(args.repeats):
        for setting, workers, threads in keys:
            bare_wall, bare_cpu = bare_decode_seconds(paths, args.image_size)
            wall, cpu = pipeline_seconds(source, setting, workers, threads, num_batches, args, tokenizer, synonyms)
            measured = {
                "bare_per_s": num_images / bare_wall, "bare_per_cpu_s": num_images / bare_cpu,
                "per_s": images / wall, "per_cpu_s": images / cpu,
            }
            rounds[setting, workers, threads].append(measured)
            print(f"round {round_index}: {setting} workers={workers} threads={threads}: {measured['per_s']:.0f} images/s, "
                  f"{measured['per_cpu_s']:.0f} per CPU-second (bare loop just before: "
                  f"{measured['bare_per_s']:.0f}/s)", file=sys.stderr, flush=True)

    def median(values):
        return float(np.median(list(values)))

    every_round = [m for key in keys for m in rounds[key]]
    bare_per_s = median(m["bare_per_s"] for m in every_round)
    bare_per_cpu_s = median(m["bare_per_cpu_s"] for m in every_round)
    results = [{
        "bench": "data", "setting": "bare_pillow", "workers": 0, "image_size": args.image_size,
        "images": num_images, "images_per_s": bare_per_s, "images_per_s_per_core": bare_per_s,
        "images_per_cpu_s": bare_per_cpu_s,
    }]
    summary = {"bench": "data_summary", "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
    for setting, workers, threads in keys:
        measured = rounds[setting, workers, threads]
        # A core for each thread of each process: the cores the setting can keep busy.
        per_core = median(m["per_s"] / (max(1, workers) * threads) for m in measured)
        per_cpu_s = median(m["per_cpu_s"] for m in measured)
        results.append({
            "bench": "data", "setting": setting, "workers": workers, "threads": threads, "image_size": args.image_size,
            "batch_size": args.batch_size, "images": images,
            "images_per_s": median(m["per_s"] for m in measured), "images_per_s_per_core": per_core,
            "images_per_cpu_s": per_cpu_s,
        })
        # Cost per image beyond decoding alone (Grain, tokenising, batching, poisoning, views).
        mode = f"w{workers}t{threads}"
        summary[f"overhead_per_core/{setting}/{mode}"] = bare_per_s / per_core - 1
        summary[f"overhead_per_cpu_s/{setting}/{mode}"] = bare_per_cpu_s / per_cpu_s - 1
    for workers, threads in modes:
        mode = f"w{workers}t{threads}"
        for views_setting, name in (("ssl_badnets_1pct", "ssl"), ("ssl_device_views_badnets_1pct", "ssl_device_views")):
            if {"badnets_1pct", views_setting} <= set(settings):
                for unit in ("per_cpu_s", "per_core"):
                    single = summary[f"overhead_{unit}/badnets_1pct/{mode}"] + 1
                    views = summary[f"overhead_{unit}/{views_setting}/{mode}"] + 1
                    summary[f"{name}_cost_ratio_{unit}/{mode}"] = views / single
    results.append(summary)
    return results


# ---------------------------------------------------------------------------------------------
# Views made on device
# ---------------------------------------------------------------------------------------------


def bench_views(args) -> dict:
    """Images/s of AutoAugment views made in the train step (data.views_on_device) on this
    backend's first device: the cost a step pays for the host's saving in `bench data`."""
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3), np.uint8))
    keys = jax.device_put(pipeline.view_keys(0, 1, np.arange(args.batch_size), np.zeros(args.batch_size, np.int64)))
    make_views = jax.jit(device_augment.autoaugment_views)
    start = time.perf_counter()
    compiled = make_views.lower(images, keys).compile()
    compile_s = time.perf_counter() - start
    compiled(images, keys).block_until_ready()
    start = time.perf_counter()
    for _ in range(args.steps):
        views = compiled(images, keys)
    views.block_until_ready()
    s_per_batch = (time.perf_counter() - start) / args.steps
    return {
        "bench": "views", "device_kind": jax.devices()[0].device_kind, "image_size": args.image_size,
        "batch_size": args.batch_size, "images_per_s": args.batch_size / s_per_batch, "compile_s": compile_s,
    }


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
    step.add_argument(
        "--views_on_device", action="store_true",
        help="with an SSL objective: send view keys and make the AutoAugment views in the step",
    )
    step.add_argument(
        "--warmup_steps", type=int, default=3, help="untimed steps first; on CPU the retained heap settles in these"
    )
    data = commands.add_parser("data", help="time the input pipeline against a bare Pillow loop")
    data.add_argument("--data_dir", default="/tmp/bclip_bench_world", help="synthetic world to write or reuse")
    data.add_argument("--csv", default="", help="a real image-caption CSV instead of the synthetic world")
    data.add_argument("--tokenizer_kind", default="word", choices=sorted(tokenizer_lib.TOKENIZER_BUILDERS))
    data.add_argument("--tokenizer_path", default="", help="with --csv: vocabulary or BPE merges file")
    data.add_argument("--synonyms", default="wordnet", help="with --csv: 'wordnet' or a JSON lexicon")
    data.add_argument("--image_size", type=int, default=224)
    data.add_argument("--source_size", type=int, default=0, help="side of the world's JPEGs (0: image_size)")
    data.add_argument("--num_images", type=int, default=2000)
    data.add_argument("--batch_size", type=int, default=64)
    data.add_argument("--workers", default="0,1,2", help="comma-separated Grain worker counts")
    data.add_argument("--threads", default="1", help="comma-separated data.num_threads values")
    data.add_argument("--settings", default=",".join(DATA_SETTINGS), help="comma-separated, from: " + ", ".join(DATA_SETTINGS))
    data.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    views = commands.add_parser("views", help="time AutoAugment views made on device (data.views_on_device)")
    views.add_argument("--image_size", type=int, default=224)
    views.add_argument("--batch_size", type=int, default=64)
    views.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.command == "step":
        print(json.dumps(bench_step(args)), flush=True)
    elif args.command == "views":
        print(json.dumps(bench_views(args)), flush=True)
    elif args.command == "data":
        for result in bench_data(args):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
