"""The sweep report (`python -m bclip.report --sweep ROOT`): one row per run from hand-written run
folders with known figures, the run the study's rule picks, unfinished runs listed as such, corrupt
files named, and a sweep expanded by bclip.sweep's own functions reported end to end."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from PIL import Image

from bclip import report, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLEANING_CONFIG = {"train": {"init_from": "/runs/pretrained"}, "eval": {"selection_set": "selection"}}


def record(step, epoch, top1, top5, asr, selection_top1=None, selection_asr=None):
    """An evals.jsonl record as bclip.train writes it."""
    entry = {"step": step, "epoch": epoch, "test/top1": top1, "test/top5": top5, "test/asr": asr, "test/num_images": 100}
    if selection_top1 is not None:
        entry.update({"selection/top1": selection_top1, "selection/asr": selection_asr, "selection/num_images": 50})
    return entry


START = record(0, 0, 0.60, 0.85, 0.99, 0.58, 0.98)
ORIGINAL = {"step": 0, "epoch": 0, "test_top1": 0.60, "test_top5": 0.85, "test_asr": 0.99, "selection_top1": 0.58, "selection_asr": 0.98}


def write_run(root, name, overrides, evals, finished=True, config=CLEANING_CONFIG):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "overrides.json").write_text(json.dumps(overrides))
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    if finished:
        results = {k: v for k, v in evals[-1].items() if k not in ("step", "epoch")}
        (run_dir / "done.json").write_text(json.dumps({"steps": evals[-1]["step"], "results": results}))
    return run_dir


def write_plan(root, entries):
    plan = {"config": "configs/clean.py", "runs": [{"name": n, "workdir": f"/elsewhere/{n}", "overrides": o} for n, o in entries]}
    (root / "sweep.json").write_text(json.dumps(plan))


LR = "optim.learning_rate"
RUNS = {
    "lr=1e-04": {LR: 1e-4, "objective.ssl_weight": 1.0},
    "lr=1e-03": {LR: 1e-3, "objective.ssl_weight": 1.0},
    "lr=5e-04": {LR: 5e-4, "objective.ssl_weight": 1.0},
    "lr=2e-03": {LR: 2e-3, "objective.ssl_weight": 1.0},
    "lr=5e-03": {LR: 5e-3, "objective.ssl_weight": 1.0},
}


@pytest.fixture
def cleaning_sweep(tmp_path):
    """Five cleaning runs of one pretrained model: three finished, one stopped after an epoch, one
    never started."""
    root = tmp_path / "sweep"
    root.mkdir()
    write_plan(root, list(RUNS.items()))
    # Resumed after its last evaluation: step 20 is logged twice, the second record counts.
    write_run(root, "lr=1e-04", RUNS["lr=1e-04"], [
        START,
        record(10, 1, 0.59, 0.84, 0.70, 0.57, 0.71),
        record(20, 2, 0.59, 0.84, 0.40, 0.57, 0.42),
        record(20, 2, 0.595, 0.845, 0.38, 0.575, 0.41),
    ])
    # Lowest ASR, but its selection top-1 fell 8 points: not eligible.
    write_run(root, "lr=1e-03", RUNS["lr=1e-03"], [START, record(20, 2, 0.55, 0.80, 0.05, 0.50, 0.04)])
    # Selection top-1 1.5 points below the original's, lowest selection ASR of those within 2.
    write_run(root, "lr=5e-04", RUNS["lr=5e-04"], [START, record(20, 2, 0.58, 0.83, 0.20, 0.565, 0.25)])
    write_run(root, "lr=2e-03", RUNS["lr=2e-03"], [START, record(10, 1, 0.50, 0.75, 0.10, 0.48, 0.09)], finished=False)
    return root


def test_sweep_report_rows_and_the_chosen_run(cleaning_sweep):
    summary = report.write_sweep_report(cleaning_sweep)
    assert json.loads((cleaning_sweep / "sweep_report.json").read_text()) == summary
    assert summary["varying_keys"] == [LR]  # the SSL weight is the same in every run
    assert (summary["test_set"], summary["selection_set"]) == ("test", "selection")
    assert (summary["num_runs"], summary["num_finished"]) == (5, 3)
    assert summary["chosen"] == "lr=5e-04"
    # Finished runs by test ASR, then the others in plan order.
    assert [row["name"] for row in summary["runs"]] == ["lr=1e-03", "lr=5e-04", "lr=1e-04", "lr=2e-03", "lr=5e-03"]
    rows = {row["name"]: row for row in summary["runs"]}
    assert rows["lr=5e-04"] == {
        "name": "lr=5e-04", "status": "finished", "overrides": {LR: 5e-4},
        "step": 20, "epoch": 2, "test_top1": 0.58, "test_top5": 0.83, "test_asr": 0.20,
        "selection_top1": 0.565, "selection_asr": 0.25, "original": ORIGINAL, "chosen": True,
    }
    assert rows["lr=1e-04"] == {
        "name": "lr=1e-04", "status": "finished", "overrides": {LR: 1e-4},
        "step": 20, "epoch": 2, "test_top1": 0.595, "test_top5": 0.845, "test_asr": 0.38,
        "selection_top1": 0.575, "selection_asr": 0.41, "original": ORIGINAL, "chosen": False,
    }
    assert rows["lr=2e-03"]["status"] == "not finished" and rows["lr=2e-03"]["epoch"] == 1
    assert rows["lr=2e-03"]["test_asr"] == 0.10 and not rows["lr=2e-03"]["chosen"]
    assert rows["lr=5e-03"] == {
        "name": "lr=5e-03", "status": "not started", "overrides": {LR: 5e-3},
        "step": None, "epoch": None, "test_top1": None, "test_top5": None, "test_asr": None,
        "selection_top1": None, "selection_asr": None, "original": None, "chosen": False,
    }

    md = (cleaning_sweep / "sweep_report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table == [
        "| run | optim.learning_rate | status | epoch | top-1 | top-5 | ASR | selection top-1 | selection ASR | original selection top-1 | chosen |",
        "| lr=1e-03 | 0.001 | finished | 2 | 55.0 | 80.0 | 5.0 | 50.0 | 4.0 | 58.0 |  |",
        "| lr=5e-04 | 0.0005 | finished | 2 | 58.0 | 83.0 | 20.0 | 56.5 | 25.0 | 58.0 | ✓ |",
        "| lr=1e-04 | 0.0001 | finished | 2 | 59.5 | 84.5 | 38.0 | 57.5 | 41.0 | 58.0 |  |",
        "| lr=2e-03 | 0.002 | not finished | 1 | 50.0 | 75.0 | 10.0 | 48.0 | 9.0 | 58.0 |  |",
        "| lr=5e-03 | 0.005 | not started | – | – | – | – | – | – | – |  |",
    ]
    assert "5 runs, 3 finished" in md and "chosen: lr=5e-04" in md
    with Image.open(cleaning_sweep / "sweep_report.png") as image:
        assert image.format == "PNG" and image.width > image.height > 100


def test_reference_run_gives_the_original_figures(cleaning_sweep, tmp_path):
    # The pretrained model's own run: its selection top-1 (52 %) lets lr=1e-03 (50 %) qualify.
    reference = write_run(tmp_path, "pretrained", {}, [record(30, 3, 0.62, 0.86, 0.995, 0.52, 0.99)], config={})
    summary = report.write_sweep_report(cleaning_sweep, reference=str(reference))
    assert summary["chosen"] == "lr=1e-03"
    assert summary["original_source"] == f"last evaluation of the reference run {reference}"
    original = {"step": 30, "epoch": 3, "test_top1": 0.62, "test_top5": 0.86, "test_asr": 0.995, "selection_top1": 0.52, "selection_asr": 0.99}
    assert all(row["original"] == original for row in summary["runs"])


def test_without_original_or_selection_split_rows_are_only_sorted(tmp_path):
    root = tmp_path / "pretraining_sweep"
    root.mkdir()
    entries = [("wd=0.1", {"optim.weight_decay": 0.1}), ("wd=1", {"optim.weight_decay": 1.0})]
    write_plan(root, entries)
    # Pretraining runs: their step-0 evaluation is of random weights, not an original.
    scratch = {"train": {"init_from": ""}, "eval": {"selection_set": "selection"}}
    write_run(root, "wd=0.1", entries[0][1], [record(0, 0, 0.1, 0.5, 0.1, 0.1, 0.1), record(8, 1, 0.5, 0.8, 0.9, 0.5, 0.9)], config=scratch)
    write_run(root, "wd=1", entries[1][1], [record(0, 0, 0.1, 0.5, 0.1, 0.1, 0.1), record(8, 1, 0.4, 0.7, 0.3, 0.4, 0.3)], config=scratch)
    summary = report.write_sweep_report(root)
    assert [row["name"] for row in summary["runs"]] == ["wd=1", "wd=0.1"]
    assert summary["chosen"] is None and summary["original_source"] is None
    assert summary["note"].startswith("no original figures")

    # Test figures only: no selection split, so nothing is chosen even with a reference.
    for name, _ in entries:
        evals = root / name / "evals.jsonl"
        evals.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if not k.startswith("selection/")}) + "\n" for line in evals.read_text().splitlines()))
    summary = report.write_sweep_report(root, reference=str(root / "wd=0.1"))
    assert summary["selection_set"] is None  # configured, but never evaluated
    assert summary["chosen"] is None and summary["note"].startswith("no selection split")
    assert [row["selection_top1"] for row in summary["runs"]] == [None, None]
    assert summary["original_source"] == f"last evaluation of the reference run {root / 'wd=0.1'}"


def test_eval_set_names_come_from_the_runs(tmp_path):
    root = tmp_path / "imagenet_sweep"
    root.mkdir()
    write_plan(root, [("a", {"seed": 1}), ("b", {"seed": 2})])
    for name in ("a", "b"):
        evals = [{"step": 5, "epoch": 1, "imagenet/top1": 0.3, "imagenet/top5": 0.6, "imagenet/asr": 0.2, "heldout/top1": 0.31, "heldout/asr": 0.21}]
        write_run(root, name, {"seed": 1 if name == "a" else 2}, evals, config={"train": {"init_from": "x"}, "eval": {"selection_set": "heldout"}})
    summary = report.summarise_sweep(root)
    assert (summary["test_set"], summary["selection_set"]) == ("imagenet", "heldout")
    assert [row["test_top1"] for row in summary["runs"]] == [0.3, 0.3]
    assert summary["runs"][0]["selection_top1"] == 0.31
    for name in ("a", "b"):
        (root / name / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--test_set"):
        report.summarise_sweep(root)
    assert report.summarise_sweep(root, test_set="imagenet", selection_set="heldout")["runs"][0]["selection_asr"] == 0.21


def test_corrupt_files_are_named(cleaning_sweep, capsys):
    evals = cleaning_sweep / "lr=1e-03" / "evals.jsonl"
    good = evals.read_text()
    evals.write_text(good.replace("\n", "\n{not json", 1))
    with pytest.raises(report.RunFileError, match=f"{evals}, line 2, is not valid JSON"):
        report.write_sweep_report(cleaning_sweep)
    evals.write_text(good)

    done = cleaning_sweep / "lr=5e-04" / "done.json"
    done.write_text('{"steps": 20, "results": {')
    assert report.main(["--sweep", str(cleaning_sweep)]) == 2
    assert f"{done} is not valid JSON" in capsys.readouterr().err
    assert not (cleaning_sweep / "sweep_report.md").exists()

    (cleaning_sweep / "sweep.json").write_text('{"runs": [{"name": "x"}]}')
    with pytest.raises(report.RunFileError, match="sweep.json is not a sweep plan"):
        report.write_sweep_report(cleaning_sweep)


def test_without_a_plan_the_run_folders_are_found(cleaning_sweep):
    (cleaning_sweep / "sweep.json").unlink()
    summary = report.summarise_sweep(cleaning_sweep)
    # No plan: only folders with overrides.json exist, so no run is "not started".
    assert sorted(row["name"] for row in summary["runs"]) == ["lr=1e-03", "lr=1e-04", "lr=2e-03", "lr=5e-04"]
    assert summary["config"] is None and summary["chosen"] == "lr=5e-04"


def test_run_file_names_match_the_trainer_and_sweep():
    from bclip import train

    assert report.DONE_FILE == train.DONE_FILE == sweep.DONE_FILE
    assert report.EVALS_FILE == train.EVALS_FILE


# ---------------------------------------------------------------------------------------------
# End to end with bclip.sweep
# ---------------------------------------------------------------------------------------------

SWEEP_CONFIG = '''
from bclip import config as run_configs


def get_config():
    config = run_configs.run_config()
    config.train.init_from = "/runs/pretrained"
    config.eval.selection_set = "selection"
    return config


def get_sweep():
    return [
        {"optim.learning_rate": lr, "objective.ssl_weight": ssl_weight}
        for lr in (1e-4, 1e-3)
        for ssl_weight in (1.0, 4.0)
    ] + [{"optim.learning_rate": 5e-3, "objective.ssl_weight": 1.0}]
'''


def figures(config):
    """Made-up final figures of a run: a higher learning rate lowers the ASR and the accuracy."""
    lr, ssl_weight = config.optim.learning_rate, config.objective.ssl_weight
    return {"top1": 0.60 - 10 * lr - 0.004 * ssl_weight, "asr": 0.90 - 500 * lr - 0.05 * ssl_weight}


def fake_train(config, workdir):
    """Writes config.json, evals.jsonl (before cleaning and after each of 2 epochs) and done.json."""
    final = figures(config)
    evals = [record(0, 0, 0.60, 0.85, 0.99, 0.60, 0.99)]
    evals.append(record(4, 1, final["top1"] + 0.01, 0.8, final["asr"] + 0.2, final["top1"] + 0.01, final["asr"] + 0.2))
    evals.append(record(8, 2, final["top1"], 0.8, final["asr"], final["top1"], final["asr"]))
    run_dir = pathlib.Path(workdir)
    (run_dir / "config.json").write_text(config.to_json_best_effort(indent=2))
    (run_dir / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (run_dir / "done.json").write_text(json.dumps({"steps": 8, "results": evals[-1]}))


def test_report_of_a_sweep_expanded_by_bclip_sweep(tmp_path):
    config_path = tmp_path / "clean_sweep.py"
    config_path.write_text(SWEEP_CONFIG)
    config, entries = sweep.load_sweep(str(config_path))
    root = str(tmp_path / "sweep")
    runs = sweep.expand_sweep(root, entries)
    sweep.write_plan(root, str(config_path), runs)
    for run in runs[:-1]:  # the last run is never started
        sweep.write_overrides(run)
        fake_train(sweep.apply_overrides(config, run.overrides), run.workdir)

    result = subprocess.run(
        [sys.executable, "-m", "bclip.report", "--sweep", root], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "sweep" / "sweep_report.json").read_text())
    assert summary["config"] == str(config_path)
    assert summary["varying_keys"] == ["optim.learning_rate", "objective.ssl_weight"]
    assert [row["status"] for row in summary["runs"]] == ["finished"] * 4 + ["not started"]
    assert summary["runs"][-1]["name"] == runs[-1].name == "lr=0.005_ssl_weight=1"

    # Each finished row holds its own run's final figures, in order of test ASR.
    expected = {}
    for run in runs[:-1]:
        final = figures(sweep.apply_overrides(config, run.overrides))
        expected[run.name] = (run.overrides, final["top1"], final["asr"])
    finished = summary["runs"][:4]
    assert [row["name"] for row in finished] == sorted(expected, key=lambda name: expected[name][2])
    for row in finished:
        overrides, top1, asr = expected[row["name"]]
        assert row["overrides"] == overrides
        assert row["test_top1"] == pytest.approx(top1) and row["test_asr"] == pytest.approx(asr)
        assert row["selection_top1"] == pytest.approx(top1) and row["epoch"] == 2
        assert row["original"]["selection_top1"] == 0.60
    # The rule by hand: selection top-1 ≥ 58 %, then the lowest selection ASR. The lowest ASR of
    # all (lr 1e-3, SSL weight 4) lost 2.6 points and is passed over.
    eligible = [name for name, (_, top1, _) in expected.items() if top1 >= 0.58 - 1e-12]
    assert finished[0]["name"] == "lr=0.001_ssl_weight=4" and finished[0]["name"] not in eligible
    assert summary["chosen"] == min(eligible, key=lambda name: expected[name][2]) == "lr=0.001_ssl_weight=1"
    md = (tmp_path / "sweep" / "sweep_report.md").read_text()
    assert "| lr=0.001_ssl_weight=1 | 0.001 | 1 | finished | 2 | 58.6 | 80.0 | 35.0 | 58.6 | 35.0 | 60.0 | ✓ |" in md
    assert "| lr=0.005_ssl_weight=1 | 0.005 | 1 | not started |" in md
    assert (tmp_path / "sweep" / "sweep_report.png").stat().st_size > 5000
