"""The report of a sweep's runs (`python -m bclip.sweep.report ROOT`): every evaluated epoch of every
run as one point, and the (run, epoch) the study's selection rule picks, in ROOT/sweep_report.json,
.md and .png, read and written through epath (so ROOT may be on gs://)."""

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Sequence

from etils import epath

from bclip.sweep import runs as sweep_runs
from bclip.run_files import CONFIG_FILE, DONE_FILE, EVALS_FILE, RunFileError, read_json, read_json_lines
from bclip.study_report import pct, pyplot, save_figure

SWEEP_REPORT = "sweep_report"  # ROOT/sweep_report.md, .json and .png
SELECTION_DROP_POINTS = 2.0
FIGURES = ("test_top1", "test_top5", "test_asr", "selection_top1", "selection_asr")


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One run of a sweep as found in its folder."""

    name: str
    overrides: dict
    status: str  # "finished" (done.json), "not finished" (folder, no done.json) or "not started"
    final: dict | None  # its last evaluation record: {"step", "epoch", "{eval set}/{figure}": ...}
    start: dict | None  # its evaluation before the first step (step 0), if it made one
    # Its evaluations after training steps, one per step in step order: the sweep's points.
    evaluations: tuple[dict, ...]
    init_from: str  # the checkpoint it started from, "" for a run from scratch (from config.json)
    selection_set: str  # its config's eval.selection_set, "" when unset or unknown


def read_run(run_dir: str | os.PathLike, name: str, overrides: dict) -> SweepRun:
    """A run folder's state and evaluations; corrupt JSON is an error naming the file."""
    run_dir = epath.Path(run_dir)
    done = read_json(run_dir / DONE_FILE) if (run_dir / DONE_FILE).exists() else None
    records = read_json_lines(run_dir / EVALS_FILE) if (run_dir / EVALS_FILE).exists() else []
    config = read_json(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).exists() else {}
    by_step = {}
    for record in records:  # a step logged twice (a resumed run) keeps its last record
        by_step[record["step"]] = record
    final = by_step[max(by_step)] if by_step else None
    if final is None and isinstance(done, dict) and done.get("results"):
        final = {"step": done.get("steps"), "epoch": None, **done["results"]}
    evaluations = [by_step[step] for step in sorted(by_step) if step != 0]
    if not by_step and final is not None:  # only done.json's results are left
        evaluations = [final]
    if done is not None:
        status = "finished"
    else:
        status = "not finished" if run_dir.exists() else "not started"
    return SweepRun(
        name=name,
        overrides=dict(overrides),
        status=status,
        final=final,
        start=by_step.get(0),
        evaluations=tuple(evaluations),
        init_from=str(config.get("train", {}).get("init_from") or ""),
        selection_set=str(config.get("eval", {}).get("selection_set") or ""),
    )


def read_sweep(root: str | os.PathLike) -> tuple[str | None, list[SweepRun]]:
    """(the sweep's config file, its runs in plan order) from ROOT/sweep.json; without a plan, the
    folders under ROOT holding overrides.json, by name."""
    root = epath.Path(root)
    plan_path = root / sweep_runs.PLAN_FILE
    if plan_path.exists():
        plan = read_json(plan_path)
        try:
            runs = [sweep_runs.Run(**run) for run in plan["runs"]]
        except (KeyError, TypeError) as error:
            raise RunFileError(f"{plan_path} is not a sweep plan ({type(error).__name__}: {error})") from None
        # A run's folder is ROOT/NAME, also when the root has moved since the plan was written.
        return plan.get("config"), [read_run(root / run.name, run.name, run.overrides) for run in runs]
    if not root.is_dir():
        raise FileNotFoundError(f"sweep folder {root} does not exist")
    runs = []
    for run_dir in sorted(root.iterdir(), key=lambda path: path.name):
        if (run_dir / sweep_runs.OVERRIDES_FILE).exists():
            runs.append(read_run(run_dir, run_dir.name, read_json(run_dir / sweep_runs.OVERRIDES_FILE)))
    if not runs:
        raise FileNotFoundError(f"{root} holds no {sweep_runs.PLAN_FILE} and no run folder with {sweep_runs.OVERRIDES_FILE}")
    return None, runs


def eval_set_names(runs: Sequence[SweepRun], test_set: str | None = None, selection_set: str | None = None) -> tuple[str, str | None]:
    """The test and selection eval sets of the runs' records: given, else the runs' configured
    selection set (or one named "selection"), and the one other set (or one named "test"). The
    selection set is None when the runs have none."""
    records = [record for run in runs for record in (run.final, run.start) if record]
    sets = sorted({key[: -len("/top1")] for record in records for key in record if key.endswith("/top1")})
    if selection_set is None:
        configured = sorted({run.selection_set for run in runs if run.selection_set})
        if len(configured) > 1:
            raise ValueError(f"the runs use different selection sets {configured}: name one with --selection_set")
        selection_set = configured[0] if configured else ("selection" if "selection" in sets else None)
    if not selection_set or (sets and selection_set not in sets):
        selection_set = None  # named but never evaluated: there is no selection split
    if test_set is None:
        others = [name for name in sets if name != selection_set]
        if len(others) == 1:
            test_set = others[0]
        elif "test" in others or not others:
            test_set = "test"
        else:
            raise ValueError(f"the runs are evaluated on {others}: name the test split with --test_set")
    return test_set, selection_set


def varying_keys(runs: Sequence[SweepRun]) -> list[str]:
    """The override keys whose value is not the same in every run (unset counts as a value), in
    order of first appearance."""
    keys = []
    for run in runs:
        keys += [key for key in run.overrides if key not in keys]
    # JSON text of each value; no JSON text reads "unset" (a JSON string is quoted).
    values = {key: {json.dumps(run.overrides[key], sort_keys=True) if key in run.overrides else "unset" for run in runs} for key in keys}
    return [key for key in keys if len(values[key]) > 1]


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _figures(record: dict | None, test_set: str, selection_set: str | None) -> dict:
    """{"step", "epoch", test/selection top-1, top-5, ASR} of an evaluation record; None where absent."""
    record = record or {}
    selection = {} if selection_set is None else record
    return {
        "step": record.get("step"),
        "epoch": record.get("epoch"),
        "test_top1": _number(record.get(f"{test_set}/top1")),
        "test_top5": _number(record.get(f"{test_set}/top5")),
        "test_asr": _number(record.get(f"{test_set}/asr")),
        "selection_top1": _number(selection.get(f"{selection_set}/top1")),
        "selection_asr": _number(selection.get(f"{selection_set}/asr")),
    }


def choose_point(rows: Sequence[dict], drop_points: float = SELECTION_DROP_POINTS) -> dict | None:
    """The study's pick, made on the selection split alone: among the evaluated epochs of finished
    runs whose selection top-1 is within `drop_points` of their original's, the lowest selection
    ASR (ties: higher selection top-1, then the earlier row). The original itself (a run's step-0
    evaluation) is never a row. None when no point qualifies."""
    eligible = [
        row
        for row in rows
        if row["status"] == "finished"
        and row["original"] is not None
        and None not in (row["selection_top1"], row["selection_asr"], row["original"]["selection_top1"])
        and row["selection_top1"] >= row["original"]["selection_top1"] - drop_points / 100.0 - 1e-12
    ]
    return min(eligible, key=lambda row: (row["selection_asr"], -row["selection_top1"]), default=None)


def _original(run: SweepRun, shared_original: dict | None, test_set: str, selection_set: str | None) -> dict | None:
    """The figures a run's points are compared with: the reference run's, else the run's own
    step-0 evaluation when it starts from a checkpoint (a run from scratch has no original)."""
    if shared_original is not None:
        return shared_original
    if run.init_from and run.start is not None:
        return _figures(run.start, test_set, selection_set)
    return None


def _run_rows(
    run: SweepRun, keys: Sequence[str], original: dict | None, test_set: str, selection_set: str | None
) -> list[dict]:
    """One row per evaluated epoch of `run` (its step-0 evaluation excluded); a run without any
    gets one row with no figures, so it is still listed."""
    common = {
        "name": run.name,
        "status": run.status,
        "overrides": {key: run.overrides[key] for key in keys if key in run.overrides},
    }
    evaluations = run.evaluations or (None,)
    return [
        {**common, **_figures(record, test_set, selection_set), "original": original, "chosen": False}
        for record in evaluations
    ]


def summarise_sweep(
    root: str | os.PathLike,
    reference: str | os.PathLike | None = None,
    test_set: str | None = None,
    selection_set: str | None = None,
) -> dict:
    """Every evaluated epoch of every run of the sweep under `root` as one point (row), the
    overrides that vary, and the point chosen by the study's rule.

    The original figures the rule compares against are the `reference` run's last evaluation
    (e.g. the pretrained model's run folder), else each cleaning run's own evaluation at step 0
    (taken before its first step, of the checkpoint it starts from), which is not itself a point.
    With neither, or without a selection split, no point is chosen.
    """
    config_path, runs = read_sweep(root)
    reference_run = read_run(reference, "reference", {}) if reference is not None else None
    test_set, selection_set = eval_set_names(runs + ([reference_run] if reference_run else []), test_set, selection_set)
    keys = varying_keys(runs)
    if reference_run is not None:
        if reference_run.final is None:
            raise FileNotFoundError(f"reference run {reference} has no evaluation ({EVALS_FILE} or {DONE_FILE})")
        shared_original = _figures(reference_run.final, test_set, selection_set)
        original_source = f"last evaluation of the reference run {reference}"
    else:
        shared_original = None
        original_source = "each run's evaluation at step 0, before cleaning"
    # Finished runs first, each group in plan order; a run's points in step order.
    ordered = [run for run in runs if run.status == "finished"] + [run for run in runs if run.status != "finished"]
    rows = []
    for run in ordered:
        rows += _run_rows(run, keys, _original(run, shared_original, test_set, selection_set), test_set, selection_set)
    if not any(row["original"] for row in rows):
        original_source = None

    chosen = choose_point(rows) if selection_set is not None else None
    if chosen is not None:
        chosen["chosen"] = True
        note = f"chosen: {chosen['name']}, epoch {_epoch_text(chosen['epoch'])} (step {chosen['step']})"
    elif selection_set is None:
        note = "no selection split, so no point is chosen (choosing on the test split would select on the test set)"
    elif original_source is None:
        note = "no original figures (give --reference, or cleaning runs that evaluate at step 0), so no point is chosen"
    else:
        note = (
            f"no epoch of a finished run keeps its selection top-1 within {SELECTION_DROP_POINTS:g} points "
            "of the original"
        )

    return {
        "root": os.fspath(root),
        "config": config_path,
        "test_set": test_set,
        "selection_set": selection_set,
        "varying_keys": keys,
        "original_source": original_source,
        "rule": (
            f"lowest selection-split ASR among the evaluated epochs of finished runs whose selection-split "
            f"top-1 is within {SELECTION_DROP_POINTS:g} points of the original's"
        ),
        "chosen": None if chosen is None else {key: chosen[key] for key in ("name", "epoch", "step")},
        "note": note,
        "num_runs": len(runs),
        "num_finished": sum(run.status == "finished" for run in runs),
        "num_points": sum(row["step"] is not None for row in rows),
        "points": rows,
    }


def _epoch_text(epoch) -> str:
    return "–" if epoch is None else str(epoch)


def _override_text(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|")


def sweep_markdown(summary: dict) -> str:
    keys = summary["varying_keys"]
    selection = summary["selection_set"]
    lines = [
        "# Sweep report",
        "",
        f"Sweep `{summary['root']}`" + (f" (config `{summary['config']}`)" if summary["config"] else "")
        + f": {summary['num_runs']} runs, {summary['num_finished']} finished, {summary['num_points']} evaluated epochs.",
        f"Each row is one evaluated epoch of a run on the test split `{summary['test_set']}`"
        + (f" and the selection split `{selection}`" if selection else " (no selection split)")
        + "; figures in %. Finished runs come first, each run's epochs in order.",
        "",
        f"Original: {summary['original_source'] or 'none'}. Rule: {summary['rule']}; {summary['note']}.",
        "",
        "| run | " + "".join(f"{key} | " for key in keys)
        + "status | epoch | top-1 | top-5 | ASR | selection top-1 | selection ASR | original selection top-1 | chosen |",
        "|" + "---|" * (len(keys) + 10),
    ]
    for row in summary["points"]:
        overrides = "".join(
            f"{_override_text(row['overrides'][key]) if key in row['overrides'] else '–'} | " for key in keys
        )
        original = row["original"]["selection_top1"] if row["original"] else None
        lines.append(
            f"| {row['name']} | {overrides}{row['status']} | {_epoch_text(row['epoch'])} | {pct(row['test_top1'])} | "
            f"{pct(row['test_top5'])} | {pct(row['test_asr'])} | {pct(row['selection_top1'])} | "
            f"{pct(row['selection_asr'])} | {pct(original)} | {'✓' if row['chosen'] else ''} |"
        )
    return "\n".join(lines) + "\n"


def sweep_plot(summary: dict, path: str | os.PathLike) -> None:
    """Test top-1 vs ASR: every evaluated epoch of every run, a run's epochs joined in order and
    its last one labelled; unfinished runs hollow, the chosen point ringed, a shared original as a
    star."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    plotted = [row for row in summary["points"] if None not in (row["test_top1"], row["test_asr"])]
    names = list(dict.fromkeys(row["name"] for row in plotted))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    for name in names:
        rows = [row for row in plotted if row["name"] == name]
        x, y = [100 * row["test_asr"] for row in rows], [100 * row["test_top1"] for row in rows]
        finished = rows[0]["status"] == "finished"
        ax.plot(x, y, "-", color=colours[name], alpha=0.4, linewidth=1)
        ax.scatter(x, y, s=20, color=colours[name] if finished else "none", edgecolors=colours[name])
        ax.annotate(name, (x[-1], y[-1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for row in plotted:
        if row["chosen"]:
            label = f"chosen ({row['name']}, epoch {_epoch_text(row['epoch'])})"
            ax.scatter([100 * row["test_asr"]], [100 * row["test_top1"]], s=160, facecolors="none", edgecolors="red", label=label)
    originals = {json.dumps(row["original"], sort_keys=True) for row in summary["points"] if row["original"]}
    if len(originals) == 1:
        original = json.loads(originals.pop())
        if None not in (original["test_top1"], original["test_asr"]):
            ax.scatter([100 * original["test_asr"]], [100 * original["test_top1"]], marker="*", s=220, color="black", label="original")
    ax.set_title(f"{summary['root']}: {len(plotted)} evaluated epochs of {summary['num_runs']} runs", fontsize=9)
    ax.set_xlabel("attack success rate (%)")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_xlim(-3, 103)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_sweep_report(
    root: str | os.PathLike,
    reference: str | os.PathLike | None = None,
    test_set: str | None = None,
    selection_set: str | None = None,
) -> dict:
    """Write ROOT/sweep_report.json, .md and .png (see `summarise_sweep`); returns the summary."""
    summary = summarise_sweep(root, reference, test_set, selection_set)
    root = epath.Path(root)
    (root / f"{SWEEP_REPORT}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (root / f"{SWEEP_REPORT}.md").write_text(sweep_markdown(summary))
    sweep_plot(summary, root / f"{SWEEP_REPORT}.png")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bclip.sweep.report",
        description="Report a sweep's runs: ROOT/sweep_report.md, .json and .png (see bclip.sweep).",
    )
    parser.add_argument("root", metavar="ROOT", help="The sweep's root folder (local or gs://).")
    parser.add_argument("--reference", help="Run folder of the original (e.g. pretrained) model the rule compares to.")
    parser.add_argument("--test_set", help="Eval set of the test figures (default: inferred from the runs).")
    parser.add_argument("--selection_set", help="Eval set the run is chosen on (default: the runs' eval.selection_set).")
    args = parser.parse_args(argv)
    try:
        summary = write_sweep_report(args.root, args.reference, args.test_set, args.selection_set)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{summary['num_runs']} runs, {summary['num_finished']} finished, "
        f"{summary['num_points']} evaluated epochs; {summary['note']}"
    )
    print(f"Report: {epath.Path(args.root) / (SWEEP_REPORT + '.md')} (and .json, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
