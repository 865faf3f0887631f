"""Attacks x defences: the report's fronts and table rows on hand-made points, and the zoo study's
wiring (every attack x defence run, detect-drop-retrain's drop list, resuming) with a fake trainer."""

import json
import os

import numpy as np
import pytest

from bclip import config as run_configs
from bclip import detect, experiment, run_files, study_report
from bclip.data import triggers
from bclip.sweep import runs as sweep_runs
from test_experiment import study_synthetic

P = study_report.Point
CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def test_zoo_report_fronts_and_rows_by_hand(tmp_path):
    undefended = {"test_top1": 0.60, "test_asr": 0.98}
    points = {
        "MMCL": [
            # The undefended run's own epochs ("none").
            P("none", "pretrain/MMCL", 1, 0.40, 0.04), P("none", "pretrain/MMCL", 2, 0.60, 0.98),
            # A pretraining-time defence: its epochs, the last one the defended model.
            P("RoCLIP", "defended/MMCL/RoCLIP", 1, 0.45, 0.02), P("RoCLIP", "defended/MMCL/RoCLIP", 2, 0.56, 0.30),
            P("RoCLIP", "defended/MMCL/RoCLIP", 3, 0.585, 0.50),
            # A post-hoc defence at two learning rates.
            P("CleanCLIP", "clean/lr=1e-4", 1, 0.595, 0.90, learning_rate=1e-4),
            P("CleanCLIP", "clean/lr=1e-4", 2, 0.59, 0.95, learning_rate=1e-4),  # beaten by epoch 1
            P("CleanCLIP", "clean/lr=5e-3", 1, 0.20, 0.00, learning_rate=5e-3),
            P("CleanCLIP", "clean/lr=5e-3", 2, 0.54, 0.04, learning_rate=5e-3),
        ]
    }
    stages = {"none": "pretraining", "RoCLIP": "pretraining", "CleanCLIP": "post-hoc"}
    originals = {"BadNets": {"MMCL": undefended}}
    summaries = {"BadNets": study_report.summarise(originals["BadNets"], points)}
    summaries["BadNets"]["MMCL"]["detection"] = {
        "dao": {"k": 4, "auroc": 0.75, "precision": 0.5, "recall": 0.5, "num_poisoned": 2, "num_examples": 10}
    }
    zoo = study_report.write_zoo_report(tmp_path, summaries, originals, {"BadNets": points}, stages)
    rows = zoo["BadNets"]["MMCL"]["defences"]
    assert list(rows) == ["none", "RoCLIP", "CleanCLIP"]
    # CleanCLIP's front by hand: (0.20, 0), (0.54, 0.04), (0.595, 0.90); (0.59, 0.95) is beaten.
    assert [(p["top1"], p["asr"]) for p in rows["CleanCLIP"]["pareto_front"]] == [(0.20, 0.00), (0.54, 0.04), (0.595, 0.90)]
    assert [(p["top1"], p["asr"]) for p in rows["RoCLIP"]["pareto_front"]] == [(0.45, 0.02), (0.56, 0.30), (0.585, 0.50)]
    # RoCLIP against the undefended 60 %: within 1 pt (>= 59 %) no point; within 2 pt (>= 58 %) the
    # last epoch (ASR 50 %); within 5 pt (>= 55 %) epoch 2 (30 %); best top-1 at ASR <= 5 %: 45 %.
    roclip = rows["RoCLIP"]
    assert roclip["lowest_asr_within"]["1pt"] is None
    assert (roclip["lowest_asr_within"]["2pt"]["asr"], roclip["lowest_asr_within"]["5pt"]["asr"]) == (0.50, 0.30)
    assert roclip["best_top1_with_asr_at_most_5pct"]["top1"] == 0.45
    assert (roclip["stage"], roclip["num_points"], roclip["model"]["epoch"], roclip["model"]["asr"]) == ("pretraining", 3, 3, 0.50)
    clean = rows["CleanCLIP"]
    assert clean["lowest_asr_within"]["1pt"]["asr"] == 0.90 and clean["lowest_asr_within"]["5pt"]["asr"] == 0.90
    assert clean["best_top1_with_asr_at_most_5pct"]["top1"] == 0.54 and "model" not in clean
    assert rows["none"]["lowest_asr_within"]["1pt"]["asr"] == 0.98 and rows["none"]["best_top1_with_asr_at_most_5pct"]["top1"] == 0.40

    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(zoo))
    md = (tmp_path / "report.md").read_text()
    assert "| BadNets | MMCL | 60.0 | 98.0 |" in md
    assert "| BadNets | RoCLIP | pretraining | 3 | none | 50.0 (acc 58.5) | 30.0 (acc 56.0) | 45.0 | 50.0 (acc 58.5) |" in md
    assert "| BadNets | CleanCLIP | post-hoc | 4 | 90.0 (acc 59.5) | 90.0 (acc 59.5) | 90.0 (acc 59.5) | 54.0 | – |" in md
    assert "| BadNets | MMCL | dao (k 4) | 0.750 | 50.0 | 50.0 | 2 / 10 |" in md
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class FakeZooTrainFn:
    """Writes what a finished run leaves, with figures that are functions of its config: a
    pretraining run's ASR names its defence (and attack), its top-1 grows by epoch; a cleaning run's
    ASR falls with its learning rate and epoch."""

    def __init__(self):
        self.configs = {}

    def __call__(self, config, run_dir):
        self.configs[run_dir] = config
        os.makedirs(run_dir, exist_ok=True)
        if config.train.init_from:
            records = [{"step": 0, "epoch": 0, "test/top1": 0.5, "test/asr": 0.9}]
            for epoch in range(1, config.train.num_epochs + 1):
                records.append({"step": epoch, "epoch": epoch, "test/top1": 0.49, "test/asr": max(0.0, 0.9 - config.optim.learning_rate * 100 * epoch)})
        else:
            run_files.write_json(os.path.join(run_dir, run_files.POISON_FILE), [1, 2])
            asr = 0.3 if "roclip" in config.epoch_passes else 0.04 if "safeclip" in config.epoch_passes else 0.9
            asr -= 0.5 * bool(config.train.exclude_indices_file) + 0.1 * (config.poison.trigger.name == "blended")
            records = [{"step": epoch, "epoch": epoch, "test/top1": 0.4 + 0.05 * epoch, "test/asr": asr}
                       for epoch in range(config.train.num_epochs + 1)]
        with open(os.path.join(run_dir, run_files.EVALS_FILE), "w") as f:
            f.write("".join(json.dumps(record) + "\n" for record in records))
        run_files.write_json(os.path.join(run_dir, run_files.DONE_FILE), {"steps": 1})
        return records[-1]


def fake_detect_once(run_dir, out_dir, detector, k):
    """Scores pair i as i (pair 3 unscored), as bclip.detect lays its files out."""
    scores = np.arange(20, dtype=np.float32)
    scores[3] = np.nan
    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, detect.SCORES_FILE), scores)
    return {"detector": detector, "k": k, "auroc": 0.5, "precision": 0.5, "recall": 0.5, "num_poisoned": 2, "num_examples": 20}


def test_zoo_runs_every_attack_and_defence_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "detect_once", fake_detect_once)
    # The plots are drawn in the test above; here (eight of them, two runs) they would be most of the time.
    plotted = []
    monkeypatch.setattr(study_report, "plot", lambda originals, points, path: plotted.append(path))
    monkeypatch.setattr(study_report, "zoo_plot", lambda originals, points, stages, path: plotted.append(path))
    study = study_synthetic().get_config("zoo,smoke")
    study.world.enabled = False  # the fake trainer reads no data
    workdir = str(tmp_path / "zoo")
    train_fn = FakeZooTrainFn()
    zoo = experiment.run_study(study, workdir, train_fn)
    scaled = experiment.apply_proportions(study)
    epochs, clean_epochs = scaled.pretrain_base.train.num_epochs, scaled.clean_base["train"]["num_epochs"]
    lrs = scaled.cleaning_learning_rates

    expected = []
    for attack in ("BadNets", "blended"):
        for model, defences in (("MMCL", ("RoCLIP", "SafeCLIP", "detect-drop-retrain")), ("MMCL+SSL", ("detect-drop-retrain",))):
            expected.append(os.path.join(workdir, attack, "pretrain", model))
            expected += [os.path.join(workdir, attack, "defended", model, defence) for defence in defences]
            expected += [os.path.join(workdir, attack, "clean", model, method, sweep_runs.run_name(experiment.cleaning_grid_entry(lr)))
                         for method in ("CleanCLIP", "PAR") for lr in lrs]
    assert list(train_fn.configs) == expected

    # Each attack's trigger in all of its runs; the rest of the poison section is the study's.
    for run_dir, config in train_fn.configs.items():
        blended = f"{os.sep}blended{os.sep}" in run_dir
        assert config.poison.trigger.to_dict() == (
            triggers.default_trigger_config("blended").to_dict() if blended else scaled.pretrain_base.poison.trigger.to_dict())
        assert config.poison.target_label == "banana"
    # Detect, drop, retrain: the retrain leaves out the top 10 % of the scored pairs (19 scored: 2,
    # the two highest scores) and keeps the undefended run's config otherwise.
    for model in ("MMCL", "MMCL+SSL"):
        retrain = train_fn.configs[os.path.join(workdir, "BadNets", "defended", model, "detect-drop-retrain")]
        drop_file = os.path.join(workdir, "BadNets", "detect", model, "dao", "dropped_0.1.json")
        assert retrain.train.exclude_indices_file == drop_file
        with open(drop_file) as f:
            assert json.load(f) == [18, 19]
        undefended = train_fn.configs[os.path.join(workdir, "BadNets", "pretrain", model)]
        assert retrain.to_dict() == {**undefended.to_dict(), "train": {**undefended.train.to_dict(), "exclude_indices_file": drop_file}}
    roclip = train_fn.configs[os.path.join(workdir, "BadNets", "defended", "MMCL", "RoCLIP")]
    assert roclip.epoch_passes.roclip.to_dict() == {"pool_size": 3, "every_epochs": 2}  # round(0.66 % of 480)
    safeclip = train_fn.configs[os.path.join(workdir, "BadNets", "defended", "MMCL", "SafeCLIP")]
    assert (safeclip.objective.mmcl_weight, safeclip.objective.safe_mmcl_weight, safeclip.objective.risky_ssl_weight) == (0.0, 1.0, 1.0)
    assert safeclip.epoch_passes.safeclip.inmodal_warmup_epochs == 1
    # Its one cross-modal warm-up epoch (the second) at the published constant rate.
    assert safeclip.optim.epoch_learning_rates.to_dict() == {1: 5e-6}

    # The report: per attack and objective, a row per defence, each from its own runs' epochs.
    assert list(zoo) == ["BadNets", "blended"] and list(zoo["blended"]) == ["MMCL", "MMCL+SSL"]
    rows = zoo["blended"]["MMCL"]["defences"]
    assert list(rows) == ["none", "RoCLIP", "SafeCLIP", "detect-drop-retrain", "CleanCLIP", "PAR"]
    assert list(zoo["blended"]["MMCL+SSL"]["defences"]) == ["none", "detect-drop-retrain", "CleanCLIP", "PAR"]
    top1 = 0.4 + 0.05 * epochs
    assert zoo["blended"]["MMCL"]["undefended"]["test_top1"] == pytest.approx(top1)
    assert rows["RoCLIP"]["model"] == {"top1": pytest.approx(top1), "asr": pytest.approx(0.2), "epoch": epochs,
                                        "run": os.path.join("defended", "MMCL", "RoCLIP"), "learning_rate": 1e-3}
    assert rows["detect-drop-retrain"]["model"]["asr"] == pytest.approx(0.3)
    assert rows["SafeCLIP"]["num_points"] == rows["none"]["num_points"] == epochs  # the step-0 evaluation left out
    # SafeCLIP's fake ASR (4 % less 10 for blended) is under 5 % at every epoch: its best is its last.
    assert rows["SafeCLIP"]["best_top1_with_asr_at_most_5pct"]["top1"] == pytest.approx(top1)
    assert rows["PAR"]["stage"] == "post-hoc" and rows["PAR"]["num_points"] == clean_epochs * len(lrs)
    assert zoo["BadNets"]["MMCL"]["detection"]["dao"]["auroc"] == 0.5
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f) == json.loads(json.dumps(zoo))
    for attack in zoo:  # and each attack's own study report
        assert os.path.exists(os.path.join(workdir, attack, "report.md"))
    assert [os.fspath(path) for path in plotted] == [os.path.join(workdir, name, "report.png") for name in ("BadNets", "blended", "")]

    # Run again: nothing trains, the same report comes back.
    again = FakeZooTrainFn()
    assert experiment.run_study(study, workdir, again) == zoo and again.configs == {}


def test_bad_attacks_and_defences_are_named():
    study = study_synthetic().get_config("zoo,smoke")
    with pytest.raises(ValueError, match=r"attack 'bad': trigger 'blended' has no options \['size'\]"):
        experiment.with_attack(study.pretrain_base, "bad", experiment.attack(trigger={"name": "blended", "size": 4}))
    with pytest.raises(ValueError, match=r"attack 'bad': unknown trigger 'blend'"):
        experiment.with_attack(study.pretrain_base, "bad", experiment.attack(trigger={"name": "blend"}))
    study.pretrain_defences["RoCLIP"].objectives = ("MMCL+SLL",)
    with pytest.raises(ValueError, match=r"pretrain_defences.RoCLIP.objectives names \['MMCL\+SLL'\]"):
        experiment.check_defences(study)
    study.pretrain_defences["RoCLIP"].objectives = ("MMCL",)
    study.pretrain_defences["detect-drop-retrain"].drop_share = 1.0
    with pytest.raises(ValueError, match=r"drop-retrain.drop_share must be in \(0, 1\)"):
        experiment.check_defences(study)


def test_default_study_has_no_attacks_or_defences():
    for arg in ("default", "smoke", "par,detect"):
        study = study_synthetic().get_config(arg)
        assert not study.attacks and not study.pretrain_defences
        assert experiment.defence_stages(study) == {name: "post-hoc" for name in study.cleaning_methods}


def test_cc3m_zoo_runs_the_published_configs():
    """configs/zoo_cc.py: each run is the CC3M config of its method (eval sets aside: the runner
    reads "test" and "selection"); PAR trains on the study's cleaning setting and grid."""
    config = lambda name: run_configs.load_config_file(os.path.join(CONFIGS, f"{name}.py"))  # noqa: E731
    study = experiment.apply_proportions(config("zoo_cc").get_config())
    experiment.check_defences(study)
    assert list(study.attacks) == ["BadNets", "blended"]

    def differences(ours, published):
        ours, published = ({k: v for k, v in run_configs.dotted(c).items() if not k.startswith("eval.")} for c in (ours, published))
        return {k: (ours.get(k), published.get(k)) for k in ours.keys() | published.keys() if ours.get(k) != published.get(k)}

    single = experiment.attack_study(study, "BadNets")
    pretrain = experiment.pretrain_configs(single, None)
    assert differences(pretrain["MMCL"], config("pretrain_cc").get_config("cc3m_mmcl")) == {}
    assert differences(pretrain["MMCL+SSL"], config("pretrain_cc").get_config("cc3m_mmcl_ssl")) == {}
    assert differences(experiment.defended_config(single, pretrain["MMCL"], "RoCLIP"), config("roclip").get_config("cc3m")) == {}
    safeclip = experiment.defended_config(single, pretrain["MMCL"], "SafeCLIP")
    assert differences(safeclip, config("pretrain_safeclip_cc").get_config("cc3m")) == {}
    assert sorted(safeclip.eval.sets) == ["selection", "test"] and safeclip.eval.selection_set == "selection"
    paths = {"train.init_from": ("/p", ""), "train.exclude_indices_file": ("/p/poison_indices.json", "")}
    clean_cc = config("clean_cc")
    cleanclip = experiment.clean_config(single, pretrain["MMCL"], "/p", "CleanCLIP", 5e-4)
    assert differences(cleanclip, clean_cc.get_config("cleanclip")) == paths and cleanclip.eval.at_start
    par = experiment.clean_config(single, pretrain["MMCL"], "/p", "PAR", 5e-4)
    published_only = {"train.num_epochs": (20, 2), "train.checkpoint_every_steps": (1000, 50), "data.batch_size": (64, 2048),
                      "optim.warmup_steps": (50, 0), "train.log_every_steps": (50, 10), "train.subset_size": (100_000, 250_000),
                      "optim.learning_rate": (5e-4, 3e-5)}
    assert differences(par, clean_cc.get_config("par")) == {**paths, **published_only}
    assert study.cleaning_learning_rates == clean_cc.LEARNING_RATES
    assert study.pretrain_defences["detect-drop-retrain"].drop_share == 0.1
