"""One process of the multi-process training test (tests/test_multiprocess.py); not a test itself.

Trains a micro ViT CLIP for a few steps on a synthetic world with the trainer's own pieces: this
process's share of the Grain stream, global batches assembled from every process's share, the
sharded train step, and Orbax checkpoints that hold the iterator position. Started once per process,
with the BCLIP_* variables of `bclip.distributed` when there are several:

  python tests/_multiprocess_worker.py --world W --out O --checkpoints C --steps 4 [--save_at 2] [--resume]

Writes O/process_{i}.npz: "losses" float32 [steps run], "indices" int64 [steps run, local batch] and
"poisoned" bool [same] (the examples this process read), "first_step" (0, or where it resumed); and
process 0 writes O/params.npz, the final parameters keyed by their tree path.
"""

import argparse
import functools
import os

from bclip import distributed

# Before anything touches JAX: the processes must find each other first.
distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from bclip import checkpointing, optim, sharding, train_step  # noqa: E402
from bclip import config as run_configs  # noqa: E402
from bclip.data import pipeline, sources, training_input  # noqa: E402
from bclip.data.synthetic import writer  # noqa: E402
from bclip.data.tokenizer import WordTokenizer  # noqa: E402
from bclip.models import clip  # noqa: E402

# As tests/conftest.py sets it, so every run multiplies in the same precision.
jax.config.update("jax_default_matmul_precision", "highest")


def worker_config(world: str, batch_size: int):
    """Poisoned MMCL pretraining of the micro ViT preset, with parameters split over the devices."""
    config = run_configs.run_config("micro-vit")
    config.data.train_csv = os.path.join(world, "train", "train.csv")
    config.data.tokenizer.path = os.path.join(world, writer.VOCAB_FILE)
    config.data.batch_size = batch_size
    config.data.shuffle_seed = 3
    config.poison.count = 8
    config.poison.trigger.size = 6
    config.optim.warmup_steps = 1
    config.optim.learning_rate = 1e-3
    # FSDP, so that in the two-process run each process holds only its part of the larger weights,
    # the step gathers them across processes and every process writes its own shards at a save.
    config.sharding.params = "fsdp"
    config.sharding.fsdp_min_size = 2**10
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoints", required=True)
    parser.add_argument("--steps", type=int, required=True, help="Train until this step.")
    parser.add_argument("--batch_size", type=int, default=32, help="Global batch size.")
    parser.add_argument("--save_at", type=int, default=0, help="Save a checkpoint after this step.")
    parser.add_argument("--resume", action="store_true", help="Start from the latest checkpoint.")
    args = parser.parse_args()

    config = worker_config(args.world, args.batch_size)
    process_index, process_count = jax.process_index(), jax.process_count()
    mesh = sharding.make_mesh()
    rng = jax.random.key(config.seed)

    source = sources.CsvImageTextSource(config.data.train_csv)
    data = pipeline.make_train_pipeline(
        source,
        image_size=config.model.image.size,
        context_length=config.model.text.context_length,
        # The word tokenizer padded to the model's vocabulary (bclip.training_input.make_tokenizer, without
        # importing the trainer's TensorFlow-backed metric writers: seconds per process).
        tokenizer=WordTokenizer.from_file(config.data.tokenizer.path, vocab_size=config.model.text.vocab_size),
        data=config.data,
        poison=config.poison,
        with_views=False,
        process_index=process_index,
        process_count=process_count,
    )

    model = clip.build_model(config.model)
    # The schedule's length is fixed, so the interrupted and the resumed run share it.
    tx = optim.make_optimizer(config.optim, total_steps=args.steps)
    manager = checkpointing.make_manager(args.checkpoints)
    first_step = 0
    if args.resume:
        init = functools.partial(
            train_step.init_state, model, tx,
            image_size=config.model.image.size, context_length=config.model.text.context_length,
        )
        abstract = jax.eval_shape(init, rng)
        shardings = sharding.state_shardings(abstract, mesh, config.sharding)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        state, first_step = checkpointing.restore_latest(manager, abstract, data.iterator)
        if state is None:
            raise SystemExit(f"--resume but no checkpoint in {args.checkpoints}")
    else:
        state, shardings = train_step.create_sharded_state(model, tx, rng, mesh, config.model, config.sharding)
    step_fn = train_step.shard_and_jit_train_step(
        train_step.make_train_step(model, tx, config.objective), shardings, mesh
    )

    losses, indices, poisoned = [], [], []
    for step in range(first_step, args.steps):
        batch = next(data)
        indices.append(batch["index"])
        poisoned.append(batch["is_poisoned"])
        global_batch = sharding.global_batch_from_local({"image": batch["image"], "text": batch["text"]}, mesh)
        state, metrics = step_fn(state, global_batch, jax.random.fold_in(rng, step))
        losses.append(float(metrics["loss"]))
        if step + 1 == args.save_at:
            checkpointing.save(manager, step + 1, state, data.iterator)
    manager.wait_until_finished()
    manager.close()

    os.makedirs(args.out, exist_ok=True)
    np.savez(
        os.path.join(args.out, f"process_{process_index}.npz"),
        losses=np.asarray(losses, np.float32),
        indices=np.stack(indices),
        poisoned=np.stack(poisoned),
        first_step=np.int64(first_step),
    )
    # Every process takes part in gathering the sharded parameters; process 0 writes them.
    params = multihost_utils.process_allgather(state["params"], tiled=True)
    if process_index == 0:
        flat = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(os.path.join(args.out, "params.npz"), **flat)
    # No process may leave while another still needs it for a collective.
    multihost_utils.sync_global_devices("done")
    data.close()


if __name__ == "__main__":
    main()
