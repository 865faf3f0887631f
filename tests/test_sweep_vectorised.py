"""`python -m bclip.sweep --vectorize`: the runs of a sweep trained as one group (train.train_group)
write what the same runs write one after another (evaluations, logs, final parameters; exactly
that with the "dispatch" run loop), resume after an interruption, skip finished runs, fail a
diverged run alone, and refuse sweeps they cannot carry.

A micro ViT CLIP cleans a "pretrained" checkpoint (its random initialisation, saved) on 32 pairs of
the synthetic world: 2 steps per epoch, 2 epochs, evaluated before and after each epoch.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import saved_arrays

from bclip import config as run_configs
from bclip import cpu_runtime, experiment, run_files, run_group, sharding, train, train_step
from bclip.models import clip
from bclip.sweep import __main__ as sweep_main
from bclip.sweep import execute as sweep_execute
from bclip.sweep import runs as sweep_runs

TOTAL_STEPS = 4
RUN_NAMES = ["lr=0.001", "lr=0.003_ssl_weight=2_wd=0.5"]

SWEEP_CONFIG = '''
"""CleanCLIP on 32 clean pairs at two settings that only differ in scalars."""
from bclip import config as run_configs

WORLD, PRETRAINED = {world!r}, {pretrained!r}


def get_config(arg=None):
    config = run_configs.run_config("micro-vit", text={{"vocab_size": 256, "context_length": 24}})
    config.data.train_csv = WORLD + "/train/train.csv"
    config.data.tokenizer.path = WORLD + "/vocab.txt"
    config.data.synonyms = WORLD + "/synonyms.json"
    config.data.image_augment = "simclr"
    config.data.batch_size = 16
    config.objective.ssl_weight = 1.0
    # Round-off in gradients that are exactly zero in exact arithmetic (it differs between the
    # vectorised and the single-run program) would become whole Adam steps with eps=1e-8.
    config.optim.eps = 1e-3
    config.optim.warmup_steps = 2
    config.poison.count = 0
    config.poison.trigger.size = 5
    config.train.init_from = PRETRAINED
    config.train.subset_size = 32
    config.train.num_epochs = 2
    config.train.log_every_steps = 1
    config.eval.batch_size = 16
    config.eval.sets.test.path = WORLD + "/test"
    {extra}
    return config


def get_sweep(arg=None):
    return {sweep}
'''

SWEEP = [
    {"optim.learning_rate": 1e-3},
    {"optim.learning_rate": 3e-3, "objective.ssl_weight": 2.0, "optim.weight_decay": 0.5},
]


@pytest.fixture(scope="module")
def world_and_pretrained(tmp_path_factory):
    """The synthetic world and a "pretrained" checkpoint of the sweep's model."""
    workdir = tmp_path_factory.mktemp("vectorised")
    world = experiment.study_config().world
    world.num_train, world.num_test, world.num_selection = 64, 16, 8
    world_dir = experiment.prepare_world(world, str(workdir))
    model_config = run_configs.run_config("micro-vit", text={"vocab_size": 256, "context_length": 24}).model
    variables = train_step.init_variables(clip.build_model(model_config), jax.random.key(1), 32, 24)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(workdir / "pretrained" / "checkpoints" / "1" / "state", variables)
    checkpointer.wait_until_finished()
    return world_dir, str(workdir / "pretrained")


def write_sweep_config(path, world_and_pretrained, sweep_source=repr(SWEEP), extra="") -> str:
    """A sweep config file: SWEEP_CONFIG with `sweep_source` as get_sweep's list and `extra` lines
    added to get_config."""
    world, pretrained = world_and_pretrained
    path.write_text(SWEEP_CONFIG.format(world=world, pretrained=pretrained, sweep=sweep_source, extra=extra))
    return str(path)


@pytest.fixture(scope="module")
def config_file(world_and_pretrained, tmp_path_factory):
    return write_sweep_config(tmp_path_factory.mktemp("config") / "sweep_config.py", world_and_pretrained)


@pytest.fixture(scope="module")
def sequential_root(config_file, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sequential"))
    assert sweep_execute.sweep(config_file, root) == 0
    return root


@pytest.fixture(scope="module")
def vectorised_root(config_file, tmp_path_factory):
    """The sweep trained as one group, with this host's default run loop."""
    root = str(tmp_path_factory.mktemp("vectorised"))
    assert sweep_execute.sweep(config_file, root, vectorize=True) == 0
    return root


def group_root_with_run_loop(run_loop, config_file, vectorised_root, tmp_path_factory) -> str:
    """The sweep trained as one group with `run_loop` (the vectorised root when that is this
    host's default)."""
    if run_group.default_run_loop(jax.devices()) == run_loop:
        return vectorised_root
    root = str(tmp_path_factory.mktemp(run_loop))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(run_group, "default_run_loop", lambda devices: run_loop)
        assert sweep_execute.sweep(config_file, root, vectorize=True) == 0
    return root


@pytest.fixture(scope="module")
def vmapped_root(config_file, vectorised_root, tmp_path_factory):
    """The group's runs vmapped (accelerators' default): batched ops that round differently."""
    return group_root_with_run_loop("vmap", config_file, vectorised_root, tmp_path_factory)


@pytest.fixture(scope="module")
def dispatched_root(config_file, vectorised_root, tmp_path_factory):
    """The group's runs stepped one at a time by one compiled one-run program (CPUs' default)."""
    return group_root_with_run_loop("dispatch", config_file, vectorised_root, tmp_path_factory)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def logged_metrics(run_dir: str) -> list[dict]:
    """A run's metrics.jsonl records without their speed (pairs_per_s), which no two runs share."""
    records = read_jsonl(os.path.join(run_dir, run_files.METRICS_FILE))
    return [{k: v for k, v in record.items() if k != "pairs_per_s"} for record in records]


def final_state(run_dir: str) -> dict:
    return saved_arrays.read_state(os.path.join(run_dir, "checkpoints", str(TOTAL_STEPS), "state"))


# ---------------------------------------------------------------------------------------------
# Same outputs as the runs one after another
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sequential_reference_runs(sequential_root):
    # The first test to use the `sequential_root` fixture, so it carries its set-up (two runs).
    for name in RUN_NAMES:
        evals = read_jsonl(os.path.join(sequential_root, name, run_files.EVALS_FILE))
        assert [record["step"] for record in evals] == [0, 2, 4]
        assert evals[-1]["test/num_images"] == 16


@pytest.mark.slow
def test_each_vmapped_run_writes_what_its_sequential_run_writes(sequential_root, vmapped_root):
    # The first test to use the `vmapped_root` fixture, so it carries its set-up (the group).
    for name in RUN_NAMES:
        sequential, vectorised = os.path.join(sequential_root, name), os.path.join(vmapped_root, name)
        for file in ("overrides.json", "config.json"):
            with open(os.path.join(sequential, file)) as f, open(os.path.join(vectorised, file)) as g:
                assert json.load(f) == json.load(g), f"{name}/{file}"
        # Evaluations: same steps, same keys, same figures (discrete counts over 16 images).
        evals, expected_evals = (read_jsonl(os.path.join(d, run_files.EVALS_FILE)) for d in (vectorised, sequential))
        assert [record["step"] for record in evals] == [0, 2, 4]
        assert evals == expected_evals, name
        with open(os.path.join(sequential, run_files.DONE_FILE)) as f, open(os.path.join(vectorised, run_files.DONE_FILE)) as g:
            assert json.load(f) == json.load(g)
        # Training logs: same steps and keys, the same values to float tolerance.
        metrics, expected = (read_jsonl(os.path.join(d, run_files.METRICS_FILE)) for d in (vectorised, sequential))
        assert [record.keys() for record in metrics] == [record.keys() for record in expected]
        assert [record["step"] for record in metrics] == list(range(1, TOTAL_STEPS + 1))
        for key in ("loss", "mmcl", "ssl", "grad_norm", "learning_rate", "temperature"):
            np.testing.assert_allclose(
                [record[key] for record in metrics], [record[key] for record in expected], rtol=1e-5, err_msg=key
            )


@pytest.mark.slow
def test_dispatched_runs_write_exactly_what_their_sequential_runs_write(sequential_root, dispatched_root):
    """Stepped one at a time by one compiled one-run program, the group's runs do a lone run's
    arithmetic: the same logs and evaluations to the last digit, the same final state to the bit
    (with the tests' XLA flags; see test_run_group's test of dispatched runs for XLA's defaults)."""
    for name in RUN_NAMES:
        sequential, dispatched = os.path.join(sequential_root, name), os.path.join(dispatched_root, name)
        assert read_jsonl(os.path.join(dispatched, run_files.EVALS_FILE)) == read_jsonl(os.path.join(sequential, run_files.EVALS_FILE))
        metrics = logged_metrics(dispatched)
        assert [record["step"] for record in metrics] == list(range(1, TOTAL_STEPS + 1))
        assert metrics == logged_metrics(sequential), name
        with open(os.path.join(sequential, run_files.DONE_FILE)) as f, open(os.path.join(dispatched, run_files.DONE_FILE)) as g:
            assert json.load(f) == json.load(g)
        jax.tree.map(np.testing.assert_array_equal, final_state(dispatched), final_state(sequential))


def test_each_vmapped_run_ends_with_its_sequential_runs_parameters(sequential_root, vmapped_root):
    finals = {}
    for name in RUN_NAMES:
        vectorised = final_state(os.path.join(vmapped_root, name))
        sequential = final_state(os.path.join(sequential_root, name))
        assert int(vectorised["step"]) == TOTAL_STEPS
        for (path, actual), desired in zip(
            jax.tree_util.tree_leaves_with_path(vectorised["params"]), jax.tree.leaves(sequential["params"]), strict=True
        ):
            np.testing.assert_allclose(actual, desired, rtol=1e-4, atol=1e-6, err_msg=name + jax.tree_util.keystr(path))
        finals[name] = vectorised["params"]
    # The runs really differ, by far more than the tolerance.
    kernel = lambda params: params["text_tower"]["transformer"]["block_0"]["mlp_fc"]["kernel"]
    assert np.max(np.abs(kernel(finals[RUN_NAMES[0]]) - kernel(finals[RUN_NAMES[1]]))) > 1e-3


def test_group_state_is_removed_once_finished(vectorised_root):
    groups = os.listdir(os.path.join(vectorised_root, sweep_runs.VECTORISED_DIR))
    assert len(groups) == 1
    group_dir = os.path.join(vectorised_root, sweep_runs.VECTORISED_DIR, groups[0])
    assert not os.path.exists(os.path.join(group_dir, run_files.CHECKPOINTS_DIR))
    with open(os.path.join(group_dir, run_files.FAILED_FILE)) as f:
        assert json.load(f) == {}


# ---------------------------------------------------------------------------------------------
# Interruption, re-runs, divergence
# ---------------------------------------------------------------------------------------------


class Interrupted(Exception):
    """Stands in for a preemption in the middle of the group."""


@pytest.mark.slow
def test_interrupted_group_resumes_to_the_same_outputs(config_file, vectorised_root, tmp_path, monkeypatch):
    root = str(tmp_path / "root")
    real_jit = run_group.RunGroup.jit_step
    calls = []

    def jit_that_fails_at_step_4(group, step, shardings):
        jitted = real_jit(group, step, shardings)

        def call(*args):
            calls.append(None)
            if len(calls) == 4:
                raise Interrupted("before step 4")
            return jitted(*args)

        return call

    monkeypatch.setattr(run_group.RunGroup, "jit_step", jit_that_fails_at_step_4)
    assert sweep_execute.sweep(config_file, root, vectorize=True) == 1  # the group failed: both runs reported
    group_dir = sweep_runs.vectorised_group_dir(root, sweep_runs.expand_sweep(root, SWEEP))
    assert ocp.utils.checkpoint_steps(os.path.join(group_dir, run_files.CHECKPOINTS_DIR)) == [2]
    assert not any(os.path.exists(os.path.join(root, name, run_files.DONE_FILE)) for name in RUN_NAMES)

    monkeypatch.setattr(run_group.RunGroup, "jit_step", real_jit)
    assert sweep_execute.sweep(config_file, root, vectorize=True) == 0
    for name in RUN_NAMES:
        resumed, uninterrupted = os.path.join(root, name), os.path.join(vectorised_root, name)
        jax.tree.map(np.testing.assert_array_equal, final_state(resumed), final_state(uninterrupted))
        assert read_jsonl(os.path.join(resumed, run_files.EVALS_FILE)) == read_jsonl(os.path.join(uninterrupted, run_files.EVALS_FILE))
        assert logged_metrics(resumed) == logged_metrics(uninterrupted)


def test_rerun_skips_finished_runs_and_groups_the_rest(config_file, vectorised_root, tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "root")
    shutil.copytree(vectorised_root, root)
    groups = []

    def train_group(configs, workdirs, group_dir, run_loop=None):
        groups.append((list(workdirs), group_dir))
        for workdir in workdirs:
            with open(os.path.join(workdir, run_files.DONE_FILE), "w") as f:
                json.dump({"steps": TOTAL_STEPS, "results": {}}, f)
        return train.GroupOutcome(results={w: {} for w in workdirs}, failed={})

    monkeypatch.setattr(train, "train_group", train_group)
    assert sweep_execute.sweep(config_file, root, vectorize=True) == 0
    assert groups == []
    assert "2 runs, 2 finished, 0 to run" in capsys.readouterr().out

    os.remove(os.path.join(root, RUN_NAMES[1], run_files.DONE_FILE))
    assert sweep_execute.sweep(config_file, root, vectorize=True) == 0
    assert groups == [([os.path.join(root, RUN_NAMES[1])], sweep_runs.vectorised_group_dir(root, sweep_runs.expand_sweep(root, SWEEP[1:])))]
    assert "2 runs, 1 finished, 1 to run" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_left_alone_trains_as_its_sequential_run(config_file, sequential_root, vectorised_root, tmp_path):
    """Re-run with one run unfinished, the group is that run alone (a group of one): it trains
    exactly as in a sequential sweep, with its checkpoints in its own folder, none in the group's."""
    root = str(tmp_path / "root")
    shutil.copytree(vectorised_root, root)
    name = RUN_NAMES[1]
    shutil.rmtree(os.path.join(root, name))
    assert sweep_execute.sweep(config_file, root, vectorize=True) == 0
    alone, sequential = os.path.join(root, name), os.path.join(sequential_root, name)
    jax.tree.map(np.testing.assert_array_equal, final_state(alone), final_state(sequential))
    assert read_jsonl(os.path.join(alone, run_files.EVALS_FILE)) == read_jsonl(os.path.join(sequential, run_files.EVALS_FILE))
    assert logged_metrics(alone) == logged_metrics(sequential)
    group_dir = sweep_runs.vectorised_group_dir(root, sweep_runs.expand_sweep(root, SWEEP[1:]))
    assert not os.path.exists(os.path.join(group_dir, run_files.CHECKPOINTS_DIR))


def test_a_diverged_run_fails_alone(world_and_pretrained, vectorised_root, tmp_path, capsys):
    sweep_source = '[{"optim.learning_rate": 1e-3}, {"optim.learning_rate": float("nan")}]'
    config_file = write_sweep_config(tmp_path / "config.py", world_and_pretrained, sweep_source)
    root = str(tmp_path / "root")
    assert sweep_execute.sweep(config_file, root, vectorize=True) == 1
    stderr = capsys.readouterr().err
    assert "run lr=nan failed" in stderr and "1 run(s) failed: lr=nan" in stderr
    assert not os.path.exists(os.path.join(root, "lr=nan", run_files.DONE_FILE))
    group_dir = os.path.join(root, sweep_runs.VECTORISED_DIR, os.listdir(os.path.join(root, sweep_runs.VECTORISED_DIR))[0])
    with open(os.path.join(group_dir, run_files.FAILED_FILE)) as f:
        assert json.load(f) == {"lr=nan": "parameters became non-finite in step 1"}
    # The healthy run is the same run as in the sweep without the diverging one.
    healthy, reference = os.path.join(root, RUN_NAMES[0]), os.path.join(vectorised_root, RUN_NAMES[0])
    assert read_jsonl(os.path.join(healthy, run_files.EVALS_FILE)) == read_jsonl(os.path.join(reference, run_files.EVALS_FILE))
    jax.tree.map(np.testing.assert_array_equal, final_state(healthy), final_state(reference))


# ---------------------------------------------------------------------------------------------
# Sweeps that cannot be vectorised
# ---------------------------------------------------------------------------------------------


# A lone run is always a group (of one): what keeps runs apart needs two of them.
TWO_RUNS = '[{"optim.learning_rate": 1e-3}, {"optim.learning_rate": 3e-3}]'


@pytest.mark.parametrize(
    "sweep_source, extra, named",
    [
        (
            '[{"optim.learning_rate": 1e-3}, {"data.batch_size": 32, "cleaning.shrink": 0.95}]',
            "",
            ["data.batch_size differs between runs (lr=0.001: 16, bs=32_shrink=0.95: 32)", "cleaning.shrink"],
        ),
        (TWO_RUNS, "config.objective.cluster_weight = 5.0", ["per-epoch passes ['deep_clustering'] are enabled"]),
        (
            TWO_RUNS,
            "config.train.reload_optimizer_state = True; config.train.keep_checkpoint_every_epochs = 1",
            ["train.reload_optimizer_state is set", "train.keep_checkpoint_every_epochs is set"],
        ),
    ],
    ids=["other_keys_differ", "deep_clustering", "optimizer_reload_and_kept_epochs"],
)
def test_sweep_that_cannot_be_vectorised_is_an_error_naming_the_keys(
    world_and_pretrained, tmp_path, capsys, sweep_source, extra, named
):
    config_file = write_sweep_config(tmp_path / "config.py", world_and_pretrained, sweep_source, extra)
    root = tmp_path / "root"
    assert sweep_main.main(["--config", config_file, "--workdir", str(root), "--vectorize"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: these runs cannot train as one vectorised program")
    for text in named:
        assert text in error
    assert "run this sweep without --vectorize" in error
    assert not root.exists()  # nothing started, nothing written


def test_vectorize_needs_local_in_process_mode(config_file, tmp_path, capsys):
    for flags in (["--parallel", "2"], ["--mode", "slurm"]):
        assert sweep_main.main(["--config", config_file, "--workdir", str(tmp_path), "--vectorize", *flags]) == 2
        assert "--vectorize trains the runs in this process" in capsys.readouterr().err


def test_vectorised_dry_run_names_the_group_and_writes_nothing(config_file, tmp_path, capsys):
    root = tmp_path / "root"
    assert sweep_main.main(["--config", config_file, "--workdir", str(root), "--vectorize", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert f"would train 2 runs as one vectorised program, group state in {root}/{sweep_runs.VECTORISED_DIR}/2runs-" in out
    assert not root.exists()


def test_clean_tiny_sweep_can_be_vectorised():
    config_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "clean_tiny.py")
    config, entries = sweep_runs.load_sweep(f"{config_path}:runs/world,runs/tiny,4")
    assert config.train.init_from == "runs/tiny" and config.data.train_csv == "runs/world/train/train.csv"
    runs = sweep_runs.expand_sweep("root", entries)
    assert [run.name for run in runs] == [f"lr={lr}_ssl_weight=1" for lr in ("2e-04", "5e-04", "0.001", "0.002")]
    sweep_execute.check_vectorisable(config, runs)
    assert len(sweep_runs.load_sweep(f"{config_path}:runs/world,runs/tiny")[1]) == 8


@pytest.mark.parametrize("run_loop", ["vmap", "map", "dispatch"])
def test_finite_check_flags_each_run(run_loop):
    def run_step(state, batch, rng, hparams):
        params = {"w": state["params"]["w"] * hparams["scale"] + jnp.sum(batch["x"])}
        return {"params": params}, {"loss": jnp.sum(params["w"])}

    mesh = sharding.make_mesh()
    group = run_group.RunGroup(3, mesh, run_loop)
    run_shardings = {"params": {"w": sharding.replicated(mesh)}}
    states = group.replicate({"params": {"w": jnp.ones(4)}}, run_shardings)
    jitted = group.jit_step(run_step, run_shardings)
    batch = {"x": np.zeros((8, 1), np.float32)}
    hparams = group.hyperparams({"scale": np.array([2.0, np.inf, 0.5], np.float32)})
    states, metrics = jitted(states, batch, jax.random.key(0), hparams)
    assert metrics["params_finite"].tolist() == [True, False, True]
    np.testing.assert_allclose(metrics["loss"], [8.0, np.inf, 2.0])
    np.testing.assert_allclose(states["params"]["w"][2], np.full(4, 0.5))


def test_default_run_loop(monkeypatch):
    class FakeGpu:
        platform = "gpu"

    cpu = jax.devices()
    # "dispatch" on every CPU, with AVX-512 or without; "vmap" on accelerators.
    for avx512 in (False, True):
        monkeypatch.setattr(cpu_runtime, "has_avx512", lambda avx512=avx512: avx512)
        assert run_group.default_run_loop(cpu) == "dispatch"
    assert run_group.default_run_loop([FakeGpu()]) == "vmap"
    # A group of several runs takes the default of its mesh's devices; a group of one needs none.
    assert run_group.RunGroup(2, sharding.make_mesh()).run_loop == "dispatch"
    assert run_group.RunGroup(1, sharding.make_mesh()).run_loop == "single"
