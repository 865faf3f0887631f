"""The trainer end to end on a tiny synthetic world, sharded over 8 CPU devices: exact resume after a
killed run, cleaning from a pretrained checkpoint with a fresh optimiser, from a chosen epoch, or
with the pretraining AdamW state reloaded, failing fast on bad starts and on divergence, every
cleaning method, and a cleaning set that never reads a poisoned example.

One poisoned pretraining run (12 steps, every epoch's checkpoint kept) is shared by the module;
cleaning runs start from it.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import saved_arrays

from bclip import checkpointing, epoch_passes, experiment, optim, run_files, run_group, run_start, sharding, train, train_step
from bclip import config as run_configs
from bclip.data import pipeline, poisoning, training_input
from bclip.data.synthetic import writer
from bclip.models import clip as clip_model

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# 96 training pairs in batches of 16: 6 steps per epoch, 2 epochs.
NUM_TRAIN = 96
PRETRAIN_STEPS = 12
PRETRAIN_STEPS_PER_EPOCH = 6
NUM_POISONED = 8
# Cleaning: the first 64 clean pairs, 4 steps per epoch.
CLEAN_SUBSET = 64
CLEAN_LEARNING_RATE = 5e-4
CLEAN_WARMUP = 3


# ---------------------------------------------------------------------------------------------
# Configs and fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> str:
    world = experiment.study_config().world
    world.num_train, world.num_test, world.num_selection = NUM_TRAIN, 16, 8
    return experiment.prepare_world(world, str(tmp_path_factory.mktemp("study")))


def pretrain_config(world_dir: str) -> ml_collections.ConfigDict:
    """Poisoned MMCL pretraining of a micro ViT CLIP: 12 steps, a checkpoint every 4 and per epoch,
    the two newest and every epoch's kept."""
    config = run_configs.run_config("micro-vit", text={"vocab_size": 256, "context_length": 24})
    config.data.train_csv = os.path.join(world_dir, "train", "train.csv")
    config.data.tokenizer.path = os.path.join(world_dir, writer.VOCAB_FILE)
    config.data.synonyms = os.path.join(world_dir, writer.SYNONYMS_FILE)
    config.data.image_augment = "simclr"
    config.data.batch_size = 16
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 3
    config.train.num_epochs = 2
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 4
    config.train.keep_checkpoint_every_epochs = 1
    config.poison.count = NUM_POISONED
    config.poison.trigger.size = 5
    config.eval.batch_size = 16
    with config.unlocked():
        config.eval.sets = {"test": run_configs.eval_set_config("folder", os.path.join(world_dir, "test"))}
    return config


def cleaning_config(world_dir: str, pretrain_dir: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """CleanCLIP (MMCL + SSL) on the first 64 clean pairs, 4 steps, no evaluation; `overrides` as
    nested dicts, merged like a study's method entries."""
    config = run_configs.override(
        pretrain_config(world_dir),
        run_configs.dotted({
            "objective": {"mmcl_weight": 1.0, "ssl_weight": 1.0},
            "optim": {"learning_rate": CLEAN_LEARNING_RATE, "warmup_steps": CLEAN_WARMUP},
            "train": {
                "num_epochs": 1,
                "init_from": pretrain_dir,
                "exclude_indices_file": os.path.join(pretrain_dir, run_files.POISON_FILE),
                "subset_size": CLEAN_SUBSET,
                "checkpoint_every_steps": 100,
                "keep_checkpoint_every_epochs": 0,
            },
            "poison": {"count": 0},
            "cleaning": {"num_clusters": 4},
            "eval": {"at_start": False},
        }),
    )
    with config.unlocked():
        config.eval.sets = {}
    return run_configs.override(config, run_configs.dotted(overrides or {}))


@dataclasses.dataclass
class PretrainingRun:
    run_dir: str
    initial_state: dict  # the state its first step started from


@pytest.fixture(scope="module")
def pretraining(world_dir, tmp_path_factory) -> PretrainingRun:
    run_dir = str(tmp_path_factory.mktemp("pretrain") / "run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder = RunRecorder(monkeypatch)
        train.train_and_evaluate(pretrain_config(world_dir), run_dir)
    return PretrainingRun(run_dir, recorder.first_state)


@pytest.fixture(scope="module")
def pretrained(pretraining) -> str:
    """The pretraining run's directory."""
    return pretraining.run_dir


def saved_state(run_dir: str, step: int) -> dict:
    """The training state a run saved at `step`, as host numpy arrays."""
    return saved_arrays.read_state(os.path.join(run_dir, "checkpoints", str(step), "state"))


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def saved_steps(run_dir: str) -> list[int]:
    return sorted(ocp.utils.checkpoint_steps(os.path.join(run_dir, "checkpoints")))


def assert_trees_equal(actual, expected):
    actual_leaves = dict(jax.tree_util.tree_leaves_with_path(actual))
    expected_leaves = dict(jax.tree_util.tree_leaves_with_path(expected))
    assert actual_leaves.keys() == expected_leaves.keys()
    for path, leaf in expected_leaves.items():
        assert np.array_equal(np.asarray(actual_leaves[path]), leaf), jax.tree_util.keystr(path)


class RunRecorder:
    """Watches a run through the seams the trainer calls: the jitted train step (the state it starts
    from, the global batches it gets), the training pipeline's batches, and k-means tables."""

    def __init__(self, monkeypatch):
        self.first_state = None
        self.num_steps = 0
        self.batch_shardings = []
        self.cluster_ids = []  # [B] per step, when deep clustering
        self.indices = []  # [B] example indices per training batch
        self.is_poisoned = []
        self.cluster_tables = []
        real_jit_step = run_group.RunGroup.jit_step
        real_next = pipeline.TrainPipeline.__next__
        real_assignments = epoch_passes.cluster_assignments

        def jit_step(group, step, shardings):
            jitted = real_jit_step(group, step, shardings)

            def call(state, batch, rng, hparams):
                if self.first_state is None:
                    self.first_state = jax.device_get(state)  # before the step donates it
                    self.first_hparams = jax.device_get(hparams)
                    self.first_batch = jax.device_get(batch)
                self.num_steps += 1
                self.batch_shardings.append(batch["image"].sharding)
                if "cluster" in batch:
                    self.cluster_ids.append(np.asarray(batch["cluster"]))
                return jitted(state, batch, rng, hparams)

            return call

        def next_batch(pipeline_self):
            batch = real_next(pipeline_self)
            self.indices.append(np.asarray(batch["index"]))
            self.is_poisoned.append(np.asarray(batch["is_poisoned"]))
            return batch

        def assignments(*args, **kwargs):
            table = real_assignments(*args, **kwargs)
            self.cluster_tables.append(table)
            return table

        monkeypatch.setattr(run_group.RunGroup, "jit_step", jit_step)
        monkeypatch.setattr(pipeline.TrainPipeline, "__next__", next_batch)
        monkeypatch.setattr(epoch_passes, "cluster_assignments", assignments)


class CleaningRun:
    def __init__(self, run_dir: str, config: ml_collections.ConfigDict, recorder: RunRecorder):
        self.run_dir, self.config, self.recorder = run_dir, config, recorder
        self.metrics = read_jsonl(os.path.join(run_dir, run_files.METRICS_FILE))


CLEANING_METHODS = {
    "CleanCLIP": {},
    # Pretraining's learning rate and number of steps: its compiled train step is reused.
    "MMCL only": {"objective": {"ssl_weight": 0.0}, "optim": {"learning_rate": 1e-3}, "train": {"num_epochs": 3}},
    "SSL only": {"objective": {"mmcl_weight": 0.0}},
    "SSL weight 4": {"objective": {"ssl_weight": 4.0}},
    "shrink and perturb": {"cleaning": {"shrink": 0.95, "perturb": 1e-4}},
    "heavy weight decay": {"optim": {"weight_decay": 1.0}},
    # PAR's loss; from a shrunk start, so that its first step's embeddings already differ from the
    # reference's (the unshrunk pretrained model's) and its term is not 0.
    "PAR": {"objective": {"ssl_weight": 0.0, "par_weight": 1.0}, "cleaning": {"shrink": 0.95, "perturb": 1e-4}},
    # Two epochs, so k-means runs twice; a checkpoint every 2 steps for the resume test below.
    "deep clustering": {
        "objective": {"cluster_weight": 5.0},
        "train": {"num_epochs": 2, "checkpoint_every_steps": 2},
    },
}


@pytest.fixture(scope="module")
def cleaning_run(world_dir, pretrained, tmp_path_factory):
    """`cleaning_run(method)`: that method's cleaning of the pretrained model, run once per module."""
    runs = {}

    def run(method: str) -> CleaningRun:
        if method not in runs:
            run_dir = str(tmp_path_factory.mktemp("clean") / "run")
            config = cleaning_config(world_dir, pretrained, CLEANING_METHODS[method])
            with pytest.MonkeyPatch.context() as monkeypatch:
                recorder = RunRecorder(monkeypatch)
                train.train_and_evaluate(config, run_dir)
            runs[method] = CleaningRun(run_dir, config, recorder)
        return runs[method]

    return run


# ---------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------

# Runs the pretraining of this module in a separate process, slowed down between logged steps so
# the test can kill it part-way.
_KILLABLE_RUN = """
import sys, time
sys.path.insert(0, sys.argv[1])
import jax
jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py sets it
import test_train
from bclip import run_files, train

write = run_files.JsonLines.write
def write_slowly(self, record):
    write(self, record)
    time.sleep(0.3)
run_files.JsonLines.write = write_slowly
train.train_and_evaluate(test_train.pretrain_config(sys.argv[2]), sys.argv[3])
"""


@pytest.mark.slow
def test_killed_run_resumes_to_identical_parameters(world_dir, pretrained, tmp_path):
    run_dir = str(tmp_path / "run")
    # The same XLA flags (8 devices, as tests/conftest.py sets them) compile the same programs, and
    # the session's compilation cache spares compiling them again.
    assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    metrics_path = os.path.join(run_dir, run_files.METRICS_FILE)
    with open(tmp_path / "run.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", _KILLABLE_RUN, TESTS_DIR, world_dir, run_dir], env=env, stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 150
            # Kill once the step-4 checkpoint is complete and a later step has been logged.
            while time.monotonic() < deadline and process.poll() is None:
                if 4 in saved_steps(run_dir) and os.path.exists(metrics_path):
                    if max(record["step"] for record in read_jsonl(metrics_path)) > 4:
                        break
                time.sleep(0.05)
            assert process.poll() is None, f"the run ended before it was killed:\n{(tmp_path / 'run.log').read_text()[-3000:]}"
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()

    assert not os.path.exists(os.path.join(run_dir, run_files.DONE_FILE))
    resume_step = saved_steps(run_dir)[-1]
    assert 4 <= resume_step < PRETRAIN_STEPS
    metrics_before = read_jsonl(metrics_path)
    evals_before = read_jsonl(os.path.join(run_dir, run_files.EVALS_FILE))
    assert metrics_before[-1]["step"] < PRETRAIN_STEPS

    train.train_and_evaluate(pretrain_config(world_dir), run_dir)

    assert saved_steps(run_dir)[-1] == PRETRAIN_STEPS
    assert_trees_equal(saved_state(run_dir, PRETRAIN_STEPS), saved_state(pretrained, PRETRAIN_STEPS))
    with open(os.path.join(run_dir, run_files.POISON_FILE)) as f, open(os.path.join(pretrained, run_files.POISON_FILE)) as g:
        assert json.load(f) == json.load(g)

    # Every step logged once; what came before the checkpoint is kept as it was written.
    metrics = read_jsonl(metrics_path)
    assert [record["step"] for record in metrics] == list(range(1, PRETRAIN_STEPS + 1))
    kept = [record for record in metrics_before if record["step"] <= resume_step]
    assert metrics[: len(kept)] == kept
    reference = read_jsonl(os.path.join(pretrained, run_files.METRICS_FILE))
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [record[key] for record in metrics] == [record[key] for record in reference]
    evals = read_jsonl(os.path.join(run_dir, run_files.EVALS_FILE))
    assert [record["step"] for record in evals] == [0, 6, 12]
    assert evals[0] == evals_before[0]
    assert evals == read_jsonl(os.path.join(pretrained, run_files.EVALS_FILE))


def test_finished_run_is_not_trained_again(world_dir, pretrained, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    shutil.copytree(pretrained, run_dir)
    recorder = RunRecorder(monkeypatch)
    results = train.train_and_evaluate(pretrain_config(world_dir), run_dir)
    assert recorder.num_steps == 0
    last_eval = read_jsonl(os.path.join(pretrained, run_files.EVALS_FILE))[-1]
    assert results == {k: v for k, v in last_eval.items() if k not in ("step", "epoch")}
    assert results["test/num_images"] == 16
    assert read_jsonl(os.path.join(run_dir, run_files.METRICS_FILE)) == read_jsonl(os.path.join(pretrained, run_files.METRICS_FILE))


@pytest.mark.slow
def test_deep_clustering_resumes_mid_epoch(world_dir, pretrained, cleaning_run, tmp_path, monkeypatch):
    reference = cleaning_run("deep clustering")
    config = reference.config
    run_dir = str(tmp_path / "run")
    # 4 steps per epoch, checkpoints every 2 (the two newest kept): the finished run, less its last
    # checkpoint and its done.json, is the run interrupted before step 7. It resumes from step 6,
    # halfway through the second epoch, whose k-means table and head it must keep.
    shutil.copytree(reference.run_dir, run_dir)
    assert saved_steps(run_dir) == [6, 8]
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "8"))
    os.remove(os.path.join(run_dir, run_files.DONE_FILE))
    recorder = RunRecorder(monkeypatch)
    train.train_and_evaluate(config, run_dir)
    assert recorder.num_steps == 2
    assert_trees_equal(saved_state(run_dir, 8), saved_state(reference.run_dir, 8))
    assert recorder.cluster_tables == []  # the epoch's table was read back, not recomputed


# ---------------------------------------------------------------------------------------------
# Starting a cleaning run
# ---------------------------------------------------------------------------------------------


def test_cleaning_starts_from_pretrained_params_with_fresh_optimizer(cleaning_run, pretrained):
    run = cleaning_run("CleanCLIP")
    first = run.recorder.first_state
    pretrained_state = saved_state(pretrained, PRETRAIN_STEPS)
    assert_trees_equal(first["params"], pretrained_state["params"])
    assert int(first["step"]) == 0

    opt_leaves = jax.tree_util.tree_leaves_with_path(first["opt"])
    counts = [leaf for path, leaf in opt_leaves if jax.tree_util.keystr(path).endswith(".count")]
    moments = [leaf for path, leaf in opt_leaves if ".mu" in jax.tree_util.keystr(path) or ".nu" in jax.tree_util.keystr(path)]
    assert counts and all(int(count) == 0 for count in counts)
    assert len(moments) == 2 * len(jax.tree.leaves(first["params"]))
    assert all(not np.any(moment) for moment in moments)
    # The pretraining optimiser, which the cleaning run must not have taken over, had moved on.
    saved_counts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(pretrained_state["opt"]) if "count" in jax.tree_util.keystr(path)]
    assert saved_counts and all(int(count) == PRETRAIN_STEPS for count in saved_counts)

    # Warm-up from zero over the first 3 steps of the cleaning run's own schedule.
    learning_rates = [record["learning_rate"] for record in run.metrics]
    np.testing.assert_allclose(learning_rates[:4], [0.0, CLEAN_LEARNING_RATE / 3, 2 * CLEAN_LEARNING_RATE / 3, CLEAN_LEARNING_RATE], rtol=1e-6)


def test_shrink_and_perturb_mixes_pretrained_and_fresh_weights(cleaning_run, pretraining):
    run = cleaning_run("shrink and perturb")
    pretrained_params = saved_state(pretraining.run_dir, PRETRAIN_STEPS)["params"]
    # Both runs have seed 0, so the cleaning run's fresh weights are those pretraining started from.
    assert run.config.seed == pretrain_config("").seed
    fresh = pretraining.initial_state["params"]
    first = run.recorder.first_state["params"]

    embedding = lambda params: np.asarray(params["text_tower"]["token_embedding"]["embedding"])
    np.testing.assert_allclose(embedding(first), 0.95 * embedding(pretrained_params) + 1e-4 * embedding(fresh), rtol=1e-6, atol=1e-12)
    assert not np.allclose(embedding(first), embedding(pretrained_params), rtol=1e-3, atol=0)
    for path, value in jax.tree_util.tree_leaves_with_path(pretrained_params):
        name = jax.tree_util.keystr(path)
        if "logit_scale" in name:  # a log temperature: kept, not shrunk
            assert np.array_equal(_get(first, path), value)
        else:
            expected = 0.95 * value + 1e-4 * np.asarray(_get(fresh, path))
            np.testing.assert_allclose(_get(first, path), expected, rtol=1e-5, atol=1e-9, err_msg=name)


@pytest.mark.slow
def test_shrink_and_perturb_records_the_unshrunk_original_at_step_0(world_dir, pretrained, tmp_path):
    """The step-0 evaluation is the pretrained model itself (the point the reports compare every
    cleaning point with); the shrunk start is logged beside it."""
    config = cleaning_config(
        world_dir,
        pretrained,
        {
            # A strong shrink, so the shrunk model's figures cannot pass for the original's.
            "cleaning": {"shrink": 0.3, "perturb": 0.7},
            "eval": {"at_start": True, "sets": {"test": {"kind": "folder", "path": os.path.join(world_dir, "test")}}},
            "train": {"subset_size": 32},
        },
    )
    run_dir = str(tmp_path / "run")
    train.train_and_evaluate(config, run_dir)
    start = read_jsonl(os.path.join(run_dir, run_files.EVALS_FILE))[0]
    # The pretraining run evaluated the same weights (its last step's) on the same set and seed.
    pretrained_final = read_jsonl(os.path.join(pretrained, run_files.EVALS_FILE))[-1]
    assert start["step"] == 0
    figures = ("test/top1", "test/top5", "test/asr")
    assert {key: start[key] for key in figures} == {key: pretrained_final[key] for key in figures}
    shrunk = start["after_start_transform"]
    assert set(shrunk) == {key for key in start if key.startswith("test/")}
    assert (shrunk["test/top1"], shrunk["test/asr"]) != (start["test/top1"], start["test/asr"])


def _get(tree, path):
    for entry in path:
        tree = tree[entry.key]
    return tree


def test_missing_init_checkpoint_fails_before_training(world_dir, pretrained, tmp_path, monkeypatch):
    missing = str(tmp_path / "no_such_run")
    config = cleaning_config(world_dir, pretrained, {"train": {"init_from": missing}, "eval": {"at_start": True}})
    recorder = RunRecorder(monkeypatch)
    run_dir = str(tmp_path / "run")
    with pytest.raises(checkpointing.CheckpointError, match=re.escape(missing)):
        train.train_and_evaluate(config, run_dir)
    assert recorder.num_steps == 0
    assert not os.path.exists(os.path.join(run_dir, run_files.METRICS_FILE))
    assert not os.path.exists(os.path.join(run_dir, run_files.EVALS_FILE))

    empty = tmp_path / "empty_run"
    empty.mkdir()
    config = cleaning_config(world_dir, pretrained, {"train": {"init_from": str(empty)}})
    with pytest.raises(checkpointing.CheckpointError, match="no finished checkpoint"):
        train.train_and_evaluate(config, run_dir)


def test_init_checkpoint_of_another_model_fails_before_training(world_dir, pretrained, tmp_path, monkeypatch):
    # A wider text tower: same parameter names, other shapes.
    config = cleaning_config(world_dir, pretrained, {"model": {"text": {"width": 64}}, "eval": {"at_start": True}})
    recorder = RunRecorder(monkeypatch)
    run_dir = str(tmp_path / "run")
    with pytest.raises(checkpointing.CheckpointError) as error:
        train.train_and_evaluate(config, run_dir)
    message = str(error.value)
    assert os.path.join(pretrained, "checkpoints", str(PRETRAIN_STEPS)) in message
    assert "['text_tower']['token_embedding']['embedding']: checkpoint (256, 32) vs model (256, 64)" in message
    assert recorder.num_steps == 0
    assert not os.path.exists(os.path.join(run_dir, run_files.METRICS_FILE))
    assert not os.path.exists(os.path.join(run_dir, run_files.EVALS_FILE))


def abstract_variables(params) -> dict:
    """{"params", "batch_stats"} shapes of `params`' model, replicated over the 8 devices."""
    mesh = sharding.make_mesh()
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding.replicated(mesh)),
        {"params": params, "batch_stats": {}},
    )


def test_init_from_reads_a_run_its_checkpoints_or_one_step(pretrained):
    saved = {step: saved_state(pretrained, step) for step in saved_steps(pretrained)}
    assert sorted(saved) == [6, 8, PRETRAIN_STEPS]
    abstract = abstract_variables(saved[8]["params"])
    checkpoints = os.path.join(pretrained, "checkpoints")
    for path, step in [(pretrained, PRETRAIN_STEPS), (checkpoints, PRETRAIN_STEPS), (os.path.join(checkpoints, "8"), 8)]:
        variables, where = checkpointing.load_model_variables(path, abstract)
        assert where == os.path.join(checkpoints, str(step))
        assert_trees_equal(variables["params"], saved[step]["params"])


# ---------------------------------------------------------------------------------------------
# Starting from a chosen epoch
# ---------------------------------------------------------------------------------------------


def test_pretraining_keeps_every_epochs_checkpoint(pretrained):
    # Saved after steps 4, 6 (end of epoch 1), 8 and 12 (end of epoch 2); of the rolling ones only
    # the two newest stay, so step 4 is gone and step 6 stays as epoch 1's.
    assert saved_steps(pretrained) == [PRETRAIN_STEPS_PER_EPOCH, 8, PRETRAIN_STEPS]
    with open(os.path.join(pretrained, "checkpoints", checkpointing.EPOCHS_FILE)) as f:
        assert json.load(f) == {"steps_per_epoch": PRETRAIN_STEPS_PER_EPOCH}


def test_init_from_epoch_reads_the_checkpoint_saved_after_that_many_epochs(pretrained, tmp_path):
    saved = {step: saved_state(pretrained, step)["params"] for step in saved_steps(pretrained)}
    abstract = abstract_variables(saved[8])
    checkpoints = os.path.join(pretrained, "checkpoints")
    for path in (pretrained, checkpoints):
        for epoch, step in [(1, 6), (2, 12)]:
            variables, where = checkpointing.load_model_variables(path, abstract, epoch=epoch)
            assert where == os.path.join(checkpoints, str(step))
            assert_trees_equal(variables["params"], saved[step])

    with pytest.raises(checkpointing.CheckpointError) as error:
        checkpointing.load_model_variables(pretrained, abstract, epoch=3)
    assert str(error.value).startswith(
        f"{checkpoints} holds no checkpoint of epoch 3 (step 18 at 6 steps per epoch); "
        "epochs with a checkpoint: [1, 2] (steps saved: [6, 8, 12])"
    )
    with pytest.raises(checkpointing.CheckpointError, match="is one step directory"):
        checkpointing.load_model_variables(os.path.join(checkpoints, "8"), abstract, epoch=1)
    for epoch in (0, -2):
        with pytest.raises(checkpointing.CheckpointError, match=f"must be -1 .* got {epoch}"):
            checkpointing.load_model_variables(pretrained, abstract, epoch=epoch)
    # Without the run's epochs record the step of an epoch is not guessed.
    copy = tmp_path / "copy"
    shutil.copytree(checkpoints, copy / "checkpoints")
    os.remove(copy / "checkpoints" / checkpointing.EPOCHS_FILE)
    with pytest.raises(checkpointing.CheckpointError, match=f"has no {checkpointing.EPOCHS_FILE}"):
        checkpointing.load_model_variables(str(copy), abstract, epoch=1)


def test_missing_start_epoch_fails_before_training(world_dir, pretrained, tmp_path, monkeypatch):
    recorder = RunRecorder(monkeypatch)
    run_dir = str(tmp_path / "run")
    config = cleaning_config(world_dir, pretrained, {"train": {"init_from_epoch": 5}})
    with pytest.raises(checkpointing.CheckpointError, match=re.escape("epochs with a checkpoint: [1, 2]")):
        train.train_and_evaluate(config, run_dir)
    assert recorder.num_steps == 0
    assert not os.path.exists(os.path.join(run_dir, run_files.METRICS_FILE))


def test_start_keys_need_init_from():
    config = run_configs.run_config()
    run_start.check_start_keys(config.train)
    config.train.init_from_epoch = 21
    with pytest.raises(ValueError, match="train.init_from_epoch=21 needs train.init_from"):
        run_start.check_start_keys(config.train)
    config.train.init_from_epoch = -1
    config.train.reload_optimizer_state = True
    with pytest.raises(ValueError, match="reload_optimizer_state needs train.init_from"):
        run_start.check_start_keys(config.train)
    config.train.init_from = "/runs/pretrained"
    run_start.check_start_keys(config.train)


# ---------------------------------------------------------------------------------------------
# Reloading the pretraining optimiser (the reference's behaviour, opt-in)
# ---------------------------------------------------------------------------------------------

# From the end of pretraining epoch 1 (step 6), with weight decay 1.0 configured as heavy weight
# decay does: the pretraining run's 0.1 must replace it.
RELOADING = {"train": {"init_from_epoch": 1, "reload_optimizer_state": True}, "optim": {"weight_decay": 1.0}}


@pytest.fixture(scope="module")
def reloading_run(world_dir, pretrained, tmp_path_factory) -> CleaningRun:
    run_dir = str(tmp_path_factory.mktemp("reload") / "run")
    config = cleaning_config(world_dir, pretrained, RELOADING)
    warnings = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder = RunRecorder(monkeypatch)
        monkeypatch.setattr(train.logging, "warning", lambda message, *args: warnings.append(message % args))
        train.train_and_evaluate(config, run_dir)
    run = CleaningRun(run_dir, config, recorder)
    run.warnings = warnings
    return run


def test_init_from_epoch_starts_the_run_from_that_epochs_params(reloading_run, pretrained):
    first = reloading_run.recorder.first_state["params"]
    assert_trees_equal(first, saved_state(pretrained, PRETRAIN_STEPS_PER_EPOCH)["params"])
    final = saved_state(pretrained, PRETRAIN_STEPS)["params"]
    assert not np.array_equal(first["text_tower"]["token_embedding"]["embedding"], final["text_tower"]["token_embedding"]["embedding"])
    assert reloading_run.recorder.num_steps == CLEAN_SUBSET // 16


def test_reloaded_optimizer_continues_adam_with_the_pretraining_weight_decay(reloading_run, pretrained):
    opt = reloading_run.recorder.first_state["opt"]
    saved_adam = saved_state(pretrained, PRETRAIN_STEPS_PER_EPOCH)["opt"]["inner_state"][0]
    adam = optim.adam_state(opt)
    # Adam's moments and step count (bias correction) are those saved after 6 pretraining steps.
    assert int(adam.count) == PRETRAIN_STEPS_PER_EPOCH
    assert_trees_equal(adam.mu, saved_adam["mu"])
    assert_trees_equal(adam.nu, saved_adam["nu"])
    assert any(np.any(leaf) for leaf in jax.tree.leaves(adam.nu))
    # The pretraining run's weight decay replaced the configured 1.0, and the log says so.
    assert reloading_run.config.optim.weight_decay == 1.0
    np.testing.assert_array_equal(reloading_run.recorder.first_hparams["weight_decay"], np.float32([0.1]))
    step_dir = os.path.join(pretrained, "checkpoints", "6")
    assert [w for w in reloading_run.warnings if "reload_optimizer_state" in w] == [
        f"train.reload_optimizer_state: Adam's moments and step count 6 come from {step_dir}; the learning-rate "
        "schedule starts fresh",
        f"train.reload_optimizer_state: the weight decay 0.1 of {step_dir} replaces the configured optim.weight_decay 1",
    ]
    # The schedule starts over: its own count is 0 and the warm-up runs from 0 as in a fresh run.
    assert int(opt.count) == 0
    learning_rates = [record["learning_rate"] for record in reloading_run.metrics]
    np.testing.assert_allclose(learning_rates[:4], [0.0, CLEAN_LEARNING_RATE / 3, 2 * CLEAN_LEARNING_RATE / 3, CLEAN_LEARNING_RATE], rtol=1e-6)


def test_reload_needs_the_pretraining_optimizers_structure(world_dir, pretrained, tmp_path, monkeypatch):
    # Gradient clipping adds a stage to the optimiser chain that the pretraining run did not have.
    config = cleaning_config(world_dir, pretrained, {**RELOADING, "optim": {"grad_clip_norm": 1.0}})
    recorder = RunRecorder(monkeypatch)
    with pytest.raises(checkpointing.CheckpointError) as error:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    message = str(error.value)
    assert message.startswith(
        f"the optimiser state in the checkpoint at {os.path.join(pretrained, 'checkpoints', '6')} does not have the "
        "configured optimiser's structure"
    )
    # Every path of the configured state is one level deeper (under the chain's stage 1).
    assert "missing 1/count; missing 1/hyperparams/b1;" in message and "not in the configured optimiser: count;" in message
    assert recorder.num_steps == 0


def test_with_reloaded_adam_keeps_fresh_moments_for_new_params():
    params = {"w": jnp.ones((2, 3)), "cluster_head": jnp.ones((3, 4))}
    model_params = {"w": params["w"]}
    for clip in (None, 1.0):
        tx = optim.make_optimizer(optim.optim_config(warmup_steps=2, grad_clip_norm=clip, weight_decay=0.5))
        saved = tx.init(model_params)
        for _ in range(3):
            _, saved = tx.update({"w": jnp.full((2, 3), 0.5)}, saved, model_params)
        fresh = tx.init(params)
        reloaded = optim.with_reloaded_adam(fresh, saved)
        adam = optim.adam_state(reloaded)
        assert int(adam.count) == 3
        np.testing.assert_array_equal(adam.mu["w"], optim.adam_state(saved).mu["w"])
        np.testing.assert_array_equal(adam.nu["w"], optim.adam_state(saved).nu["w"])
        assert not np.any(adam.mu["cluster_head"]) and not np.any(adam.nu["cluster_head"])
        injected = reloaded[-1] if clip else reloaded
        assert int(injected.count) == 0  # the schedule's own count: fresh
    with pytest.raises(ValueError, match=r"parameters the model does not have: \['extra'\]"):
        optim.with_reloaded_adam(tx.init(model_params), tx.init({"w": params["w"], "extra": params["w"]}))


# ---------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_without_saving_it(world_dir, tmp_path):
    # Weight decay is a hyper-parameter argument, so this runs the pretraining's compiled step.
    config = run_configs.override(
        pretrain_config(world_dir),
        {"optim.weight_decay": 1e30, "train.checkpoint_every_steps": 1, "eval.at_start": False},
    )
    run_dir = str(tmp_path / "run")
    with pytest.raises(train.NonFiniteLossError) as error:
        train.train_and_evaluate(config, run_dir)
    # Step 1 trains at learning rate 0 (warm-up); step 2's decay blows the weights up, so the loss
    # of step 3, computed from them, is NaN.
    last_good = os.path.join(run_dir, "checkpoints", "1")
    assert str(error.value) == f"loss is nan at step 3; last good checkpoint: {last_good}"
    metrics = read_jsonl(os.path.join(run_dir, run_files.METRICS_FILE))
    assert [record["step"] for record in metrics] == [1, 2]
    assert all(np.isfinite(record["loss"]) for record in metrics)
    # The state after step 2, which produced the NaN, is not kept either.
    assert saved_steps(run_dir) == [1]
    assert not os.path.exists(os.path.join(run_dir, run_files.DONE_FILE))


# ---------------------------------------------------------------------------------------------
# Cleaning methods
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CLEANING_METHODS))
def test_cleaning_method_trains_sharded_with_finite_losses(cleaning_run, method):
    run = cleaning_run(method)
    objective = run.config.objective
    steps = run.config.train.num_epochs * CLEAN_SUBSET // 16
    assert run.recorder.num_steps == steps
    for batch_sharding in run.recorder.batch_shardings:
        assert len(batch_sharding.device_set) == 8 and batch_sharding.spec[0] == "data"
    assert [record["step"] for record in run.metrics] == list(range(1, steps + 1))
    weights = {name: objective[f"{name}_weight"] for name in ("mmcl", "ssl", "cluster", "par")}
    for record in run.metrics:
        assert np.isfinite(record["loss"])
        terms = {name: record[name] for name, weight in weights.items() if weight}
        assert set(terms) == {name for name in weights if name in record}
        np.testing.assert_allclose(record["loss"], sum(weights[name] * value for name, value in terms.items()), rtol=1e-5)
    # The run's hyper-parameters, arguments of the step.
    hparams = run.recorder.first_hparams
    np.testing.assert_array_equal(hparams["weight_decay"], np.float32([run.config.optim.weight_decay]))
    np.testing.assert_array_equal(hparams["learning_rate"], np.float32([run.config.optim.learning_rate]))
    for name in weights:
        np.testing.assert_array_equal(hparams[f"{name}_weight"], np.float32([weights[name]]))
    assert run.config.optim.weight_decay == (1.0 if method == "heavy weight decay" else 0.1)
    assert saved_steps(run.run_dir)[-1] == steps


@pytest.mark.slow
def test_par_pushes_away_from_the_pretrained_model_kept_frozen_in_the_state(cleaning_run, pretrained):
    run = cleaning_run("PAR")
    first, batch = run.recorder.first_state, run.recorder.first_batch
    pretrained_params = saved_state(pretrained, PRETRAIN_STEPS)["params"]
    # The state carries the pretrained model, unshrunk, beside the shrunk one being trained, and
    # still holds it unchanged at the end.
    assert_trees_equal(first[train_step.REFERENCE]["params"], pretrained_params)
    assert not np.array_equal(first["params"]["text_tower"]["text_projection"], pretrained_params["text_tower"]["text_projection"])
    assert_trees_equal(saved_state(run.run_dir, 4)[train_step.REFERENCE]["params"], pretrained_params)
    # The first step's term, from both models' embeddings of its batch, in numpy.
    model = clip_model.build_model(run.config.model)
    apply = jax.jit(clip_model.apply_model, static_argnums=0)
    (image, text), _ = apply(model, {"params": first["params"]}, batch["image"], batch["text"])
    (image0, text0), _ = apply(model, {"params": pretrained_params}, batch["image"], batch["text"])
    image_distance, text_distance = (
        np.mean(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=-1))
        for a, b in ((image, image0), (text, text0))
    )
    assert 0 < image_distance < 2.15 and 0 < text_distance < 2.15
    np.testing.assert_allclose(run.metrics[0]["par"], -0.5 * (image_distance + text_distance), rtol=1e-3)


@pytest.mark.slow
def test_deep_clustering_trains_on_kmeans_ids_of_the_cleaning_set(cleaning_run, pretrained):
    run = cleaning_run("deep clustering")
    recorder = run.recorder
    source = pipeline.training_source(run.config.data)
    clean_indices = training_input.clean_training_source(source, run.config.train).indices
    assert len(recorder.cluster_tables) == 2  # once before each epoch
    for table in recorder.cluster_tables:
        assert table.shape == (len(source),)
        assigned = np.flatnonzero(table >= 0)
        assert np.array_equal(assigned, clean_indices)
        assert table.max() < 4
        assert len(np.unique(table[assigned])) >= 2
    # The ids in each batch are the current epoch's clusters of the batch's examples.
    assert len(recorder.cluster_ids) == len(recorder.indices) == 8
    for step, (ids, indices) in enumerate(zip(recorder.cluster_ids, recorder.indices)):
        table = recorder.cluster_tables[step // 4]
        assert np.array_equal(ids, table[indices])
    final = saved_state(run.run_dir, 8)
    assert "cluster_head" in final["params"]
    # The checkpoint holds the epoch's table with the state it trained.
    np.testing.assert_array_equal(final[train.EPOCH_TABLES]["deep_clustering"], recorder.cluster_tables[1])


# ---------------------------------------------------------------------------------------------
# The clean set
# ---------------------------------------------------------------------------------------------


def test_clean_training_source_excludes_poisoned_indices(world_dir, pretrained, tmp_path):
    config = cleaning_config(world_dir, pretrained)
    source = pipeline.training_source(config.data)
    poisoned = poisoning.PoisonPlan.read(config.train.exclude_indices_file).indices
    assert len(poisoned) == NUM_POISONED
    # A random CLEAN_SUBSET of the clean pairs, drawn by the subset seed, in index order.
    remaining = np.setdiff1d(np.arange(NUM_TRAIN), poisoned)
    expected = np.sort(remaining[np.random.default_rng(config.train.subset_seed).choice(len(remaining), CLEAN_SUBSET, replace=False)])
    assert np.intersect1d(poisoned, np.arange(expected[-1])).size > 0
    # Random, not the first ones: the subset reaches past the first CLEAN_SUBSET clean pairs.
    assert expected[-1] > remaining[CLEAN_SUBSET - 1]

    clean = training_input.clean_training_source(source, config.train)
    assert np.array_equal(clean.indices, expected)
    assert len(clean) == CLEAN_SUBSET
    assert [clean[i]["index"] for i in range(len(clean))] == expected.tolist()
    assert clean.captions == [source.captions[i] for i in expected]

    # A plain JSON list of indices works the same way.
    plain = tmp_path / "poisoned.json"
    plain.write_text(json.dumps(poisoned.tolist()))
    with config.train.unlocked():
        config.train.exclude_indices_file = str(plain)
    assert np.array_equal(training_input.clean_training_source(source, config.train).indices, expected)

    # Another seed draws another subset of the same size, still free of poisons.
    config.train.subset_seed = 1
    other = training_input.clean_training_source(source, config.train).indices
    assert len(other) == CLEAN_SUBSET and not np.array_equal(other, expected)
    assert np.intersect1d(other, poisoned).size == 0
    config.train.subset_size = NUM_TRAIN - NUM_POISONED + 1
    with pytest.raises(ValueError, match="subset_size"):
        training_input.clean_training_source(source, config.train)
    config.train.subset_size = 0
    assert len(training_input.clean_training_source(source, config.train)) == NUM_TRAIN - NUM_POISONED


def test_cleaning_run_reads_only_clean_examples(cleaning_run, pretrained):
    run = cleaning_run("CleanCLIP")
    poisoned = poisoning.PoisonPlan.read(run.config.train.exclude_indices_file).indices
    seen = np.concatenate(run.recorder.indices)
    assert len(seen) == CLEAN_SUBSET  # one epoch
    assert np.intersect1d(seen, poisoned).size == 0
    remaining = np.setdiff1d(np.arange(NUM_TRAIN), poisoned)
    drawn = remaining[np.random.default_rng(run.config.train.subset_seed).choice(len(remaining), CLEAN_SUBSET, replace=False)]
    assert np.array_equal(np.sort(seen), np.sort(drawn))
    assert not np.any(np.concatenate(run.recorder.is_poisoned))
    assert not os.path.exists(os.path.join(run.run_dir, run_files.POISON_FILE))  # nothing poisoned here
