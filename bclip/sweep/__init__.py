"""Hyper-parameter sweeps from config files: a config file's `get_sweep(arg)` lists override
dicts; each becomes one run in its own readable folder under a root, run here or on a cluster.

  python -m bclip.sweep --config configs/X.py[:arg] --workdir ROOT [--mode local|slurm|tpu]
      [--parallel N] [--vectorize] [--dry_run] [-- LAUNCHER FLAGS]

  local, --parallel 1: runs one after another in this process (bclip.train.train_and_evaluate).
  local, --parallel N: N `python -m bclip.main` subprocesses at once (output in RUN/stdout.log).
  local, --vectorize: the unfinished runs train together as one jitted program reading one shared
         input stream (bclip.train.train_group). Only for sweeps whose runs differ in nothing but
         optim.learning_rate, optim.weight_decay and objective.*_weight (any other differing key
         is an error that names it); deep clustering cannot be vectorised. Each run still gets its
         folder with the files a lone run writes (metrics.jsonl, evals.jsonl, its final checkpoint,
         done.json). The group's stacked checkpoints live in ROOT/_vectorised/GROUP/ until it
         finishes, so a killed vectorised sweep resumes where it was; a run that diverges is
         reported as failed and the others go on.
  slurm: one array job, one task per run, at most N at once (launch/slurm.py; its flags after --).
  tpu:   runs one after another on a pod slice (launch/tpu_pod.py; its flags after --).

A sweep entry maps dotted keys to values, {"optim.learning_rate": 1e-4, "objective.ssl_weight": 2.0};
its run folder is ROOT/lr=1e-04_ssl_weight=2 and holds overrides.json. Runs whose folder has
done.json are skipped, so rerunning a sweep finishes what is left. An array task runs one run
of the plan written to ROOT/sweep.json:

  python -m bclip.sweep --plan ROOT/sweep.json --run_index I

Modules: `runs` (a sweep's runs: names, folders, plan files), `execute` (running them: in this
process, as one group, as subprocesses, or on a cluster), `report` (the sweep report),
`__main__` (the command).
"""
