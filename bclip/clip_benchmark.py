"""A run's evaluation figures as CLIP_benchmark's result files, one per eval set: {"dataset",
"model", "pretrained", "task", "metrics", "language"}, with its metric names (acc1, acc5, mean_per_class_recall;
image_retrieval_recall@k, text_retrieval_recall@k; lp_acc1, lp_acc5, lp_mean_per_class_recall)
beside bclip's own (ASR), so tables built for CLIP_benchmark read bclip's results too."""

import json
import re

import ml_collections
from etils import epath

# bclip evaluator -> CLIP_benchmark task.
TASKS = {"zero_shot": "zeroshot_classification", "retrieval": "zeroshot_retrieval", "linear_probe": "linear_probe"}
# bclip's names of zero-shot figures -> CLIP_benchmark's (others keep their names).
RENAMED = {"top1": "acc1", "top5": "acc5"}


def benchmark_records(results: dict, config: ml_collections.ConfigDict, pretrained: str, language: str = "en") -> list[dict]:
    """One CLIP_benchmark record per eval set of `config` with figures in `results` (an evaluation
    as evals.jsonl holds it: {"<set>/<figure>": value}). `pretrained` names the weights (a run)."""
    records = []
    for name, set_config in config.eval.sets.items():
        prefix = f"{name}/"
        figures = {key[len(prefix):]: value for key, value in results.items() if key.startswith(prefix)}
        if not figures:
            continue
        if set_config.evaluator not in TASKS:
            raise ValueError(f"eval set {name!r}: evaluator {set_config.evaluator!r} has no CLIP_benchmark task; known: {sorted(TASKS)}")
        records.append({
            "dataset": name,
            "model": config.model.name,
            "pretrained": pretrained,
            "task": TASKS[set_config.evaluator],
            "metrics": {RENAMED.get(key, key): value for key, value in figures.items()},
            "language": language,
        })
    return records


def write_records(directory, records: list[dict]) -> list[str]:
    """Each record to directory/<dataset>_<task>.json (CLIP_benchmark writes one file per dataset
    and task); returns the paths."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for record in records:
        path = directory / re.sub(r"[^\w.@-]", "_", f"{record['dataset']}_{record['task']}.json")
        path.write_text(json.dumps(record, indent=2) + "\n")
        paths.append(str(path))
    return paths
