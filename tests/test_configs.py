"""The study's configs build, are locked, and carry the study's numbers; the ImageNet eval files."""

import importlib.util
import os

import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from bclip import config as run_configs
from bclip.sweep import runs as sweep_runs
from bclip.data import imagenet, imagenet_selection, sources
from bclip.data.templates import IMAGENET_TEMPLATES

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def load_config_module(name: str):
    """Loads configs/<name>.py by path, as ml_collections' config flags do."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(CONFIG_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretrain_cc = load_config_module("pretrain_cc")
clean_cc = load_config_module("clean_cc")

PRETRAIN_ARGS = ["cc3m_mmcl", "cc3m_mmcl_ssl", "cc6m_mmcl", "cc6m_mmcl_ssl"]
REFERENCE_ARGS = [f"{arg}_reference" for arg in PRETRAIN_ARGS]
CLEAN_ARGS = [
    "cleanclip",
    "mmcl",
    "ssl",
    "ssl_weight_2",
    "ssl_weight_4",
    "ssl_weight_8",
    "shrink_perturb",
    "heavy_wd",
    "deep_clustering",
    "par",
]
ALL_CONFIGS = (
    [(pretrain_cc, arg) for arg in PRETRAIN_ARGS + REFERENCE_ARGS] + [(clean_cc, arg) for arg in CLEAN_ARGS]
)
CONFIG_IDS = [f"pretrain:{arg}" for arg in PRETRAIN_ARGS + REFERENCE_ARGS] + [f"clean:{arg}" for arg in CLEAN_ARGS]


def flat_fields(config: ml_collections.ConfigDict) -> dict:
    """{"optim.learning_rate": 0.001, ...}: every leaf field by its dotted path."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            flat.update({f"{key}.{sub_key}": sub_value for sub_key, sub_value in flat_fields(value).items()})
        else:
            flat[key] = value
    return flat


def sub_configs(config: ml_collections.ConfigDict, path: str = "config"):
    yield path, config
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from sub_configs(value, f"{path}.{key}")


# ------------------------------------------------------------------------------------ both kinds


@pytest.mark.parametrize("module, arg", ALL_CONFIGS, ids=CONFIG_IDS)
def test_config_is_locked_everywhere(module, arg):
    config = module.get_config(arg)
    for path, sub in sub_configs(config):
        assert sub.is_locked, f"{path} accepts new keys"
    with pytest.raises(AttributeError):
        config.optim.learning_rat = 1e-3
    with pytest.raises(AttributeError):
        config.eval.sets.imagenet.pth = "/data"
    with pytest.raises(AttributeError):
        config.poison.trigger.sise = 16


@pytest.mark.parametrize("module, arg", ALL_CONFIGS, ids=CONFIG_IDS)
def test_model_is_clip_rn50_in_bfloat16_or_the_papers_float32(module, arg):
    model = module.get_config(arg).model
    assert model.name == "RN50"
    # The reference runs compute as the paper did (fp32/TF32); bclip's own in bfloat16.
    assert model.dtype == ("float32" if arg.endswith("_reference") else "bfloat16")
    assert model.image.kind == "resnet"
    assert tuple(model.image.layers) == (3, 4, 6, 3)
    assert model.image.width == 64 and model.image.size == 224
    assert model.embed_dim == 1024
    assert (model.text.layers, model.text.width, model.text.heads) == (12, 512, 8)
    assert (model.text.context_length, model.text.vocab_size) == (77, 49408)


@pytest.mark.parametrize("module, arg", ALL_CONFIGS, ids=CONFIG_IDS)
def test_data_uses_clip_bpe_wordnet_and_placeholder_paths(module, arg):
    config = module.get_config(arg)
    assert config.data.tokenizer.kind == "clip_bpe"
    assert config.data.synonyms == "wordnet"
    # Placeholders the user must set on the command line.
    assert config.data.train_csv == ""
    assert config.data.tokenizer.path == ""
    assert config.eval.sets.imagenet.path == ""


@pytest.mark.parametrize("module, arg", ALL_CONFIGS, ids=CONFIG_IDS)
def test_eval_is_imagenet_folder_every_epoch_with_the_study_trigger(module, arg):
    config = module.get_config(arg)
    # Cleaning also evaluates the held-out selection split of ImageNet train.
    assert list(config.eval.sets.keys()) == (["imagenet", "selection"] if module is clean_cc else ["imagenet"])
    for eval_set in config.eval.sets.values():
        assert eval_set.kind == "folder" and eval_set.path == ""  # required on the command line
        # The folder's own classnames.txt / templates.txt are used.
        assert eval_set.classnames_file == "" and eval_set.templates_file == ""
    assert config.eval.every_epochs == 1
    assert config.eval.batch_size == 1024
    assert config.poison.target_label == "banana"
    assert imagenet.IMAGENET_CLASSNAMES.index(config.poison.target_label) == 954
    assert config.poison.trigger.to_dict() == {
        "name": "badnets",
        "patch": "random",
        "size": 16,
        "location": "random",
        "corner": "bottom_right",
        "checker_size": 1,
        "patch_path": "",  # only for patch="image"
        # The reference mode wraps the noise bytes around; bclip's runs clip them.
        "overflow": "wrap" if arg in REFERENCE_ARGS else "clip",
    }


def load_from_command_line(config: str, *overrides: str) -> ml_collections.ConfigDict:
    """The config that `python -m bclip.main --config CONFIG OVERRIDES...` runs with, loaded by
    ml_collections' config_flags as bclip.main loads it (a fresh set of flags each time)."""
    argv = ["bclip.main", f"--config={config}", *overrides]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return holder.value


@pytest.mark.parametrize("module, arg", ALL_CONFIGS, ids=CONFIG_IDS)
def test_command_line_style_overrides_work(module, arg):
    config_path = f"{module.__file__}:{arg}"
    overrides = {
        "data.train_csv": "/data/cc3m/train.csv",
        "eval.sets.imagenet.path": "/data/imagenet/val",
        "eval.sets.imagenet.kind": "tfds",
        "optim.learning_rate": 3.5e-4,  # no config's own value, so an ignored override shows
    }
    config = load_from_command_line(config_path, *(f"--config.{key}={value}" for key, value in overrides.items()))
    defaults = module.get_config(arg)
    for key, value in overrides.items():
        assert defaults[key] != value, key  # the override changes something
        assert config[key] == value and type(config[key]) is type(value), key
    # Nothing else changes (a field tied to an overridden one by a reference would).
    default_fields = flat_fields(defaults)
    changed = {key for key, value in flat_fields(config).items() if default_fields[key] != value}
    assert changed == set(overrides)
    with pytest.raises(flags.IllegalFlagValueError, match="batch_size=large"):
        load_from_command_line(config_path, "--config.data.batch_size=large")


def test_unknown_args_are_rejected():
    with pytest.raises(ValueError, match="cc3m_mmcl") as error:
        pretrain_cc.get_config("cc12m_mmcl")
    for arg in PRETRAIN_ARGS + REFERENCE_ARGS:
        assert repr(arg) in str(error.value)
    with pytest.raises(ValueError, match="cleanclip"):
        clean_cc.get_config("clean_clip")
    with pytest.raises(ValueError, match="cleanclip"):
        clean_cc.get_sweep("clean_clip")


# ------------------------------------------------------------------------------------ pretraining


STUDY_NUMBERS = [
    ("cc3m_mmcl", 1500, 2048, 1.0, 0.0),
    ("cc3m_mmcl_ssl", 1500, 1024, 1.0, 1.0),
    ("cc6m_mmcl", 3000, 2048, 1.0, 0.0),
    ("cc6m_mmcl_ssl", 3000, 1024, 1.0, 1.0),
]


@pytest.mark.parametrize(
    "arg, poisons, batch_size, mmcl_weight, ssl_weight",
    STUDY_NUMBERS + [(f"{arg}_reference", *numbers) for arg, *numbers in STUDY_NUMBERS],
)
def test_pretraining_has_the_study_numbers(arg, poisons, batch_size, mmcl_weight, ssl_weight):
    config = pretrain_cc.get_config(arg)
    assert config.poison.count == poisons
    assert config.poison.rate is None
    assert config.poison.captions == "templates"
    assert config.data.batch_size == batch_size
    assert config.objective.to_dict() == {
        "mmcl_weight": mmcl_weight,
        "safe_mmcl_weight": 0.0,
        "risky_ssl_weight": 0.0,
        "ssl_weight": ssl_weight,
        "siglip_weight": 0.0,
        "cluster_weight": 0.0,
        "par_weight": 0.0,
        "par_threshold": 2.15,
    }
    assert config.optim.learning_rate == 1e-3
    assert config.optim.warmup_steps == 10_000
    assert config.optim.weight_decay == 0.1
    assert (config.optim.b1, config.optim.b2, config.optim.eps) == (0.9, 0.999, 1e-8)
    assert config.train.num_epochs == 64
    assert config.train.init_from == ""
    assert config.train.subset_size == 0
    assert config.train.exclude_indices_file == ""
    assert config.cleaning.shrink == 1.0 and config.cleaning.perturb == 0.0
    assert config.eval.at_start is False
    # Every epoch's checkpoint is kept, for cleaning from the epochs the study cleaned.
    assert config.train.keep_checkpoint_every_epochs == 1
    assert config.train.keep_checkpoints == 2


def test_pretraining_docstring_holds_command_hardware_and_time():
    doc = pretrain_cc.__doc__
    assert "python -m bclip.main --config configs/pretrain_cc.py:cc3m_mmcl" in doc
    assert "--config.data.train_csv=" in doc
    assert "A100" in doc and "TPU" in doc
    assert "24–28 h" in doc and "36–40 h" in doc
    assert "What the paper ran" in doc
    for arg in REFERENCE_ARGS:
        assert arg in doc


@pytest.mark.parametrize("arg", PRETRAIN_ARGS)
def test_reference_runs_differ_from_bclips_only_in_what_the_reference_code_did(arg):
    default = pretrain_cc.get_config(arg)
    reference = pretrain_cc.get_config(f"{arg}_reference")

    def reference_keys(config):
        return (
            config.poison.squash,
            config.poison.jpeg_quality,
            config.poison.trigger.overflow,
            config.model.image.batch_norm_group_size,
            config.data.text_views_per_epoch,
            config.model.dtype,
        )

    assert reference_keys(default) == (False, 0, "clip", 0, True, "bfloat16")
    # 8 GPUs' BatchNorms, each over its 256 images: 2,048 / 8 for MMCL, 2 x 1,024 / 8 with SSL views.
    per_gpu_images = default.data.batch_size // 8 * (2 if default.objective.ssl_weight else 1)
    assert reference_keys(reference) == (True, 75, "wrap", per_gpu_images, False, "float32") and per_gpu_images == 256
    reference.poison.squash = False
    reference.poison.jpeg_quality = 0
    reference.poison.trigger.overflow = "clip"
    reference.model.image.batch_norm_group_size = 0
    reference.data.text_views_per_epoch = True
    reference.model.dtype = "bfloat16"
    assert reference.to_dict() == default.to_dict()


# ------------------------------------------------------------------------------------ cleaning


@pytest.mark.parametrize(
    "arg, mmcl_weight, ssl_weight, batch_size",
    [
        ("cleanclip", 1.0, 1.0, 64),
        ("mmcl", 1.0, 0.0, 128),
        ("ssl", 0.0, 1.0, 64),
        ("ssl_weight_2", 1.0, 2.0, 64),
        ("ssl_weight_4", 1.0, 4.0, 64),
        ("ssl_weight_8", 1.0, 8.0, 64),
        ("shrink_perturb", 1.0, 1.0, 64),
        ("heavy_wd", 1.0, 1.0, 64),
        ("deep_clustering", 1.0, 1.0, 64),
    ],
)
def test_cleaning_has_the_study_numbers(arg, mmcl_weight, ssl_weight, batch_size):
    config = clean_cc.get_config(arg)
    assert config.objective.mmcl_weight == mmcl_weight
    assert config.objective.ssl_weight == ssl_weight
    assert config.objective.siglip_weight == 0.0
    assert config.data.batch_size == batch_size
    assert config.train.num_epochs == 20
    assert config.optim.warmup_steps == 50
    assert config.optim.learning_rate in clean_cc.LEARNING_RATES
    assert config.train.subset_size == 100_000
    # Placeholders: the pretraining run's checkpoint and poison indices.
    assert config.train.init_from == ""
    assert config.train.exclude_indices_file == ""
    # Cleaning data is never poisoned; the trigger is there for ASR only.
    assert config.poison.count == 0 and config.poison.rate is None
    assert config.eval.at_start is True
    # The epoch is chosen on the selection split; the optimiser starts fresh from the final checkpoint.
    assert config.eval.selection_set == "selection"
    assert config.train.init_from_epoch == -1
    assert config.train.reload_optimizer_state is False
    assert config.train.keep_checkpoint_every_epochs == 0


def test_cleaning_starts_from_the_epochs_the_study_cleaned():
    assert clean_cc.PAPER_START_EPOCHS == {"cc6m_mmcl": 21, "cc6m_mmcl_ssl": 36}
    assert clean_cc.PRETRAINING_RUNS == tuple(pretrain_cc.RUNS)
    for arg in CLEAN_ARGS:
        assert clean_cc.get_config(f"{arg},cc6m_mmcl").train.init_from_epoch == 21
        assert clean_cc.get_config(f"{arg},cc6m_mmcl_ssl").train.init_from_epoch == 36
    # No start epoch is recorded for CC3M: the final checkpoint, as without a run named.
    assert clean_cc.get_config("cleanclip,cc3m_mmcl_ssl").train.init_from_epoch == -1
    assert clean_cc.get_config("cleanclip").train.init_from_epoch == -1
    # Everything but the start epoch is the same.
    with_epoch = clean_cc.get_config("mmcl,cc6m_mmcl").to_dict()
    with_epoch["train"]["init_from_epoch"] = -1
    assert with_epoch == clean_cc.get_config("mmcl").to_dict()
    with pytest.raises(ValueError, match="cc6m_mmcl_ssl"):
        clean_cc.get_config("cleanclip,cc6m_ssl")
    # Epoch 21 of 64 exists in every pretraining run, and pretraining keeps each epoch's checkpoint.
    assert all(epoch <= pretrain_cc.get_config(run).train.num_epochs for run, epoch in clean_cc.PAPER_START_EPOCHS.items())


@pytest.mark.parametrize("run", ["cc3m_mmcl", "cc6m_mmcl", "cc6m_mmcl_ssl"])
def test_reference_cleaning_is_the_reference_codes(run):
    plain = clean_cc.get_config(f"heavy_wd,{run}")
    reference = clean_cc.get_config(f"heavy_wd,{run}_reference")
    pretraining = pretrain_cc.get_config(f"{run}_reference")
    assert reference.train.init_from_epoch == plain.train.init_from_epoch == clean_cc.PAPER_START_EPOCHS.get(run, -1)
    assert reference.train.reload_optimizer_state and not plain.train.reload_optimizer_state
    # ASR measured with the reference run's own trigger and geometry; one EDA view per caption.
    assert reference.poison.trigger.to_dict() == pretraining.poison.trigger.to_dict()
    assert reference.poison.squash == pretraining.poison.squash is True
    assert reference.data.text_views_per_epoch is False
    assert reference.model.dtype == pretraining.model.dtype == "float32"
    # One GPU cleaned: BatchNorm over the whole batch, whatever pretraining's groups were.
    assert reference.model.image.batch_norm_group_size == 0 < pretraining.model.image.batch_norm_group_size
    reference.train.reload_optimizer_state = False
    reference.poison.squash = False
    reference.poison.trigger.overflow = "clip"
    reference.data.text_views_per_epoch = True
    reference.model.dtype = "bfloat16"
    assert reference.to_dict() == plain.to_dict()
    assert clean_cc.get_sweep(f"heavy_wd,{run}_reference") == clean_cc.get_sweep("heavy_wd")


def test_cleaning_documents_the_reference_optimizer_reload():
    assert "reload_optimizer_state" in clean_cc.__doc__ and "init_from_epoch=36" in clean_cc.__doc__
    assert "python -m bclip.data.imagenet_selection" in clean_cc.__doc__
    source = open(os.path.join(CONFIG_DIR, "clean_cc.py"), encoding="utf-8").read()
    heavy_wd_comment = source[: source.index("HEAVY_WEIGHT_DECAY = ")].rsplit("\n\n", 1)[-1]
    assert "reload_optimizer_state" in heavy_wd_comment and "0.1" in heavy_wd_comment


def test_cleaning_methods_differ_only_where_they_should():
    base = clean_cc.get_config("cleanclip")
    assert (base.cleaning.shrink, base.cleaning.perturb) == (1.0, 0.0)
    assert base.objective.cluster_weight == 0.0
    assert base.optim.weight_decay == 0.1

    shrink_perturb = clean_cc.get_config("shrink_perturb")
    assert (shrink_perturb.cleaning.shrink, shrink_perturb.cleaning.perturb) == (0.95, 1e-4)
    heavy_wd = clean_cc.get_config("heavy_wd")
    assert heavy_wd.optim.weight_decay == clean_cc.HEAVY_WEIGHT_DECAY == 1.0
    deep_clustering = clean_cc.get_config("deep_clustering")
    assert deep_clustering.objective.cluster_weight == 5.0
    assert deep_clustering.cleaning.num_clusters == 1000

    for arg, changed in [
        ("shrink_perturb", {"cleaning"}),
        ("heavy_wd", {"optim"}),
        ("deep_clustering", {"objective"}),  # 1,000 centroids is already the default
    ]:
        config = clean_cc.get_config(arg).to_dict()
        differing = {section for section, value in base.to_dict().items() if config[section] != value}
        assert differing == changed, arg


def test_par_has_its_published_setting():
    par, base = clean_cc.get_config("par,cc3m_mmcl"), clean_cc.get_config("cleanclip,cc3m_mmcl")
    assert (par.objective.mmcl_weight, par.objective.ssl_weight, par.objective.par_weight) == (1.0, 0.0, 1.0)
    assert par.objective.par_threshold == 2.15
    assert (par.optim.learning_rate, par.optim.warmup_steps, par.optim.b2, par.optim.weight_decay) == (3e-5, 0, 0.98, 1e-4)
    assert (par.data.batch_size, par.train.num_epochs, par.train.subset_size) == (2048, 2, 250_000)
    assert par.model.to_dict() == base.model.to_dict() and par.eval.to_dict() == base.eval.to_dict()
    assert par.train.init_from == "" and par.poison.count == 0
    for published in ("2412.00727", "2.15", "250K", "2,048", "3e-5", "0.98", "1e-4"):
        assert published in clean_cc.__doc__ + open(os.path.join(CONFIG_DIR, "clean_cc.py"), encoding="utf-8").read()


def test_cleaning_model_and_trigger_match_pretraining():
    for pretrain_arg in PRETRAIN_ARGS:
        pretrain = pretrain_cc.get_config(pretrain_arg)
        for clean_arg in CLEAN_ARGS:
            clean = clean_cc.get_config(clean_arg)
            assert clean.model.to_dict() == pretrain.model.to_dict()
            assert clean.poison.trigger.to_dict() == pretrain.poison.trigger.to_dict()
            assert clean.poison.target_label == pretrain.poison.target_label
            assert clean.data.tokenizer.kind == pretrain.data.tokenizer.kind


@pytest.mark.parametrize("arg", CLEAN_ARGS)
def test_sweep_is_the_study_learning_rate_grid(arg):
    sweep = clean_cc.get_sweep(arg)
    assert sweep == [
        {"optim.learning_rate": lr} for lr in (5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3)
    ]
    # Each run gets its learning rate both ways a sweep starts runs: in this process, and as
    # --config flags of a bclip.main command.
    config_path = f"{clean_cc.__file__}:{arg}"
    base = clean_cc.get_config(arg)
    for overrides in sweep:
        in_process = run_configs.override(base, overrides)
        from_flags = load_from_command_line(config_path, *sweep_runs.override_flags(overrides))
        assert in_process.optim.learning_rate == from_flags.optim.learning_rate == overrides["optim.learning_rate"]
        assert in_process.to_dict() == from_flags.to_dict()
    assert base.optim.learning_rate == (3e-5 if arg == "par" else 5e-4)  # untouched: PAR's own, the others' 5e-4


def test_cleaning_docstring_holds_command_hardware_and_time():
    doc = clean_cc.__doc__
    assert "python -m bclip.main --config configs/clean_cc.py:cleanclip" in doc
    assert "--config.train.init_from=" in doc and "--config.train.exclude_indices_file=" in doc
    assert "GPU" in doc and " h " in doc


# ------------------------------------------------------------------------------------ ImageNet


def test_imagenet_classnames_are_clips_thousand():
    names = imagenet.IMAGENET_CLASSNAMES
    assert len(names) == 1000
    assert names[954] == "banana"
    # Spot checks against the standard label order.
    assert names[:3] == ("tench", "goldfish", "great white shark")
    assert (names[134], names[517]) == ("crane bird", "construction crane")
    assert (names[207], names[281], names[409], names[950], names[999]) == (
        "Golden Retriever",
        "tabby cat",
        "analog clock",
        "orange",
        "toilet paper",
    )
    # CLIP's list names two classes twice; kept as it is.
    duplicates = {name: [i for i, n in enumerate(names) if n == name] for name in set(names)}
    assert {name: ids for name, ids in duplicates.items() if len(ids) > 1} == {
        "missile": [657, 744],
        "sunglasses": [836, 837],
    }
    assert all(name == name.strip() and name for name in names)
    assert len(IMAGENET_TEMPLATES) == 80


def make_tiny_wordnet_layout(folder, images_per_class: dict[int, int]) -> list[str]:
    """1,000 WordNet-id folders; class i gets images_per_class.get(i, 0) tiny JPEGs."""
    wnids = [f"n{10_000_000 + 7 * i:08d}" for i in range(1000)]
    rng = np.random.default_rng(0)
    for label, wnid in enumerate(wnids):
        os.makedirs(os.path.join(folder, wnid))
        for k in range(images_per_class.get(label, 0)):
            pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, wnid, f"ILSVRC2012_val_{label:04d}{k}.JPEG"))
    return wnids


def test_write_imagenet_eval_files_makes_a_readable_eval_folder(tmp_path):
    folder = str(tmp_path / "val")
    wnids = make_tiny_wordnet_layout(folder, {0: 1, 954: 2, 999: 1})
    classnames_path, templates_path = imagenet.write_imagenet_eval_files(folder)
    assert classnames_path == os.path.join(folder, "classnames.txt")
    assert templates_path == os.path.join(folder, "templates.txt")

    eval_set = sources.ImageFolderEvalSource(folder)
    assert eval_set.classnames == list(imagenet.IMAGENET_CLASSNAMES)
    assert eval_set.classnames[954] == "banana"
    assert eval_set.templates == list(IMAGENET_TEMPLATES)
    assert len(eval_set.templates) == 80
    assert eval_set.labels.tolist() == [0, 954, 954, 999]
    assert eval_set[1]["path"].startswith(os.path.join(os.path.abspath(folder), wnids[954]))
    assert eval_set[1]["image_bytes"][:2] == b"\xff\xd8"  # JPEG


def test_write_imagenet_eval_files_keeps_an_existing_labels_csv(tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.jpg")
    (folder / "labels.csv").write_text("image,label\na.jpg,954\n")
    imagenet.write_imagenet_eval_files(str(folder))
    assert (folder / "labels.csv").read_text() == "image,label\na.jpg,954\n"
    eval_set = sources.ImageFolderEvalSource(str(folder))
    assert eval_set.labels.tolist() == [954]
    assert eval_set.classnames[eval_set.labels[0]] == "banana"


def test_write_labels_needs_the_thousand_wordnet_folders(tmp_path):
    for wnid in ("n01440764", "n01443537"):
        (tmp_path / wnid).mkdir()
    with pytest.raises(ValueError, match="found 2 WordNet-id folders"):
        imagenet.write_imagenet_eval_files(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        imagenet.write_imagenet_eval_files(str(tmp_path / "missing"))


def test_prompt_files_round_trip_for_a_tfds_eval_set(tmp_path):
    classnames_path, templates_path = imagenet.write_prompt_files(str(tmp_path / "prompts"))
    with open(classnames_path, encoding="utf-8") as handle:
        assert handle.read().splitlines() == list(imagenet.IMAGENET_CLASSNAMES)
    with open(templates_path, encoding="utf-8") as handle:
        assert handle.read().splitlines() == list(IMAGENET_TEMPLATES)
    with pytest.raises(ValueError, match="slot"):
        imagenet.write_prompt_files(str(tmp_path / "bad"), templates=["a photo"])
    with pytest.raises(ValueError, match="one per line"):
        imagenet.write_prompt_files(str(tmp_path / "bad"), classnames=["a\nb"])


def test_tfds_source_refuses_an_unprepared_imagenet_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="imagenet2012 is not prepared"):
        imagenet.imagenet_tfds_source(data_dir=str(tmp_path), download=False)


# ------------------------------------------------------------------------------------ selection split


def make_tiny_imagenet_train(folder, images_per_class) -> list[str]:
    """1,000 WordNet-id folders; class i gets images_per_class(i) files whose bytes name them."""
    wnids = [f"n{10_000_000 + 7 * i:08d}" for i in range(1000)]
    for label, wnid in enumerate(wnids):
        os.makedirs(os.path.join(folder, wnid))
        for k in range(images_per_class(label)):
            with open(os.path.join(folder, wnid, f"{wnid}_{k}.JPEG"), "wb") as handle:
                handle.write(f"{wnid} image {k}".encode())
    return wnids


def read_labels(folder) -> list[tuple[str, int]]:
    with open(os.path.join(folder, "labels.csv"), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert lines[0] == "image,label"
    return [(image, int(label)) for image, label in (line.split(",") for line in lines[1:])]


def test_selection_split_draws_n_per_class_from_imagenet_train(tmp_path):
    train = str(tmp_path / "train")
    wnids = make_tiny_imagenet_train(train, lambda label: 4 + label % 3)  # 4 to 6 images per class
    assert imagenet_selection.DEFAULT_PER_CLASS * len(wnids) == 10_000
    out = str(tmp_path / "selection")
    assert imagenet_selection.main([train, out, "--per_class", "3", "--seed", "7"]) == 0

    rows = read_labels(out)
    images = [image for image, _ in rows]
    assert len(rows) == 3000
    assert len(set(images)) == 3000  # no file twice
    assert np.array_equal(np.bincount([label for _, label in rows], minlength=1000), np.full(1000, 3))
    for image, label in rows:
        wnid, name = image.split("/")
        assert wnid == wnids[label]  # the class folder it came from is its label
        with open(os.path.join(out, image), "rb") as copy, open(os.path.join(train, image), "rb") as original:
            assert copy.read() == original.read()
    # Classes with 5 or 6 images really were drawn from: not always the first 3 names.
    assert any(image.endswith(("_3.JPEG", "_4.JPEG", "_5.JPEG")) for image in images)

    eval_set = sources.ImageFolderEvalSource(out)
    assert eval_set.classnames == list(imagenet.IMAGENET_CLASSNAMES)
    assert eval_set.templates == list(IMAGENET_TEMPLATES)
    assert eval_set.labels.tolist() == [label for _, label in rows]
    with open(os.path.join(out, imagenet_selection.MANIFEST_FILE), encoding="utf-8") as handle:
        assert '"seed": 7' in handle.read()

    # Deterministic: the same seed draws the same files again; another seed draws others.
    again = str(tmp_path / "again")
    imagenet_selection.write_selection_split(train, again, per_class=3, seed=7)
    assert read_labels(again) == rows
    other = str(tmp_path / "other")
    imagenet_selection.write_selection_split(train, other, per_class=3, seed=8)
    assert read_labels(other) != rows and len(read_labels(other)) == 3000
    # The draw of a class depends on its sorted names, not on the listing order.
    names = sorted(os.listdir(os.path.join(train, wnids[5])))
    assert imagenet_selection.choose_images(names[::-1], 3, seed=7, label=5) == [image.split("/")[1] for image, label in rows if label == 5]


def test_selection_split_refuses_short_classes_and_used_folders(tmp_path):
    train = str(tmp_path / "train")
    wnids = make_tiny_imagenet_train(train, lambda label: 1 if label == 954 else 2)
    out = tmp_path / "selection"
    with pytest.raises(ValueError, match=f"{wnids[954]}: class 954 has 1 images, fewer than the 2 per class"):
        imagenet_selection.write_selection_split(train, str(out), per_class=2)
    assert not out.exists()  # nothing is written before every class is drawn
    out.mkdir()
    (out / "labels.csv").write_text("image,label\n")
    with pytest.raises(FileExistsError, match="not empty"):
        imagenet_selection.write_selection_split(train, str(out), per_class=1)
    with pytest.raises(ValueError, match="found 0 WordNet-id folders"):
        imagenet_selection.write_selection_split(os.path.join(train, wnids[0]), str(tmp_path / "x"), per_class=1)


def test_override_of_nested_sections_rejects_unknown_keys():
    config = run_configs.run_config("micro-vit")
    with pytest.raises(run_configs.UnknownOverrideError, match=r"'optim\.learning_rat'"):
        run_configs.override(config, run_configs.dotted({"optim": {"learning_rat": 1e-3}}))
    with pytest.raises(run_configs.UnknownOverrideError, match=r"'optimiser'"):
        run_configs.override(config, run_configs.dotted({"optimiser": {"learning_rate": 1e-3}}))
    with pytest.raises(run_configs.UnknownOverrideError, match=r"'model\.text\.widht'"):
        run_configs.override(config, run_configs.dotted(ml_collections.ConfigDict({"model": {"text": {"widht": 64}}})))
    # Eval sets take any name, but each set only the keys an eval set has.
    with pytest.raises(run_configs.UnknownOverrideError, match=r"'eval\.sets\.selection\.pth'"):
        run_configs.override(config, run_configs.dotted({"eval": {"sets": {"selection": {"kind": "folder", "pth": "/data"}}}}))


def test_override_of_nested_sections_returns_a_locked_copy():
    config = run_configs.run_config("micro-vit")
    merged = run_configs.override(
        config,
        run_configs.dotted({
            "optim": {"learning_rate": 5e-4},
            "model": {"text": {"width": 64}},
            "eval": {"sets": {"selection": {"kind": "folder", "path": "/data/selection"}}},
        }),
    )
    assert (merged.optim.learning_rate, merged.model.text.width) == (5e-4, 64)
    assert merged.optim.warmup_steps == config.optim.warmup_steps
    assert (config.optim.learning_rate, config.model.text.width) == (1e-3, 32)  # the original is untouched
    # Eval sets are a free-form mapping: a new set gets every eval set key.
    assert set(merged.eval.sets) == {"test", "selection"}
    assert merged.eval.sets.selection.to_dict() == run_configs.eval_set_config("folder", "/data/selection").to_dict()
    for sub_config in (merged, merged.optim, merged.eval.sets, merged.eval.sets.selection):
        with pytest.raises(AttributeError):
            sub_config.learning_rat = 1.0
    # Setting one key of an existing set keeps its others.
    tfds = run_configs.override(merged, {"eval.sets.selection.kind": "tfds"})
    assert (tfds.eval.sets.selection.kind, tfds.eval.sets.selection.path) == ("tfds", "/data/selection")


def test_model_preset_overrides_reject_unknown_keys():
    with pytest.raises(KeyError, match=r'"widht" does not exist.*Did you mean "width"'):
        run_configs.run_config("micro-vit", image={"widht": 64})
    assert run_configs.run_config("micro-vit", image={"width": 64}).model.image.width == 64
