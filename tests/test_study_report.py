"""Report figures computed from a hand-made set of points."""

import json
import math

import pytest

from bclip import study_report


def _points():
    P = study_report.Point
    return [
        # method, run, epoch, test top-1, test ASR, selection top-1, selection ASR, lr
        P("cleanclip", "lr=1e-4", 1, 0.60, 0.90, 0.61, 0.88, 1e-4),
        P("cleanclip", "lr=1e-4", 2, 0.595, 0.40, 0.60, 0.42, 1e-4),
        P("cleanclip", "lr=1e-3", 1, 0.58, 0.10, 0.575, 0.12, 1e-3),
        P("cleanclip", "lr=1e-3", 2, 0.50, 0.03, 0.52, 0.02, 1e-3),
        P("cleanclip", "lr=5e-3", 1, 0.30, 0.00, 0.31, 0.00, 5e-3),
        P("mmcl", "lr=1e-4", 1, 0.61, 0.95, 0.60, 0.97, 1e-4),
    ]


ORIGINAL = {"test_top1": 0.60, "test_asr": 0.99, "selection_top1": 0.60, "selection_asr": 0.98}


def test_lowest_asr_within_accuracy_drops():
    clean = [p for p in _points() if p.method == "cleanclip"]
    # within 1 pt (≥ 0.59): epochs with acc 0.60 and 0.595 -> lowest ASR 0.40
    assert study_report.lowest_asr_within(clean, 0.60, 1.0).test_asr == 0.40
    # within 2 pt (≥ 0.58): adds acc 0.58 / ASR 0.10
    assert study_report.lowest_asr_within(clean, 0.60, 2.0).test_asr == 0.10
    # within 5 pt (≥ 0.55): same
    assert study_report.lowest_asr_within(clean, 0.60, 5.0).test_asr == 0.10
    assert study_report.lowest_asr_within(clean, 0.90, 1.0) is None


def test_best_accuracy_with_low_asr():
    clean = [p for p in _points() if p.method == "cleanclip"]
    best = study_report.best_accuracy_with_low_asr(clean)
    assert (best.test_top1, best.test_asr) == (0.50, 0.03)
    assert study_report.best_accuracy_with_low_asr([p for p in _points() if p.method == "mmcl"]) is None


def test_chosen_on_selection_never_looks_at_test():
    clean = [p for p in _points() if p.method == "cleanclip"]
    # Selection floor 0.58: candidates sel acc 0.61/0.60 (and not 0.575) -> lowest sel ASR 0.42.
    chosen = study_report.chosen_on_selection(clean, 0.60)
    assert (chosen.run, chosen.epoch) == ("lr=1e-4", 2)
    # Changing test figures does not change the choice.
    shuffled = [study_report.Point(p.method, p.run, p.epoch, 0.0, 1.0, p.selection_top1, p.selection_asr) for p in clean]
    again = study_report.chosen_on_selection(shuffled, 0.60)
    assert (again.run, again.epoch) == ("lr=1e-4", 2)


def test_pareto_front_keeps_exactly_the_undominated_points():
    P = study_report.Point

    def point(run, top1, asr):
        return P("m", run, 1, top1, asr)

    points = [
        point("a", 0.60, 0.90),
        point("b", 0.55, 0.20),  # beaten by c on both figures
        point("c", 0.58, 0.10),
        point("d", 0.58, 0.30),  # same accuracy as c at a higher ASR
        point("e", 0.40, 0.10),  # same ASR as c, lower accuracy
        point("f", 0.30, 0.00),
        point("g", 0.62, 0.95),
        point("h", 0.60, 0.95),  # beaten by g
    ]
    front = study_report.pareto_front(points)
    assert [p.run for p in front] == ["f", "c", "a", "g"]
    # Every point left out is beaten by a front point; no front point is beaten by any point.
    for p in points:
        beaten = any(q.test_top1 >= p.test_top1 and q.test_asr <= p.test_asr and q != p
                     and (q.test_top1, q.test_asr) != (p.test_top1, p.test_asr) for q in points)
        assert beaten == (p not in front)
    assert study_report.pareto_front([]) == []


def test_write_report(tmp_path):
    points = {"MMCL": _points()}
    summary = study_report.write_report(str(tmp_path), {"MMCL": ORIGINAL}, points)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    methods = on_disk["MMCL"]["methods"]
    assert methods["cleanclip"]["num_points"] == 5
    assert methods["cleanclip"]["lowest_asr_within"]["2pt"]["asr"] == 0.10
    assert methods["cleanclip"]["best_top1_with_asr_at_most_5pct"]["top1"] == 0.50
    # All five cleanclip points are undominated; the front runs from the lowest ASR up.
    assert [(p["top1"], p["asr"]) for p in methods["cleanclip"]["pareto_front"]] == [
        (0.30, 0.00), (0.50, 0.03), (0.58, 0.10), (0.595, 0.40), (0.60, 0.90)]
    md = (tmp_path / "report.md").read_text()
    assert "| cleanclip | 5 | 40.0 (acc 59.5) | 10.0 (acc 58.0) |" in md
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_points_from_evals_skip_the_start_and_keep_the_last_repeat():
    evals = [
        {"step": 0, "epoch": 0, "test/top1": 0.6, "test/asr": 0.99},
        {"step": 10, "epoch": 1, "test/top1": 0.5, "test/asr": 0.5},
        {"step": 10, "epoch": 1, "test/top1": 0.55, "test/asr": 0.4},
        {"step": 20, "epoch": 2, "test/top1": 0.52, "test/asr": 0.2, "selection/top1": 0.5, "selection/asr": 0.3},
    ]
    points = study_report.points_from_evals(evals, "cleanclip", "lr=1e-3", 1e-3)
    assert [(p.epoch, p.test_top1) for p in points] == [(1, 0.55), (2, 0.52)]
    assert math.isnan(points[0].selection_top1) and points[1].selection_asr == pytest.approx(0.3)
