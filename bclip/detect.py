"""Score a finished run's training pairs for poisoning with its own model, and measure the scores
against the poisons the run actually had.

  python -m bclip.detect --run runs/study/pretrain/MMCL --out runs/study/detect/MMCL [--detector dao --k 16]

The run's model (its newest checkpoint) embeds every training pair as the run trained on it
(poisoned pairs with their trigger and caption; bclip.epoch_passes.training_set_embeddings), each
image embedding gets a local-density outlier score (bclip.detection), and OUT gets:

  detection.json          the settings and the metrics (AUROC, precision and recall of the flagged);
  scores.npy              float32 [N], the score of example i at row i (NaN: a record training drops);
  suspected_indices.json  the flagged example indices: a JSON list that `train.exclude_indices_file`
                          reads, for "detect, drop, retrain".
"""

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np
from etils import epath

from bclip import checkpointing, detection, epoch_passes, run_files, sharding
from bclip.data import training_input

DETECTION_FILE, SCORES_FILE, SUSPECTED_FILE = "detection.json", "scores.npy", "suspected_indices.json"


def detect_run(run_dir: str, out_dir: str, detector: str = "dao", k: int = 16, group_size: int = 4096,
               num_flagged: int | None = None) -> dict:
    """Scores `run_dir`'s training pairs and writes OUT's files (module docstring); returns the metrics."""
    poison_file = epath.Path(run_dir) / run_files.POISON_FILE
    if not poison_file.exists():
        raise FileNotFoundError(f"{poison_file} does not exist: {run_dir} is not a poisoned run, so nothing can be measured")
    mesh = sharding.make_mesh()
    config, model, variables, step_dir = checkpointing.load_run_model(run_dir, mesh)

    tokenizer = training_input.make_tokenizer(config)
    source, plan = training_input.training_examples(config)
    table_size = training_input.num_examples(source)
    context = epoch_passes.PassContext(config, model, mesh, source, table_size, tokenizer, poison_plan=plan)
    embedded = epoch_passes.training_set_embeddings(context, variables)
    valid = np.asarray(embedded["valid"])
    indices = np.asarray(embedded["index"])[valid]
    example_scores = detection.scores(np.asarray(embedded["image"])[valid], detector, k, group_size)

    poisons = set(training_input.read_excluded_indices(poison_file).tolist())
    is_poisoned = np.array([int(i) in poisons for i in indices])
    metrics = detection.detection_metrics(example_scores, is_poisoned, num_flagged)
    flagged = indices[np.argsort(-example_scores, kind="stable")[: metrics["num_flagged"]]]

    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = np.full((table_size,), np.nan, np.float32)
    table[indices] = example_scores
    with (out / SCORES_FILE).open("wb") as f:
        np.save(f, table, allow_pickle=False)
    run_files.write_json(out / SUSPECTED_FILE, sorted(int(i) for i in flagged))
    settings = {"run": os.fspath(run_dir), "checkpoint": step_dir, "detector": detector, "k": k, "group_size": group_size}
    run_files.write_json(out / DETECTION_FILE, {**settings, **metrics})
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bclip.detect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="A finished poisoned run's folder.")
    parser.add_argument("--out", required=True, help="Folder for detection.json, scores.npy, suspected_indices.json.")
    parser.add_argument("--detector", default="dao", choices=sorted(detection.DETECTORS))
    parser.add_argument("--k", type=int, default=16, help="Neighbours per point (default 16).")
    parser.add_argument("--group_size", type=int, default=4096, help="Points per reference group (default 4096).")
    parser.add_argument("--num_flagged", type=int, default=None, help="How many to flag (default: the number of poisons).")
    args = parser.parse_args(argv)
    try:
        metrics = detect_run(args.run, args.out, args.detector, args.k, args.group_size, args.num_flagged)
    except (FileNotFoundError, ValueError, checkpointing.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
