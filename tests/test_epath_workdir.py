"""Run directories on an object store (gs://): every run file of the trainer, the poison plan, the
checkpoints (Orbax's own gs:// handling, see `orbax_on_the_bucket`), the study runner and both
reports goes through etils.epath.

gs:// is served by a fake bucket: an epath backend that keeps gs://BUCKET/KEY under a local folder,
records every call and, like GCS, cannot append. The tests run from an empty working directory: a
plain `open(os.path.join(workdir, ...))` or `os.makedirs(workdir)` on "gs://bucket/run" would
write to ./gs:/bucket/run there (or fail), and the file would be missing from the bucket.
"""

import ast
import json
import os

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import saved_arrays
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath

from bclip import checkpointing, evaluators, experiment, run_files, run_group, train
from bclip.sweep import report as sweep_report
from bclip.sweep import runs as sweep_runs
from bclip import config as run_configs
from bclip.data import poisoning, training_input
from bclip.data.synthetic import writer

BCLIP_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bclip")


class FakeBucket(epath_backend.Backend):
    """gs://KEY stored at STORE/KEY; `calls` lists (operation, gs path) in order. As on GCS, a
file can be written without creating its folder first, and not appended to."""

    def __init__(self, store: str):
        self.store = store
        self.calls = []
        self.disk = epath_backend.os_backend

    def local(self, path) -> str:
        path = os.fspath(path)
        assert path.startswith("gs://"), f"fake bucket got a non-gs path {path!r}"
        return os.path.join(self.store, path[len("gs://") :])

    def remote(self, local_path) -> str:
        return "gs://" + os.path.relpath(os.fspath(local_path), self.store)

    def _record(self, operation, path):
        self.calls.append((operation, os.fspath(path)))
        return self.local(path)

    def open(self, path, mode):
        if "a" in mode:
            raise OSError(f"objects cannot be appended to: {path}")
        local = self._record(f"open:{mode}", path)
        if "w" in mode:  # an object store has no folders to create first
            os.makedirs(os.path.dirname(local), exist_ok=True)
        return self.disk.open(local, mode)

    def exists(self, path):
        return self.disk.exists(self._record("exists", path))

    def isdir(self, path):
        return self.disk.isdir(self._record("isdir", path))

    def listdir(self, path):
        return self.disk.listdir(self._record("listdir", path))

    def glob(self, path):
        return [self.remote(p) for p in self.disk.glob(self._record("glob", path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in self.disk.walk(self._record("walk", top), top_down=top_down, on_error=on_error):
            yield self.remote(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        self.disk.makedirs(self._record("makedirs", path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        self.disk.mkdir(self._record("mkdir", path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        self.disk.rmtree(self._record("rmtree", path))

    def remove(self, path):
        self.disk.remove(self._record("remove", path))

    def rename(self, path, dst):
        self.disk.rename(self._record("rename", path), self._record("rename_to", dst))

    def replace(self, path, dst):
        self.disk.replace(self._record("replace", path), self._record("replace_to", dst))

    def copy(self, path, dst, overwrite):
        self.disk.copy(self._record("copy", path), self._record("copy_to", dst), overwrite)

    def stat(self, path):
        return self.disk.stat(self._record("stat", path))

    def written(self) -> set[str]:
        """gs paths opened for writing or renamed onto."""
        return {path for op, path in self.calls if op in ("open:w", "open:wb", "replace_to", "rename_to")}


@pytest.fixture
def bucket(tmp_path, monkeypatch) -> FakeBucket:
    fake = FakeBucket(str(tmp_path / "bucket_store"))
    os.makedirs(fake.store)
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield fake
    stray = sorted(os.listdir(cwd))
    assert stray == [], f"run files bypassed epath and landed on local disk: {stray}"


def test_fake_bucket_serves_gs_paths_and_cannot_append(bucket):
    path = epath.Path("gs://bucket/dir/file.txt")
    path.parent.mkdir(parents=True)
    path.write_text("x")
    assert os.path.exists(os.path.join(bucket.store, "bucket", "dir", "file.txt"))
    assert ("open:w", "gs://bucket/dir/file.txt") in bucket.calls
    with pytest.raises(OSError, match="appended"):
        path.open("a")
    # What a plain open would do with the same path: nothing reaches the bucket.
    with pytest.raises(FileNotFoundError):
        open(os.path.join("gs://bucket/dir", "file.txt"))


# ---------------------------------------------------------------------------------------------
# The trainer's run files
# ---------------------------------------------------------------------------------------------


def test_json_lines_on_gs_write_and_drop_records_after_a_restart(bucket):
    path = "gs://bucket/run/metrics.jsonl"
    epath.Path(path).parent.mkdir(parents=True)
    log = run_files.JsonLines(path, enabled=True)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": float(step)})
    log.keep_through(2)
    log.write({"step": 3, "loss": 30.0})
    assert run_files.JsonLines(path, enabled=False).path.read_text().splitlines() == [
        '{"step": 1, "loss": 1.0}',
        '{"step": 2, "loss": 2.0}',
        '{"step": 3, "loss": 30.0}',
    ]
    # A new writer (a resumed run) continues the file.
    run_files.JsonLines(path, enabled=True).write({"step": 4, "loss": 4.0})
    assert len(epath.Path(path).read_text().splitlines()) == 4
    assert run_files.read_json_lines(path)[-1] == {"step": 4, "loss": 4.0}
    assert "gs://bucket/run/metrics.jsonl" in bucket.written()


def test_json_lines_still_append_locally(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = run_files.JsonLines(str(path), enabled=True)
    log.write({"step": 1})
    path.write_text(path.read_text() + '{"step": 2}\n')  # appended, not rewritten from memory
    log.write({"step": 3})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_poison_plan_and_inputs_read_from_gs(bucket):
    plan = poisoning.PoisonPlan(indices=np.array([7, 3]), seed=5)
    plan.write("gs://bucket/pretrain/poison_indices.json")
    assert ("replace_to", "gs://bucket/pretrain/poison_indices.json") in bucket.calls  # atomic
    assert poisoning.PoisonPlan.read("gs://bucket/pretrain/poison_indices.json") == plan
    assert training_input.read_excluded_indices("gs://bucket/pretrain/poison_indices.json").tolist() == [3, 7]
    epath.Path("gs://bucket/lists/excluded.json").parent.mkdir(parents=True)
    epath.Path("gs://bucket/lists/excluded.json").write_text("[4, 1]")
    assert training_input.read_excluded_indices("gs://bucket/lists/excluded.json").tolist() == [4, 1]
    epath.Path("gs://bucket/lists/classnames.txt").write_text("apple\n\nbanana\n")
    assert evaluators.read_lines("gs://bucket/lists/classnames.txt") == ["apple", "banana"]
    epath.Path("gs://bucket/lists/synonyms.json").write_text('{"big": ["large", "huge"]}')
    data = ml_collections.ConfigDict({"synonyms": "gs://bucket/lists/synonyms.json"})
    synonyms = training_input.make_synonyms(data)
    # The lexicon in the bucket, and nothing else: its word's synonyms in order, none for others.
    assert synonyms("big") == ["large", "huge"]
    assert synonyms("small") == []
    assert ("open:r", "gs://bucket/lists/synonyms.json") in bucket.calls


@pytest.fixture
def orbax_on_the_bucket(bucket, monkeypatch) -> list[str]:
    """Orbax on gs:// paths, as on GCS, with its array data in the fake bucket.

    Orbax handles a gs:// checkpoint directory itself: step folders, metadata, the data position,
    listing, deleting and the commit_success.txt that marks a finished step on GCS all go through
    epath, so into the fake bucket. Only the arrays' bytes do not: Orbax hands TensorStore a kvstore
    spec for TensorStore's own GCS driver (`gcs_utils.get_kvstore_for_gcs`), an HTTP client that no
    Python-level backend sees. Here that spec names TensorStore's file driver at the folder where the
    fake bucket keeps the same gs:// keys, so arrays written and read back land in the bucket's store
    beside Orbax's other files. Orbax's question to GCS whether the bucket has hierarchical namespaces
    gets "no". Returns the gs:// paths Orbax asked TensorStore for, in order.
    """
    from orbax.checkpoint._src.path import gcs_utils

    kvstores = []

    def kvstore_in_bucket(path):
        kvstores.append(os.fspath(path))
        gcs_utils.parse_gcs_path(path)  # the spec Orbax would build needs a bucket and a path
        return {"driver": "file", "path": bucket.local(path)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore_in_bucket)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    return kvstores


class Preempted(Exception):
    """Stops a run between two steps."""


@pytest.mark.slow
def test_train_and_evaluate_keeps_every_run_file_and_checkpoint_on_gs_and_resumes_from_them(
    bucket, orbax_on_the_bucket, tmp_path, monkeypatch
):
    world = experiment.study_config().world
    world.num_train, world.num_test, world.num_selection = 32, 8, 8
    world_dir = experiment.prepare_world(world, str(tmp_path / "study"))
    config = run_configs.run_config("micro-vit", text={"vocab_size": 256, "context_length": 16})
    config.data.train_csv = os.path.join(world_dir, "train", "train.csv")
    config.data.tokenizer.path = os.path.join(world_dir, writer.VOCAB_FILE)
    config.data.batch_size = 16  # 2 steps per epoch, 2 epochs: checkpoints at steps 2 and 4
    config.train.num_epochs = 2
    config.train.log_every_steps = 1
    config.poison.count = 4
    config.poison.trigger.size = 5
    config.eval.batch_size = 8
    config.eval.at_start = False
    with config.unlocked():
        config.eval.sets = {"test": run_configs.eval_set_config("folder", os.path.join(world_dir, "test"))}

    # clu's summary writer reaches GCS with its own client (tf.io.gfile): here it gets a logging
    # writer, and the test checks what it was given.
    writers = []

    def logging_writer(logdir, just_logging=False):
        writers.append(logdir)
        from clu import metric_writers

        return metric_writers.LoggingWriter()

    monkeypatch.setattr(train.metric_writers, "create_default_writer", logging_writer)
    # Counts the train steps a run takes, and stops it before step stop_after + 1 when asked.
    steps_taken, stop_after = [], [None]
    restored_steps = []
    jit_step, restore_latest = run_group.RunGroup.jit_step, checkpointing.restore_latest

    def counted_jit_step(group, run_step, run_shardings):
        step_fn = jit_step(group, run_step, run_shardings)

        def counted(states, *args):
            if len(steps_taken) == stop_after[0]:
                raise Preempted(f"stopped after step {stop_after[0]}")
            steps_taken.append(int(states["step"]))
            return step_fn(states, *args)

        return counted

    def recorded_restore(*args, **kwargs):
        state, step = restore_latest(*args, **kwargs)
        restored_steps.append(step)
        return state, step

    monkeypatch.setattr(run_group.RunGroup, "jit_step", counted_jit_step)
    monkeypatch.setattr(checkpointing, "restore_latest", recorded_restore)

    # ---- An uninterrupted run: every run file and checkpoint in the bucket ----------------------
    reference = "gs://bucket/runs/uninterrupted"
    results = train.train_and_evaluate(config, reference)
    assert steps_taken == [0, 1, 2, 3] and restored_steps == [None]
    assert writers == [reference]
    run_dir = epath.Path(reference)
    for name in ("config.json", run_files.METRICS_FILE, run_files.EVALS_FILE, run_files.POISON_FILE, run_files.DONE_FILE):
        assert f"{reference}/{name}" in bucket.written(), name
    assert json.loads((run_dir / "config.json").read_text())["data"]["batch_size"] == 16
    assert json.loads((run_dir / "checkpoints" / checkpointing.EPOCHS_FILE).read_text()) == {"steps_per_epoch": 2}
    metrics = run_files.read_json_lines(run_dir / run_files.METRICS_FILE)
    assert [record["step"] for record in metrics] == [1, 2, 3, 4]
    evals = run_files.read_json_lines(run_dir / run_files.EVALS_FILE)
    assert [record["step"] for record in evals] == [2, 4]
    done = json.loads((run_dir / run_files.DONE_FILE).read_text())
    assert done == {"steps": 4, "results": results} and results == {k: v for k, v in evals[-1].items() if k not in ("step", "epoch")}
    assert len(poisoning.PoisonPlan.read(f"{reference}/{run_files.POISON_FILE}")) == 4
    # The checkpoints: Orbax took its GCS path (a finished step is marked by commit_success.txt, not
    # by renaming a temporary folder), found the steps through the bucket, and its arrays are there.
    checkpoints = f"{reference}/checkpoints"
    assert sorted(ocp.utils.checkpoint_steps(epath.Path(checkpoints))) == [2, 4]
    for step in (2, 4):
        assert ("open:w", f"{checkpoints}/{step}/commit_success.txt") in bucket.calls
        assert f"{checkpoints}/{step}/data/process_0-of-1.json" in bucket.written()
        assert f"{checkpoints}/{step}/state/_METADATA" in bucket.written()
        assert (epath.Path(checkpoints) / str(step) / "state" / "manifest.ocdbt").exists()
    assert orbax_on_the_bucket and all(path.startswith(f"{checkpoints}/") for path in orbax_on_the_bucket)
    assert {path for path in orbax_on_the_bucket if path.endswith("/state")} == {f"{checkpoints}/2/state", f"{checkpoints}/4/state"}
    reference_params = saved_arrays.final_params(reference)

    # ---- Stopped after step 3, past its step-2 checkpoint --------------------------------------
    workdir = "gs://bucket/runs/pretrain"
    checkpoints = f"{workdir}/checkpoints"
    steps_taken.clear()
    restored_steps.clear()
    stop_after[0] = 3
    with pytest.raises(Preempted):
        train.train_and_evaluate(config, workdir)
    assert steps_taken == [0, 1, 2] and restored_steps == [None]
    run_dir = epath.Path(workdir)
    assert sorted(ocp.utils.checkpoint_steps(epath.Path(checkpoints))) == [2]
    assert [record["step"] for record in run_files.read_json_lines(run_dir / run_files.METRICS_FILE)] == [1, 2, 3]
    assert not (run_dir / run_files.DONE_FILE).exists()

    # ---- Run again: it resumes from the bucket's step-2 checkpoint and ends as the uninterrupted run
    steps_taken.clear()
    restored_steps.clear()
    orbax_on_the_bucket.clear()
    bucket.calls.clear()
    stop_after[0] = None
    assert train.train_and_evaluate(config, workdir) == results
    assert restored_steps == [2] and steps_taken == [2, 3]
    assert ("open:r", f"{checkpoints}/2/data/process_0-of-1.json") in bucket.calls  # the data position
    assert orbax_on_the_bucket[0] == f"{checkpoints}/2/state"  # the state's arrays
    without_timing = lambda records: [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in records]  # noqa: E731
    # Step 3, logged before the stop, was dropped and logged again from the restored state.
    assert without_timing(run_files.read_json_lines(run_dir / run_files.METRICS_FILE)) == without_timing(metrics)
    assert run_files.read_json_lines(run_dir / run_files.EVALS_FILE) == evals
    assert json.loads((run_dir / run_files.DONE_FILE).read_text()) == done
    assert sorted(ocp.utils.checkpoint_steps(epath.Path(checkpoints))) == [2, 4]
    params = saved_arrays.final_params(workdir)
    assert params.keys() == reference_params.keys()
    for name, value in reference_params.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)

    # Run again: it resumes from the last checkpoint, reads its results back from gs and is done.
    steps_taken.clear()
    bucket.calls.clear()
    assert train.train_and_evaluate(config, workdir) == results
    assert steps_taken == [] and restored_steps[-1] == 4
    assert ("open:r", f"{workdir}/{run_files.EVALS_FILE}") in bucket.calls
    assert len((run_dir / run_files.METRICS_FILE).read_text().splitlines()) == 4


# ---------------------------------------------------------------------------------------------
# Checkpoint paths
# ---------------------------------------------------------------------------------------------


def test_checkpoint_paths_stay_remote(bucket, monkeypatch):
    assert os.fspath(checkpointing.absolute("gs://bucket/run/checkpoints")) == "gs://bucket/run/checkpoints"
    # Orbax asks GCS (google-cloud-storage) whether the bucket has hierarchical namespaces.
    from orbax.checkpoint._src.path import gcs_utils

    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    manager = checkpointing.make_manager("gs://bucket/run/checkpoints")
    assert os.fspath(manager.directory) == "gs://bucket/run/checkpoints"
    assert os.path.isdir(bucket.local("gs://bucket/run/checkpoints"))
    manager.close()

    # Finished steps as Orbax leaves them on GCS (commit_success.txt marks a step complete), and a
    # step whose save never finished; Orbax finds them through epath.
    for step in (4, 8, 12):
        epath.Path(f"gs://bucket/run/checkpoints/{step}/state").mkdir(parents=True)
        if step != 12:
            epath.Path(f"gs://bucket/run/checkpoints/{step}/commit_success.txt").write_text("done")
    for path, expected in [
        ("gs://bucket/run", ("gs://bucket/run/checkpoints", 8)),
        ("gs://bucket/run/checkpoints", ("gs://bucket/run/checkpoints", 8)),
        ("gs://bucket/run/checkpoints/4", ("gs://bucket/run/checkpoints", 4)),
    ]:
        directory, step = checkpointing._resolve_step_dir(path)
        assert (os.fspath(directory), step) == expected
    with pytest.raises(checkpointing.CheckpointError, match="gs://bucket/missing does not exist"):
        checkpointing._resolve_step_dir("gs://bucket/missing")


def test_local_checkpoint_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(checkpointing.absolute("runs/a")) == os.path.join(str(tmp_path), "runs", "a")
    with pytest.raises(checkpointing.CheckpointError, match=os.path.join(str(tmp_path), "nothing")):
        checkpointing._resolve_step_dir("nothing")


# ---------------------------------------------------------------------------------------------
# The study runner and the reports
# ---------------------------------------------------------------------------------------------


def _fake_train(config, run_dir):
    """Writes what bclip.train writes, through epath: the figures depend on the learning rate."""
    run_dir = epath.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.to_json_best_effort())
    lr = config.optim.learning_rate
    records = [
        {"step": 0, "epoch": 0, "test/top1": 0.6, "test/asr": 0.99, "selection/top1": 0.6, "selection/asr": 0.98},
        {"step": 4, "epoch": 1, "test/top1": 0.6 - 10 * lr, "test/asr": 0.9 - 400 * lr,
         "selection/top1": 0.6 - 10 * lr, "selection/asr": 0.9 - 400 * lr},
    ]
    (run_dir / run_files.EVALS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / run_files.DONE_FILE).write_text(json.dumps({"steps": 4, "results": records[-1]}))


def test_study_runs_and_reports_on_gs(bucket):
    study = experiment.study_config()
    study.world.enabled = False
    study.pretrain_base = run_configs.run_config()
    study.pretrain = ml_collections.ConfigDict({"MMCL": {}})
    study.clean_base = ml_collections.ConfigDict({"train": {"num_epochs": 1}})
    study.cleaning_methods = ml_collections.ConfigDict({"CleanCLIP": {}})
    study.cleaning_learning_rates = (1e-4, 1e-3)
    summary = experiment.run_study(study, "gs://bucket/study", _fake_train)
    chosen = summary["MMCL"]["methods"]["CleanCLIP"]["chosen_on_selection"]
    assert chosen["run"] == "clean/MMCL/CleanCLIP/lr=0.001" and chosen["asr"] == pytest.approx(0.5)
    for name in ("summary.json", "report.md", "report.png"):
        assert f"gs://bucket/study/{name}" in bucket.written()
    assert epath.Path("gs://bucket/study/report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    clean_config = json.loads(epath.Path("gs://bucket/study/clean/MMCL/CleanCLIP/lr=0.001/config.json").read_text())
    assert clean_config["train"]["init_from"] == "gs://bucket/study/pretrain/MMCL"
    assert clean_config["train"]["exclude_indices_file"] == "gs://bucket/study/pretrain/MMCL/poison_indices.json"

    # Again: every run is finished (done.json found on gs), nothing trains.
    ran = []
    assert experiment.run_study(study, "gs://bucket/study", lambda c, d: ran.append(d)) == summary
    assert ran == []

    # The study with the synthetic world cannot write it to gs: it says so.
    study.world.enabled = True
    with pytest.raises(ValueError, match="local disk"):
        experiment.run_study(study, "gs://bucket/study2", _fake_train)


def test_sweep_report_on_gs(bucket):
    root = "gs://bucket/sweep"
    runs = sweep_runs.expand_sweep(root, [{"optim.learning_rate": 1e-4}, {"optim.learning_rate": 1e-3}])
    sweep_runs.write_plan(root, "configs/x.py", runs)
    base = run_configs.run_config()
    with base.unlocked():
        base.train.init_from = "gs://bucket/pretrained"
    for run in runs:
        sweep_runs.write_overrides(run)
        _fake_train(run_configs.override(base, run.overrides), run.workdir)
    assert sweep_report.main([root]) == 0
    summary = json.loads(epath.Path(f"{root}/sweep_report.json").read_text())
    assert [(row["name"], row["epoch"]) for row in summary["points"]] == [("lr=1e-04", 1), ("lr=0.001", 1)]
    assert summary["chosen"] == {"name": "lr=0.001", "epoch": 1, "step": 4}
    assert {f"{root}/sweep_report.{ext}" for ext in ("json", "md", "png")} <= bucket.written()


# ---------------------------------------------------------------------------------------------
# Complement: no run-file code calls the local-only file API
# ---------------------------------------------------------------------------------------------

RUN_FILE_MODULES = (
    "train.py", "run_files.py", "run_start.py", "evaluators.py", "checkpointing.py", "experiment.py", "study_report.py",
    os.path.join("sweep", "report.py"), os.path.join("sweep", "runs.py"), os.path.join("data", "poisoning.py"),
    os.path.join("data", "training_input.py"),
)
LOCAL_ONLY_CALLS = {
    "open", "os.makedirs", "os.mkdir", "os.replace", "os.rename", "os.remove", "os.listdir",
    "os.path.exists", "os.path.isdir", "os.path.isfile", "os.path.abspath", "os.path.relpath",
    "shutil.rmtree",
}
# checkpointing.absolute makes local paths absolute, and only those.
ALLOWED = {("checkpointing.py", "absolute", "os.path.abspath")}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_run_file_modules_use_no_local_only_file_calls():
    found = []
    for module in RUN_FILE_MODULES:
        tree = ast.parse(open(os.path.join(BCLIP_DIR, module)).read())
        enclosing = {}  # node -> the innermost function it is in (ast.walk visits outer ones first)
        for function in ast.walk(tree):
            if isinstance(function, ast.FunctionDef):
                for node in ast.walk(function):
                    enclosing[node] = function.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _dotted(node.func) in LOCAL_ONLY_CALLS:
                where = (os.path.basename(module), enclosing.get(node, "<module>"), _dotted(node.func))
                if where not in ALLOWED:
                    found.append(f"{module}:{node.lineno} in {where[1]}: {where[2]}")
    assert found == []
