"""Local-density poison detectors against plain numpy references written from their definitions,
and the detection metrics against counting."""

import itertools
import json
import os

import numpy as np
import pytest
from test_train_fake_data import BATCH_SIZE, fake_data_config

from bclip import config as run_configs
from bclip import detect, detection, run_files, train
from bclip.data import training_input


def _reference(points: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The three scores from their definitions, point by point, in float64."""
    n = len(points)
    distance = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    neighbours, k_distance, lid = [], np.empty(n), np.empty(n)
    for i in range(n):
        others = [j for j in np.argsort(distance[i], kind="stable") if j != i][:k]
        neighbours.append(others)
        nearest = distance[i, others]
        k_distance[i] = nearest[-1]
        lid[i] = 1.0 / np.mean([np.log(k_distance[i] / d) for d in nearest[:-1]])
    slof = np.array([k_distance[i] / np.mean(k_distance[neighbours[i]]) for i in range(n)])
    dao = np.array([np.mean([lid[j] * np.log(k_distance[i] / k_distance[j]) for j in neighbours[i]]) for i in range(n)])
    return {"k_distance": k_distance, "slof": slof, "dao": dao}


def test_nearest_distances_are_the_k_nearest_other_points():
    points = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)
    distances, indices = map(np.asarray, detection.nearest_distances(points, 4))
    full = np.sqrt(((points[:, None].astype(np.float64) - points[None]) ** 2).sum(-1))
    np.fill_diagonal(full, np.inf)
    np.testing.assert_array_equal(indices, np.argsort(full, axis=1)[:, :4])
    np.testing.assert_allclose(distances, np.sort(full, axis=1)[:, :4], rtol=1e-4)


@pytest.mark.parametrize("detector", sorted(detection.DETECTORS))
def test_scores_follow_their_definitions(detector):
    points = np.random.default_rng(1).normal(size=(60, 6)).astype(np.float32)
    expected = _reference(points.astype(np.float64), k=5)[detector]
    np.testing.assert_allclose(detection.scores(points, detector, k=5), expected, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("detector", sorted(detection.DETECTORS))
def test_a_sparse_point_among_tight_clusters_scores_highest(detector):
    # Tight clusters of 10 points (spread 0.01), and one point between them: its neighbourhood is
    # sparse, as a poisoned pair's is to a backdoored model.
    rng = np.random.default_rng(2)
    centres = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float32)
    clusters = (centres[:, None] + 0.01 * rng.normal(size=(4, 10, 2))).reshape(-1, 2)
    points = np.concatenate([clusters, [[0.5, 0.5]]]).astype(np.float32)
    assert int(np.argmax(detection.scores(points, detector, k=4))) == len(points) - 1


def test_groups_are_scored_apart():
    points = np.random.default_rng(3).normal(size=(90, 4)).astype(np.float32)
    grouped = detection.scores(points, "slof", k=3, group_size=30, seed=7)
    order = np.random.default_rng(7).permutation(90)
    for group in np.array_split(order, 3):
        np.testing.assert_allclose(grouped[group], detection.scores(points[group], "slof", k=3), rtol=1e-6)


def test_bad_detector_and_too_small_groups_are_errors():
    with pytest.raises(ValueError, match="unknown detector 'lof'"):
        detection.scores(np.zeros((10, 2)), "lof")
    with pytest.raises(ValueError, match="k=16 needs groups of more than 16 points"):
        detection.scores(np.zeros((10, 2)), "dao", k=16)


def test_auroc_is_the_share_of_correctly_ordered_pairs_with_half_for_ties():
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 5, size=50).astype(float)  # many ties
    labels = rng.random(50) < 0.3
    pairs = list(itertools.product(scores[labels], scores[~labels]))
    expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert detection.auroc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert detection.auroc(np.arange(4.0), np.array([False, False, True, True])) == 1.0
    assert np.isnan(detection.auroc(np.arange(3.0), np.zeros(3, bool)))


def test_precision_and_recall_of_the_highest_scores():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.05])
    poisoned = np.array([True, False, True, False, True, False])
    metrics = detection.detection_metrics(scores, poisoned)  # flags the top 3: two poisons
    assert (metrics["num_flagged"], metrics["precision"], metrics["recall"]) == (3, 2 / 3, 2 / 3)
    metrics = detection.detection_metrics(scores, poisoned, num_flagged=5)
    assert (metrics["precision"], metrics["recall"]) == (3 / 5, 1.0)
    assert metrics["auroc"] == pytest.approx(6 / 9)  # pairs a poison outranks: 3 + 2 + 1 of 9


def test_detect_scores_a_poisoned_runs_pairs_and_writes_what_a_retrain_excludes(tmp_path, monkeypatch):
    config = run_configs.override(
        fake_data_config(tmp_path, monkeypatch), {"poison.count": 3, "poison.trigger.size": 4}
    )
    run_dir, out = str(tmp_path / "run"), tmp_path / "detect"
    train.train_and_evaluate(config, run_dir)
    assert detect.main(["--run", run_dir, "--out", str(out), "--detector", "slof", "--k", "3"]) == 0

    poisons = sorted(training_input.read_excluded_indices(os.path.join(run_dir, run_files.POISON_FILE)).tolist())
    table = np.load(out / detect.SCORES_FILE, allow_pickle=False)
    assert table.shape == (BATCH_SIZE,) and np.isfinite(table).all()
    report = json.loads((out / detect.DETECTION_FILE).read_text())
    # The figures are those of the saved scores against the run's own poisons.
    expected = detection.detection_metrics(table, np.isin(np.arange(BATCH_SIZE), poisons))
    assert {key: report[key] for key in expected} == expected
    assert (report["num_poisoned"], report["num_flagged"], report["detector"], report["k"]) == (3, 3, "slof", 3)
    suspected = json.loads((out / detect.SUSPECTED_FILE).read_text())
    assert suspected == sorted(np.argsort(-table, kind="stable")[:3].tolist())
    # The list is what a retrain's train.exclude_indices_file reads.
    np.testing.assert_array_equal(training_input.read_excluded_indices(out / detect.SUSPECTED_FILE), suspected)


def test_detect_needs_a_poisoned_run(tmp_path, capsys):
    run_dir = str(tmp_path / "run")  # a clean run's folder has no poison file
    os.makedirs(run_dir)
    assert detect.main(["--run", run_dir, "--out", str(tmp_path / "out")]) == 2
    assert f"{run_dir}/{run_files.POISON_FILE} does not exist" in capsys.readouterr().err


def test_a_run_that_drops_flagged_pairs_trains_on_the_poisons_it_kept(tmp_path, monkeypatch):
    """Detect, drop, retrain: the poisons are the dataset's; excluding flagged pairs removes those it
    names and poisons no other pair in their place."""
    config = run_configs.override(fake_data_config(tmp_path, monkeypatch), {"poison.count": 3, "data.batch_size": 2})
    tokenizer = training_input.make_tokenizer(config)
    _, plan, data = training_input.make_training_input(config, config.objective, tokenizer, 0, 1, None)
    data.close()
    poisons = plan.indices.tolist()
    dropped = [poisons[0], next(i for i in range(BATCH_SIZE) if i not in poisons)]  # one poison, one clean pair
    (tmp_path / "suspected.json").write_text(json.dumps(dropped))

    config = run_configs.override(config, {"train.exclude_indices_file": str(tmp_path / "suspected.json")})
    source, plan, data = training_input.make_training_input(config, config.objective, tokenizer, 0, 1, None)
    assert plan.indices.tolist() == poisons[1:]
    batches = [next(data) for _ in range(len(source) // 2)]  # one epoch
    data.close()
    indices = np.concatenate([batch["index"] for batch in batches])
    assert sorted(indices.tolist()) == sorted(set(range(BATCH_SIZE)) - set(dropped))
    poisoned = np.concatenate([batch["is_poisoned"] for batch in batches])
    assert sorted(indices[poisoned].tolist()) == poisons[1:]
