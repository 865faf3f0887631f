"""The sweep report (`python -m bclip.sweep.report ROOT`): every evaluated epoch of every run is a
point, from hand-written run folders with known figures; the point the study's rule picks (on the
selection split, never the step-0 original), unfinished runs listed as such, corrupt files named,
and a sweep expanded by bclip.sweep's own functions reported end to end."""

import json
import os
import pathlib

import pytest
from PIL import Image

from bclip import config as run_configs
from bclip.sweep import report as sweep_report
from bclip.sweep import runs as sweep_runs

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
# Each run's evaluations after epochs 1-3 (steps 10, 20, 30). The original's selection top-1 is
# 58 %, so a point is eligible with selection top-1 >= 56 %.
EPOCHS = {
    # Its epoch 2 has the lowest test ASR of all eligible points (10 %) but a selection ASR of 30 %:
    # a pick that looked at the test split would take it. Step 30 is logged twice (a run resumed
    # after its last evaluation); the second record counts.
    "lr=1e-04": [
        record(10, 1, 0.59, 0.84, 0.80, 0.575, 0.82),
        record(20, 2, 0.585, 0.84, 0.10, 0.57, 0.30),
        record(30, 3, 0.59, 0.84, 0.55, 0.57, 0.56),
        record(30, 3, 0.595, 0.845, 0.50, 0.575, 0.52),
    ],
    # Every epoch lost more than 2 points of selection top-1: none is eligible.
    "lr=1e-03": [
        record(10, 1, 0.56, 0.81, 0.10, 0.55, 0.12),
        record(20, 2, 0.50, 0.76, 0.02, 0.48, 0.03),
        record(30, 3, 0.47, 0.73, 0.01, 0.45, 0.01),
    ],
    # The pick: its middle epoch, selection top-1 56.5 % and the lowest eligible selection ASR
    # (25 %); its last epoch has a lower ASR but lost 4 points.
    "lr=5e-04": [
        record(10, 1, 0.58, 0.83, 0.40, 0.57, 0.42),
        record(20, 2, 0.575, 0.83, 0.20, 0.565, 0.25),
        record(30, 3, 0.55, 0.80, 0.05, 0.54, 0.06),
    ],
    # Eligible by its figures with a lower selection ASR (9 %), but the run is not finished.
    "lr=2e-03": [record(10, 1, 0.58, 0.82, 0.08, 0.57, 0.09)],
}


@pytest.fixture
def cleaning_sweep(tmp_path):
    """Five cleaning runs of one pretrained model, each evaluated at step 0 and after every epoch:
    three finished (3 epochs), one stopped after an epoch, one never started."""
    root = tmp_path / "sweep"
    root.mkdir()
    write_plan(root, list(RUNS.items()))
    for name, evals in EPOCHS.items():
        write_run(root, name, RUNS[name], [START, *evals], finished=name != "lr=2e-03")
    return root


def point(name, step, epoch, top1, top5, asr, selection_top1, selection_asr, status="finished", chosen=False):
    return {
        "name": name, "status": status, "overrides": {LR: RUNS[name][LR]}, "step": step, "epoch": epoch,
        "test_top1": top1, "test_top5": top5, "test_asr": asr, "selection_top1": selection_top1,
        "selection_asr": selection_asr, "original": ORIGINAL, "chosen": chosen,
    }


def test_every_epoch_is_a_point_and_the_pick_is_made_on_the_selection_split(cleaning_sweep):
    summary = sweep_report.write_sweep_report(cleaning_sweep)
    assert json.loads((cleaning_sweep / "sweep_report.json").read_text()) == summary
    assert summary["varying_keys"] == [LR]  # the SSL weight is the same in every run
    assert (summary["test_set"], summary["selection_set"]) == ("test", "selection")
    assert (summary["num_runs"], summary["num_finished"], summary["num_points"]) == (5, 3, 10)
    assert summary["chosen"] == {"name": "lr=5e-04", "epoch": 2, "step": 20}
    assert summary["note"] == "chosen: lr=5e-04, epoch 2 (step 20)"
    # Finished runs first, then the others, in plan order; each run's epochs in order; no step 0.
    assert [(row["name"], row["epoch"]) for row in summary["points"]] == [
        ("lr=1e-04", 1), ("lr=1e-04", 2), ("lr=1e-04", 3),
        ("lr=1e-03", 1), ("lr=1e-03", 2), ("lr=1e-03", 3),
        ("lr=5e-04", 1), ("lr=5e-04", 2), ("lr=5e-04", 3),
        ("lr=2e-03", 1), ("lr=5e-03", None),
    ]
    rows = {(row["name"], row["epoch"]): row for row in summary["points"]}
    assert rows[("lr=5e-04", 2)] == point("lr=5e-04", 20, 2, 0.575, 0.83, 0.20, 0.565, 0.25, chosen=True)
    assert rows[("lr=1e-04", 3)] == point("lr=1e-04", 30, 3, 0.595, 0.845, 0.50, 0.575, 0.52)
    assert rows[("lr=2e-03", 1)] == point("lr=2e-03", 10, 1, 0.58, 0.82, 0.08, 0.57, 0.09, status="not finished")
    assert rows[("lr=5e-03", None)] == {
        "name": "lr=5e-03", "status": "not started", "overrides": {LR: 5e-3},
        "step": None, "epoch": None, "test_top1": None, "test_top5": None, "test_asr": None,
        "selection_top1": None, "selection_asr": None, "original": None, "chosen": False,
    }
    assert [row["chosen"] for row in summary["points"]].count(True) == 1

    md = (cleaning_sweep / "sweep_report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table == [
        "| run | optim.learning_rate | status | epoch | top-1 | top-5 | ASR | selection top-1 | selection ASR | original selection top-1 | chosen |",
        "| lr=1e-04 | 0.0001 | finished | 1 | 59.0 | 84.0 | 80.0 | 57.5 | 82.0 | 58.0 |  |",
        "| lr=1e-04 | 0.0001 | finished | 2 | 58.5 | 84.0 | 10.0 | 57.0 | 30.0 | 58.0 |  |",
        "| lr=1e-04 | 0.0001 | finished | 3 | 59.5 | 84.5 | 50.0 | 57.5 | 52.0 | 58.0 |  |",
        "| lr=1e-03 | 0.001 | finished | 1 | 56.0 | 81.0 | 10.0 | 55.0 | 12.0 | 58.0 |  |",
        "| lr=1e-03 | 0.001 | finished | 2 | 50.0 | 76.0 | 2.0 | 48.0 | 3.0 | 58.0 |  |",
        "| lr=1e-03 | 0.001 | finished | 3 | 47.0 | 73.0 | 1.0 | 45.0 | 1.0 | 58.0 |  |",
        "| lr=5e-04 | 0.0005 | finished | 1 | 58.0 | 83.0 | 40.0 | 57.0 | 42.0 | 58.0 |  |",
        "| lr=5e-04 | 0.0005 | finished | 2 | 57.5 | 83.0 | 20.0 | 56.5 | 25.0 | 58.0 | ✓ |",
        "| lr=5e-04 | 0.0005 | finished | 3 | 55.0 | 80.0 | 5.0 | 54.0 | 6.0 | 58.0 |  |",
        "| lr=2e-03 | 0.002 | not finished | 1 | 58.0 | 82.0 | 8.0 | 57.0 | 9.0 | 58.0 |  |",
        "| lr=5e-03 | 0.005 | not started | – | – | – | – | – | – | – |  |",
    ]
    assert "5 runs, 3 finished, 10 evaluated epochs" in md and "chosen: lr=5e-04, epoch 2 (step 20)" in md
    with Image.open(cleaning_sweep / "sweep_report.png") as image:
        assert image.format == "PNG" and image.width > image.height > 100


def test_the_original_is_never_a_point(tmp_path):
    # Every cleaned epoch has a higher selection ASR than the model it started from: were the
    # step-0 evaluation a candidate, it would win; the pick is the best cleaned epoch instead.
    root = tmp_path / "sweep"
    root.mkdir()
    write_plan(root, [("lr=1e-04", RUNS["lr=1e-04"])])
    start = record(0, 0, 0.60, 0.85, 0.50, 0.58, 0.50)
    write_run(root, "lr=1e-04", RUNS["lr=1e-04"], [start, record(10, 1, 0.60, 0.85, 0.7, 0.58, 0.7), record(20, 2, 0.60, 0.85, 0.6, 0.58, 0.6)])
    summary = sweep_report.summarise_sweep(root)
    assert [row["step"] for row in summary["points"]] == [10, 20]
    assert summary["chosen"] == {"name": "lr=1e-04", "epoch": 2, "step": 20}


def test_reference_run_gives_the_original_figures(cleaning_sweep, tmp_path):
    # The pretrained model's own run: its selection top-1 (52 %) makes more epochs eligible
    # (>= 50 %), among them lr=5e-04's last epoch with a selection ASR of 6 %.
    reference = write_run(tmp_path, "pretrained", {}, [record(30, 3, 0.62, 0.86, 0.995, 0.52, 0.99)], config={})
    summary = sweep_report.write_sweep_report(cleaning_sweep, reference=str(reference))
    assert summary["chosen"] == {"name": "lr=5e-04", "epoch": 3, "step": 30}
    assert summary["original_source"] == f"last evaluation of the reference run {reference}"
    original = {"step": 30, "epoch": 3, "test_top1": 0.62, "test_top5": 0.86, "test_asr": 0.995, "selection_top1": 0.52, "selection_asr": 0.99}
    assert all(row["original"] == original for row in summary["points"])


def test_without_original_or_selection_split_no_point_is_chosen(tmp_path):
    root = tmp_path / "pretraining_sweep"
    root.mkdir()
    entries = [("wd=0.1", {"optim.weight_decay": 0.1}), ("wd=1", {"optim.weight_decay": 1.0})]
    write_plan(root, entries)
    # Pretraining runs: their step-0 evaluation is of random weights, not an original.
    scratch = {"train": {"init_from": ""}, "eval": {"selection_set": "selection"}}
    write_run(root, "wd=0.1", entries[0][1], [record(0, 0, 0.1, 0.5, 0.1, 0.1, 0.1), record(8, 1, 0.5, 0.8, 0.9, 0.5, 0.9)], config=scratch)
    write_run(root, "wd=1", entries[1][1], [record(0, 0, 0.1, 0.5, 0.1, 0.1, 0.1), record(8, 1, 0.4, 0.7, 0.3, 0.4, 0.3)], config=scratch)
    summary = sweep_report.write_sweep_report(root)
    assert [(row["name"], row["step"]) for row in summary["points"]] == [("wd=0.1", 8), ("wd=1", 8)]
    assert summary["chosen"] is None and summary["original_source"] is None
    assert summary["note"].startswith("no original figures")

    # Test figures only: no selection split, so nothing is chosen even with a reference.
    for name, _ in entries:
        evals = root / name / "evals.jsonl"
        evals.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if not k.startswith("selection/")}) + "\n" for line in evals.read_text().splitlines()))
    summary = sweep_report.write_sweep_report(root, reference=str(root / "wd=0.1"))
    assert summary["selection_set"] is None  # configured, but never evaluated
    assert summary["chosen"] is None and summary["note"].startswith("no selection split")
    assert [row["selection_top1"] for row in summary["points"]] == [None, None]
    assert summary["original_source"] == f"last evaluation of the reference run {root / 'wd=0.1'}"


def test_eval_set_names_come_from_the_runs(tmp_path):
    root = tmp_path / "imagenet_sweep"
    root.mkdir()
    write_plan(root, [("a", {"seed": 1}), ("b", {"seed": 2})])
    for name in ("a", "b"):
        evals = [{"step": 5, "epoch": 1, "imagenet/top1": 0.3, "imagenet/top5": 0.6, "imagenet/asr": 0.2, "heldout/top1": 0.31, "heldout/asr": 0.21}]
        write_run(root, name, {"seed": 1 if name == "a" else 2}, evals, config={"train": {"init_from": "x"}, "eval": {"selection_set": "heldout"}})
    summary = sweep_report.summarise_sweep(root)
    assert (summary["test_set"], summary["selection_set"]) == ("imagenet", "heldout")
    assert [row["test_top1"] for row in summary["points"]] == [0.3, 0.3]
    assert summary["points"][0]["selection_top1"] == 0.31
    for name in ("a", "b"):
        (root / name / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--test_set"):
        sweep_report.summarise_sweep(root)
    assert sweep_report.summarise_sweep(root, test_set="imagenet", selection_set="heldout")["points"][0]["selection_asr"] == 0.21


def test_corrupt_files_are_named(cleaning_sweep, capsys):
    evals = cleaning_sweep / "lr=1e-03" / "evals.jsonl"
    good = evals.read_text()
    evals.write_text(good.replace("\n", "\n{not json", 1))
    with pytest.raises(sweep_report.RunFileError, match=f"{evals}, line 2, is not valid JSON"):
        sweep_report.write_sweep_report(cleaning_sweep)
    evals.write_text(good)

    done = cleaning_sweep / "lr=5e-04" / "done.json"
    done.write_text('{"steps": 20, "results": {')
    assert sweep_report.main([str(cleaning_sweep)]) == 2
    assert f"{done} is not valid JSON" in capsys.readouterr().err
    assert not (cleaning_sweep / "sweep_report.md").exists()

    (cleaning_sweep / "sweep.json").write_text('{"runs": [{"name": "x"}]}')
    with pytest.raises(sweep_report.RunFileError, match="sweep.json is not a sweep plan"):
        sweep_report.write_sweep_report(cleaning_sweep)


def test_without_a_plan_the_run_folders_are_found(cleaning_sweep):
    (cleaning_sweep / "sweep.json").unlink()
    summary = sweep_report.summarise_sweep(cleaning_sweep)
    # No plan: only folders with overrides.json exist, so no run is "not started".
    assert sorted({row["name"] for row in summary["points"]}) == ["lr=1e-03", "lr=1e-04", "lr=2e-03", "lr=5e-04"]
    assert summary["config"] is None and summary["chosen"] == {"name": "lr=5e-04", "epoch": 2, "step": 20}


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


def epoch_figures(config) -> dict[int, tuple[float, float]]:
    """{epoch: (top-1, ASR)} of a run's two epochs: the first 1 point more accurate, 20 more ASR."""
    final = figures(config)
    return {1: (final["top1"] + 0.01, final["asr"] + 0.2), 2: (final["top1"], final["asr"])}


def fake_train(config, workdir):
    """Writes config.json, evals.jsonl (before cleaning and after each of 2 epochs) and done.json."""
    evals = [record(0, 0, 0.60, 0.85, 0.99, 0.60, 0.99)]
    for epoch, (top1, asr) in epoch_figures(config).items():
        evals.append(record(4 * epoch, epoch, top1, 0.8, asr, top1, asr))
    run_dir = pathlib.Path(workdir)
    (run_dir / "config.json").write_text(config.to_json_best_effort(indent=2))
    (run_dir / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (run_dir / "done.json").write_text(json.dumps({"steps": 8, "results": evals[-1]}))


def test_report_of_a_sweep_expanded_by_bclip_sweep(tmp_path, capsys):
    config_path = tmp_path / "clean_sweep.py"
    config_path.write_text(SWEEP_CONFIG)
    config, entries = sweep_runs.load_sweep(str(config_path))
    root = str(tmp_path / "sweep")
    runs = sweep_runs.expand_sweep(root, entries)
    sweep_runs.write_plan(root, str(config_path), runs)
    for run in runs[:-1]:  # the last run is never started
        sweep_runs.write_overrides(run)
        fake_train(run_configs.override(config, run.overrides), run.workdir)

    assert sweep_report.main([root]) == 0  # `python -m bclip.sweep.report ROOT`
    assert f"{len(runs)} runs, {len(runs) - 1} finished" in capsys.readouterr().out
    summary = json.loads((tmp_path / "sweep" / "sweep_report.json").read_text())
    assert summary["config"] == str(config_path)
    assert summary["varying_keys"] == ["optim.learning_rate", "objective.ssl_weight"]
    assert summary["points"][-1]["name"] == runs[-1].name == "lr=0.005_ssl_weight=1"
    assert summary["points"][-1]["status"] == "not started"

    # One row per (run, epoch), in plan order, with that epoch's own figures.
    expected = {}
    for run in runs[:-1]:
        for epoch, (top1, asr) in epoch_figures(run_configs.override(config, run.overrides)).items():
            expected[(run.name, epoch)] = (run.overrides, top1, asr)
    points = summary["points"][:-1]
    assert [(row["name"], row["epoch"]) for row in points] == list(expected)
    for row in points:
        overrides, top1, asr = expected[(row["name"], row["epoch"])]
        assert row["status"] == "finished" and row["overrides"] == overrides and row["step"] == 4 * row["epoch"]
        assert row["test_top1"] == pytest.approx(top1) and row["test_asr"] == pytest.approx(asr)
        assert row["selection_top1"] == pytest.approx(top1) and row["original"]["selection_top1"] == 0.60
    # The rule by hand over every point: selection top-1 >= 58 %, then the lowest selection ASR.
    # The lowest ASR of all (lr 1e-3, SSL weight 4, epoch 2) lost 2.6 points and is passed over,
    # while that run's first epoch (lost 1.6) is eligible.
    eligible = [key for key, (_, top1, _) in expected.items() if top1 >= 0.58 - 1e-12]
    lowest_asr = min(expected, key=lambda key: expected[key][2])
    assert lowest_asr == ("lr=0.001_ssl_weight=4", 2) and lowest_asr not in eligible
    assert ("lr=0.001_ssl_weight=4", 1) in eligible
    chosen = min(eligible, key=lambda key: expected[key][2])
    assert chosen == ("lr=0.001_ssl_weight=1", 2)
    assert summary["chosen"] == {"name": chosen[0], "epoch": chosen[1], "step": 8}
    md = (tmp_path / "sweep" / "sweep_report.md").read_text()
    assert "| lr=0.001_ssl_weight=1 | 0.001 | 1 | finished | 2 | 58.6 | 80.0 | 35.0 | 58.6 | 35.0 | 60.0 | ✓ |" in md
    assert "| lr=0.001_ssl_weight=1 | 0.001 | 1 | finished | 1 | 59.6 | 80.0 | 55.0 | 59.6 | 55.0 | 60.0 |  |" in md
    assert "| lr=0.005_ssl_weight=1 | 0.005 | 1 | not started |" in md
    assert (tmp_path / "sweep" / "sweep_report.png").stat().st_size > 5000
