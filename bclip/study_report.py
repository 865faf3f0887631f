"""The study's report: for each cleaning method, the paper's figures from its evaluated points (the
lowest ASR within 1/2/5 points of the original's accuracy, the best accuracy with ASR ≤ 5 %, the point
picked on the selection split), written through epath (so possibly to gs://) as JSON, Markdown and a
plot. A point is one evaluated epoch of one cleaning run."""

import dataclasses
import io
import json
import math
import os
from typing import Iterable, Sequence

from etils import epath

ACCURACY_DROPS = (1.0, 2.0, 5.0)  # percentage points
LOW_ASR = 0.05


@dataclasses.dataclass(frozen=True)
class Point:
    """One evaluated epoch of one cleaning run: test and selection accuracy and ASR (fractions), plus
    the run's method and learning rate."""

    method: str
    run: str
    epoch: int
    test_top1: float
    test_asr: float
    selection_top1: float = math.nan
    selection_asr: float = math.nan
    learning_rate: float = math.nan
    test_top5: float = math.nan
    # Other evaluations of the same model ({"<set>/<figure>": value}: retrieval, linear probe).
    evaluations: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)


def _describe(point: Point | None) -> dict | None:
    if point is None:
        return None
    described = {
        "top1": point.test_top1,
        "asr": point.test_asr,
        "run": point.run,
        "epoch": point.epoch,
        "learning_rate": point.learning_rate,
    }
    return {**described, "evaluations": point.evaluations} if point.evaluations else described


def extra_figures(record: dict, sets) -> dict:
    """The figures of eval `sets` in an evals.jsonl record: {"<set>/<figure>": value}."""
    return {key: value for key, value in record.items() if key.split("/")[0] in sets and "/" in key}


def lowest_asr_within(points: Sequence[Point], original_top1: float, drop_points: float) -> Point | None:
    """The point with the lowest test ASR among those with top-1 ≥ original − drop (in % points).

    Ties go to the higher accuracy.
    """
    floor = original_top1 - drop_points / 100.0
    eligible = [p for p in points if p.test_top1 >= floor - 1e-12]
    return min(eligible, key=lambda p: (p.test_asr, -p.test_top1), default=None)


def best_accuracy_with_low_asr(points: Sequence[Point], max_asr: float = LOW_ASR) -> Point | None:
    """The point with the highest test top-1 among those with test ASR ≤ max_asr."""
    eligible = [p for p in points if p.test_asr <= max_asr + 1e-12]
    return max(eligible, key=lambda p: (p.test_top1, -p.test_asr), default=None)


def chosen_on_selection(points: Sequence[Point], original_selection_top1: float, drop_points: float = 2.0) -> Point | None:
    """The point picked on the selection split: lowest selection ASR with selection top-1 within
    `drop_points` of the original's; if none qualifies, the best selection (top-1 − ASR)."""
    with_selection = [p for p in points if not math.isnan(p.selection_top1)]
    if not with_selection:
        return None
    floor = original_selection_top1 - drop_points / 100.0
    eligible = [p for p in with_selection if p.selection_top1 >= floor - 1e-12]
    if eligible:
        return min(eligible, key=lambda p: (p.selection_asr, -p.selection_top1))
    return max(with_selection, key=lambda p: p.selection_top1 - p.selection_asr)


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats on both figures (test top-1 at least as high and test ASR at
    least as low, one of them strictly), by ASR ascending; of identical points the first is kept."""
    front = []
    # By ASR ascending, higher accuracy first among equal ASRs: a point is on the front exactly when
    # its accuracy beats every point before it.
    for point in sorted(points, key=lambda p: (p.test_asr, -p.test_top1)):
        if not front or point.test_top1 > front[-1].test_top1:
            front.append(point)
    return front


def summarise_method(points: Sequence[Point], original: dict) -> dict:
    """The figures for one cleaning method's points against the original model's evaluation."""
    summary = {
        "num_points": len(points),
        "pareto_front": [_describe(p) for p in pareto_front(points)],
        "lowest_asr_within": {
            f"{drop:g}pt": _describe(lowest_asr_within(points, original["test_top1"], drop)) for drop in ACCURACY_DROPS
        },
        "best_top1_with_asr_at_most_5pct": _describe(best_accuracy_with_low_asr(points)),
    }
    if not math.isnan(original.get("selection_top1", math.nan)):
        summary["chosen_on_selection"] = _describe(chosen_on_selection(points, original["selection_top1"]))
    return summary


def summarise(originals: dict[str, dict], points: dict[str, Sequence[Point]]) -> dict:
    """{pretrained model: {"original": figures, "methods": {method: summary}}}."""
    summary = {}
    for model, original in originals.items():
        model_points = points.get(model, [])
        methods = sorted({p.method for p in model_points})
        summary[model] = {
            "original": original,
            "methods": {m: summarise_method([p for p in model_points if p.method == m], original) for m in methods},
        }
    return summary


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def pct(x) -> str:
    """A fraction as a percentage with one decimal; a dash for a missing figure."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _cell(described: dict | None) -> str:
    if described is None:
        return "none"
    return f"{pct(described['asr'])} (acc {pct(described['top1'])})"


def markdown(summary: dict) -> str:
    lines = ["# Backdoor cleaning report", ""]
    lines += [
        "Accuracy is zero-shot top-1 on the test split; ASR is the share of triggered test images of",
        "other classes classified as the target. Figures in %.",
        "",
        "## Pretrained models",
        "",
        "| pretraining | top-1 | ASR |",
        "|---|---|---|",
    ]
    for model, entry in summary.items():
        lines.append(f"| {model} | {pct(entry['original']['test_top1'])} | {pct(entry['original']['test_asr'])} |")
    for model, entry in summary.items():
        lines += [
            "",
            f"## Cleaning {model}",
            "",
            "| method | points | lowest ASR, acc ≥ orig − 1 pt | − 2 pt | − 5 pt | best acc with ASR ≤ 5 % | chosen on selection split: ASR (acc) |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, s in entry["methods"].items():
            within = s["lowest_asr_within"]
            best = s["best_top1_with_asr_at_most_5pct"]
            chosen = s.get("chosen_on_selection")
            lines.append(
                f"| {method} | {s['num_points']} | {_cell(within['1pt'])} | {_cell(within['2pt'])} | "
                f"{_cell(within['5pt'])} | {pct(best['top1']) if best else 'none'} | {_cell(chosen)} |"
            )
    lines += _evaluations_markdown(summary)
    lines += _detection_markdown(summary)
    return "\n".join(lines) + "\n"


def _detection_markdown(summary: dict) -> list[str]:
    rows = [((model,), detector, m) for model, entry in summary.items() for detector, m in entry.get("detection", {}).items()]
    return _detection_table(rows, ("pretraining",), (
        "Each pretrained model scores its own training pairs (as trained, poisons included); the pairs",
        "flagged are the highest-scoring, as many as there are poisons (so precision equals recall).",
    ))


def _detection_table(rows: list, label_headers: tuple, intro: tuple) -> list[str]:
    """The "Poison detection" section: rows (labels, detector, metrics), each row's labels under
    `label_headers`, after the `intro` lines; nothing without rows."""
    if not rows:
        return []
    lines = [
        "",
        "## Poison detection",
        "",
        *intro,
        "",
        "| " + " | ".join(label_headers) + " | detector | AUROC | precision | recall | poisoned / pairs |",
        "|" + "---|" * (len(label_headers) + 5),
    ]
    for labels, detector, m in rows:
        lines.append(
            "| " + " | ".join(labels) + f" | {detector} (k {m.get('k', '–')}) | {m['auroc']:.3f} | {pct(m['precision'])} | "
            f"{pct(m['recall'])} | {m['num_poisoned']} / {m['num_examples']} |"
        )
    return lines


# Columns of the retrieval and linear-probe table: (header, "<set>/<figure>").
EVALUATION_COLUMNS = (
    ("image→text R@1", "retrieval/text_retrieval_recall@1"),
    ("R@5", "retrieval/text_retrieval_recall@5"),
    ("text→image R@1", "retrieval/image_retrieval_recall@1"),
    ("R@5", "retrieval/image_retrieval_recall@5"),
    ("retrieval ASR", "retrieval/retrieval_asr"),
    ("probe top-1", "probe/lp_acc1"),
    ("probe ASR", "probe/lp_asr"),
)


def _evaluations_markdown(summary: dict) -> list[str]:
    """The retrieval and linear-probe figures of the pretrained models and of the cleaning points
    the report picks, when the study evaluated them."""
    rows = []
    for model, entry in summary.items():
        picked = [("pretrained", entry["original"])]
        for method, s in entry["methods"].items():
            picked += [(f"{method}, chosen on selection", s.get("chosen_on_selection")), (f"{method}, lowest ASR within 2 pt", s["lowest_asr_within"]["2pt"])]
        for which, figures in picked:
            evaluations = (figures or {}).get("evaluations")
            if evaluations:
                where = "" if which == "pretrained" else f" ({figures['run']}, epoch {figures['epoch']})"
                rows.append(f"| {model} | {which}{where} | " + " | ".join(pct(evaluations.get(key)) for _, key in EVALUATION_COLUMNS) + " |")
    if not rows:
        return []
    return [
        "",
        "## Retrieval and linear probe",
        "",
        "Recall@k on the retrieval split (several captions per image); retrieval ASR: triggered images",
        "none of whose captions names the target whose most similar caption names it. The linear probe",
        "is fitted on frozen image features of the probe's train split (L2 penalty chosen on a held-out",
        "fifth of it) and tested on the test split; probe ASR as zero-shot ASR, through the probe. In %.",
        "",
        "| pretraining | model | " + " | ".join(header for header, _ in EVALUATION_COLUMNS) + " |",
        "|---|---|" + "---|" * len(EVALUATION_COLUMNS),
        *rows,
    ]


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    """PNG bytes rendered in memory, then written through epath (savefig cannot write to gs://)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    epath.Path(path).write_bytes(buffer.getvalue())


def plot(originals: dict[str, dict], points: dict[str, Sequence[Point]], path: str | os.PathLike) -> None:
    """Accuracy vs ASR, one panel per pretrained model, methods as colours with each method's Pareto
    front drawn as a staircase, the original marked."""
    plt = pyplot()
    models = list(originals)
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.5), squeeze=False)
    methods = sorted({p.method for ps in points.values() for p in ps})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for ax, model in zip(axes[0], models):
        _draw_panel(ax, model, originals[model], points.get(model, []), methods, colours)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _draw_panel(ax, title: str, original: dict, points: Sequence[Point], methods, colours, original_label: str = "original") -> None:
    for method in methods:
        ps = [p for p in points if p.method == method]
        if ps:
            ax.scatter([100 * p.test_asr for p in ps], [100 * p.test_top1 for p in ps], s=18, alpha=0.75, color=colours[method], label=method)
            front = pareto_front(ps)
            # Each front point holds until the next, better-accuracy one at a higher ASR.
            ax.step([100 * p.test_asr for p in front], [100 * p.test_top1 for p in front], where="post",
                    color=colours[method], linewidth=1.2, alpha=0.9)
    ax.scatter([100 * original["test_asr"]], [100 * original["test_top1"]], marker="*", s=220, color="black", label=original_label, zorder=5)
    ax.set_title(title)
    ax.set_xlabel("attack success rate (%)")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_xlim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def write_report(
    workdir: str | os.PathLike,
    originals: dict[str, dict],
    points: dict[str, Sequence[Point]],
    detections: dict[str, dict[str, dict]] | None = None,
) -> dict:
    """Write summary.json, report.md and report.png to `workdir`; returns the summary.
    detections: {pretrained model: {detector: bclip.detect's metrics}}, reported per model."""
    summary = summarise(originals, points)
    for model, by_detector in (detections or {}).items():
        summary[model]["detection"] = by_detector
    workdir = epath.Path(workdir)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    (workdir / "report.md").write_text(markdown(summary))
    plot(originals, points, workdir / "report.png")
    return summary


def points_from_evals(
    evals: Iterable[dict],
    method: str,
    run: str,
    learning_rate: float,
    test_set: str = "test",
    selection_set: str | None = "selection",
    extra_sets: tuple = (),
) -> list[Point]:
    """Points from a cleaning run's evals.jsonl records (the epoch-0 evaluation, which is the
    original model, is left out; a repeated step keeps its last record). Keys are
    "{eval set}/{figure}" of the named test and selection sets; the figures of `extra_sets` (e.g.
    retrieval, linear probe) ride along in `Point.evaluations`."""
    by_step = {}
    for record in evals:
        by_step[record["step"]] = record
    points = []
    for step, record in sorted(by_step.items()):
        if step == 0:
            continue
        points.append(
            Point(
                method=method,
                run=run,
                epoch=record["epoch"],
                test_top1=record[f"{test_set}/top1"],
                test_asr=record[f"{test_set}/asr"],
                selection_top1=record.get(f"{selection_set}/top1", math.nan) if selection_set else math.nan,
                selection_asr=record.get(f"{selection_set}/asr", math.nan) if selection_set else math.nan,
                learning_rate=learning_rate,
                test_top5=record.get(f"{test_set}/top5", math.nan),
                evaluations=extra_figures(record, extra_sets),
            )
        )
    return points


# ---------------------------------------------------------------------------------------------
# Attacks x defences
# ---------------------------------------------------------------------------------------------


def defence_row(points: Sequence[Point], undefended: dict, stage: str) -> dict:
    """One defence's figures against the undefended model of its objective and attack (`undefended`:
    its test_top1 and test_asr): summarise_method's, plus, for a pretraining-time defence, its model
    (the point of the last evaluated epoch)."""
    row = {"stage": stage, **summarise_method(points, undefended)}
    if stage == "pretraining" and points:
        last = max(points, key=lambda p: p.epoch)
        row["model"] = _describe(last)
    return row


def zoo_summary(summaries: dict, points: dict, stages: dict[str, str]) -> dict:
    """{attack: {objective: {"undefended": figures, "defences": {defence: defence_row},
    "detection": ...}}}, defences in the order of `stages`. summaries: each attack's study summary
    (summarise's, detection included); points: {attack: {objective: points}}."""
    zoo = {}
    for attack, summary in summaries.items():
        zoo[attack] = {}
        for model, entry in summary.items():
            model_points = points[attack].get(model, [])
            defences = {}
            for defence, stage in stages.items():
                ps = [p for p in model_points if p.method == defence]
                if ps:
                    defences[defence] = defence_row(ps, entry["original"], stage)
            zoo[attack][model] = {"undefended": entry["original"], "defences": defences}
            if "detection" in entry:
                zoo[attack][model]["detection"] = entry["detection"]
    return zoo


def zoo_markdown(zoo: dict) -> str:
    """The attacks x defences report: the undefended models, one table per pretraining objective
    (a row per attack and defence), and the detectors' figures."""
    lines = [
        "# Attacks x defences",
        "",
        "Accuracy is zero-shot top-1 on the test split, ASR the share of triggered test images of other",
        "classes classified as the target; figures in %. Each defence is measured against the undefended",
        "model of the same objective and attack. A point is one evaluated epoch: of each cleaning run at",
        "each learning rate for a post-hoc defence, of the defended pretraining run for a pretraining-time",
        "one (its last epoch is the defended model, shown in the last column); 'none' is the undefended",
        "run's own epochs. 'Lowest ASR within k pt': the lowest ASR among points whose top-1 is at least",
        "the undefended model's minus k points, with that point's top-1.",
        "",
        "## Undefended models",
        "",
        "| attack | pretraining | top-1 | ASR |",
        "|---|---|---|---|",
    ]
    for attack, models in zoo.items():
        for model, entry in models.items():
            lines.append(f"| {attack} | {model} | {pct(entry['undefended']['test_top1'])} | {pct(entry['undefended']['test_asr'])} |")
    objectives = list(dict.fromkeys(model for models in zoo.values() for model in models))
    for model in objectives:
        lines += [
            "",
            f"## Defences of {model}",
            "",
            "| attack | defence | stage | points | lowest ASR, acc ≥ undefended − 1 pt | − 2 pt | − 5 pt | "
            "best acc with ASR ≤ 5 % | defended model: ASR (acc) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for attack, models in zoo.items():
            for defence, row in models.get(model, {}).get("defences", {}).items():
                within = row["lowest_asr_within"]
                best = row["best_top1_with_asr_at_most_5pct"]
                lines.append(
                    f"| {attack} | {defence} | {row['stage']} | {row['num_points']} | {_cell(within['1pt'])} | "
                    f"{_cell(within['2pt'])} | {_cell(within['5pt'])} | {pct(best['top1']) if best else 'none'} | "
                    f"{_cell(row['model']) if 'model' in row else '–'} |"
                )
    detections = [
        ((attack, model), detector, m)
        for attack, models in zoo.items()
        for model, entry in models.items()
        for detector, m in entry.get("detection", {}).items()
    ]
    lines += _detection_table(detections, ("attack", "pretraining"), (
        "Each undefended model scores its own training pairs; the flagged are the highest-scoring, as",
        "many as there are poisons (so precision equals recall).",
    ))
    return "\n".join(lines) + "\n"


def zoo_plot(originals: dict, points: dict, stages: dict[str, str], path: str | os.PathLike) -> None:
    """Accuracy vs ASR: a row of panels per attack, a panel per objective, each defence's points and
    Pareto front in its colour (the same colour in every panel), the undefended model marked."""
    plt = pyplot()
    attacks = list(originals)
    objectives = list(dict.fromkeys(model for models in originals.values() for model in models))
    fig, axes = plt.subplots(len(attacks), len(objectives), figsize=(5.5 * len(objectives), 4.5 * len(attacks)), squeeze=False)
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(stages)}
    for row, attack in zip(axes, attacks):
        for ax, model in zip(row, objectives):
            if model in originals[attack]:
                _draw_panel(ax, f"{attack}: {model}", originals[attack][model], points[attack].get(model, []), list(stages),
                            colours, original_label="undefended")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_zoo_report(workdir: str | os.PathLike, summaries: dict, originals: dict, points: dict, stages: dict[str, str]) -> dict:
    """Write the attacks x defences report (summary.json, report.md, report.png) to `workdir`;
    returns its summary (zoo_summary). summaries, originals, points: per attack, as each attack's
    study has them; stages: {defence: "pretraining" | "post-hoc"}, in the report's order."""
    zoo = zoo_summary(summaries, points, stages)
    workdir = epath.Path(workdir)
    (workdir / "summary.json").write_text(json.dumps(zoo, indent=2))
    (workdir / "report.md").write_text(zoo_markdown(zoo))
    zoo_plot(originals, points, stages, workdir / "report.png")
    return zoo
