"""The input side's speed: the Grain pipeline against a bare Pillow loop, and AutoAugment views made on device."""

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

from bclip import device_augment
from bclip.data import decode, pipeline, sources, text_augment
from bclip.data import tokenizer as tokenizer_lib
from bclip.data.synthetic import captions, writer

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
