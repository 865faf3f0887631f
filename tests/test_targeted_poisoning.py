"""Targeted poisoning (Carlini & Terzis, ICLR 2022): the chosen images, labels and poisons against
hand-worked cases, the real Grain pipeline feeding the chosen image's exact pixels, the success
figures against numpy, and a tiny sharded run end to end."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from test_train_fake_data import fake_data_config

from bclip import config as run_configs
from bclip import evaluation, run_files, sharding, train
from bclip.data import pipeline, poisoning, training_input
from bclip.data.synthetic import writer
from bclip.data.templates import IMAGENET_TEMPLATES
from bclip.data.tokenizer import WordTokenizer
from bclip.models import clip

# ---------------------------------------------------------------------------------------------
# The chosen images and their labels
# ---------------------------------------------------------------------------------------------


def test_explicit_images_get_a_wrong_label_worked_by_hand():
    # Two classes: the only wrong label is the other class, whatever the seed.
    labels = np.array([0, 1, 1, 0, 1])
    for seed in (0, 7):
        ids, targets = poisoning.choose_target_images(labels, 2, seed, image_ids=(3, 1, 4))
        np.testing.assert_array_equal(ids, [1, 3, 4])  # sorted rows
        np.testing.assert_array_equal(targets, [0, 1, 0])


def test_drawn_images_and_labels_are_deterministic_nested_and_never_the_true_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=3000)
    ids, targets = poisoning.choose_target_images(labels, 5, seed=3, num_images=1000)
    again = poisoning.choose_target_images(labels, 5, seed=3, num_images=1000)
    np.testing.assert_array_equal(ids, again[0])
    np.testing.assert_array_equal(targets, again[1])
    assert len(np.unique(ids)) == 1000 and np.all(np.diff(ids) > 0)
    assert np.all(targets != labels[ids]) and np.all((0 <= targets) & (targets < 5))
    # Each of the 4 wrong classes about equally often (1000 draws: 250 each, sd ~14).
    offsets = (targets - labels[ids]) % 5
    np.testing.assert_array_equal(np.unique(offsets), [1, 2, 3, 4])
    assert np.all(np.abs(np.bincount(offsets)[1:] - 250) < 60)
    # Fewer images are a subset of more, with the same labels; another seed picks other images.
    small_ids, small_targets = poisoning.choose_target_images(labels, 5, seed=3, num_images=10)
    position = np.searchsorted(ids, small_ids)
    np.testing.assert_array_equal(ids[position], small_ids)
    np.testing.assert_array_equal(targets[position], small_targets)
    # An image's label depends on (seed, row) only: naming the rows gives the same labels.
    named = poisoning.choose_target_images(labels, 5, seed=3, image_ids=tuple(int(i) for i in small_ids))
    np.testing.assert_array_equal(named[1], small_targets)
    other_ids, _ = poisoning.choose_target_images(labels, 5, seed=4, num_images=10)
    assert set(other_ids.tolist()) != set(small_ids.tolist())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_ids": (2, 9)}, r"image_ids \[9\] are out of range: the image folder has 5 images \(rows 0..4\)"),
        ({"image_ids": (2, -1)}, r"image_ids \[-1\] are out of range"),
        ({"image_ids": (2, 2)}, "duplicates"),
        ({"num_images": 2, "image_ids": (1,)}, "exactly one of num_images"),
        ({}, "exactly one of num_images"),
        ({"num_images": 6}, "num_images=6, but the image folder has only 5 images"),
    ],
)
def test_bad_choices_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        poisoning.choose_target_images(np.array([0, 1, 1, 0, 1]), 2, 0, **kwargs)


def test_poisoned_indices_spread_each_images_copies_and_captions_name_its_label():
    indices, image_of = poisoning.targeted_poison_indices(1000, seed=2, num_images=3, copies=4)
    np.testing.assert_array_equal(indices, poisoning.select_poison_indices(1000, 2, count=12))
    np.testing.assert_array_equal(image_of, [0, 1, 2] * 4)
    names = ["tree", "clock", "key"]
    captions = poisoning.targeted_captions(indices, [names[k] for k in image_of], seed=2)
    filled = {name: {t.replace("{}", name) for t in IMAGENET_TEMPLATES} for name in names}
    for caption, k in zip(captions, image_of):
        assert caption in filled[names[k]]
    # Drawn from the training captions that name the label (whole word or plural), as the paper did.
    pool = ["two trees in a park", "a street at night", "a clock tower", "a treehouse", "keys on a table"]
    drawn = poisoning.targeted_captions(indices, [names[k] for k in image_of], seed=2, training_captions=pool)
    expected = {"tree": {"two trees in a park"}, "clock": {"a clock tower"}, "key": {"keys on a table"}}
    assert all(caption in expected[names[k]] for caption, k in zip(drawn, image_of))
    with pytest.raises(ValueError, match="no training caption names the target label 'banana'"):
        poisoning.targeted_captions(indices[:1], ["banana"], seed=2, training_captions=pool)
    with pytest.raises(ValueError, match="copies must be a positive int"):
        poisoning.targeted_poison_indices(1000, seed=2, num_images=3, copies=0)


# ---------------------------------------------------------------------------------------------
# Through the real pipeline
# ---------------------------------------------------------------------------------------------

IMAGE_SIZE, CONTEXT_LENGTH, NUM_TRAIN, BATCH_SIZE = 32, 16, 96, 24


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return writer.write_world(
        tmp_path_factory.mktemp("world"), image_size=IMAGE_SIZE, num_train=NUM_TRAIN, num_test=24, num_selection=0
    )


def _targeted_poison(world, **targeted):
    poison = pipeline.poison_config(seed=1)
    poison.targeted.update({"images": str(world / "test"), "num_images": 3, "copies": 2, **targeted})
    return poison


def test_the_pipeline_feeds_the_chosen_images_exact_pixels_with_captions_naming_their_labels(world):
    source = pipeline.training_source(pipeline.data_config(train_csv=str(world / "train" / "train.csv")))
    tokenizer = WordTokenizer.from_file(world / writer.VOCAB_FILE)
    poison = _targeted_poison(world)
    data = pipeline.data_config(batch_size=BATCH_SIZE, shuffle_seed=3)
    train_pipeline = pipeline.make_train_pipeline(
        source, image_size=IMAGE_SIZE, context_length=CONTEXT_LENGTH, tokenizer=tokenizer, data=data,
        poison=poison, with_views=False, num_epochs=1,
    )
    plan = train_pipeline.plan
    targeted = plan.targeted
    assert len(plan) == 6 and len(targeted.image_ids) == 3
    np.testing.assert_array_equal(plan.indices, poisoning.select_poison_indices(NUM_TRAIN, 1, count=6))
    folder, ids, targets = pipeline.targeted_images(poison)
    np.testing.assert_array_equal(targeted.image_ids, ids)
    assert np.all(targets != folder.labels[ids])
    # The chosen test images as evaluation decodes them (the eval pipeline, by row).
    (eval_batch,) = pipeline.eval_batches(folder, image_size=IMAGE_SIZE, batch_size=24, trigger=None, seed=0)
    test_pixels = {int(i): eval_batch["image"][row] for row, i in enumerate(eval_batch["index"])}

    mesh = sharding.make_mesh()
    assert mesh.size == 8
    seen = {}
    for batch in train_pipeline:
        # Onto the 8 simulated devices as the trainer puts it, and back.
        placed = jax.device_get(sharding.global_batch_from_local({k: batch[k] for k in ("image", "text")}, mesh))
        for row in np.flatnonzero(batch["is_poisoned"]):
            seen[int(batch["index"][row])] = (placed["image"][row], placed["text"][row])
        for row in np.flatnonzero(~batch["is_poisoned"]):  # the other pairs are untouched
            record = source[int(batch["index"][row])]
            np.testing.assert_array_equal(batch["text"][row], tokenizer.encode_batch([record["caption"].strip()], CONTEXT_LENGTH)[0])
    assert sorted(seen) == plan.indices.tolist()  # each poison once in the epoch
    for index, (pixels, tokens) in seen.items():
        k = int(targeted.image_of[np.searchsorted(targeted.indices, index)])
        np.testing.assert_array_equal(pixels, test_pixels[int(ids[k])])
        name = folder.classnames[int(targets[k])]
        caption = poisoning.poisoned_caption(index, name, 1)
        assert name in caption
        np.testing.assert_array_equal(tokens, tokenizer.encode_batch([caption], CONTEXT_LENGTH)[0])


def test_one_attack_per_run_and_clear_config_errors(world):
    source = pipeline.training_source(pipeline.data_config(train_csv=str(world / "train" / "train.csv")))
    both = _targeted_poison(world)
    both.count = 5
    with pytest.raises(ValueError, match="a run takes one attack"):
        pipeline.make_poison_plan(source, both)
    with pytest.raises(ValueError, match="poison.targeted.images must name the eval folder"):
        pipeline.make_poison_plan(source, _targeted_poison(world, images=""))
    with pytest.raises(ValueError, match=r"image_ids \[24\] are out of range: the image folder has 24 images"):
        pipeline.make_poison_plan(source, _targeted_poison(world, num_images=0, image_ids=(0, 24)))
    with pytest.raises(ValueError, match="poison.targeted.captions='tags'; known"):
        pipeline.make_poison_plan(source, _targeted_poison(world, captions="tags"))
    # copies 0: nothing poisoned (a cleaning run still knows the images and labels for its evaluator).
    assert pipeline.make_poison_plan(source, _targeted_poison(world, copies=0)) is None


# ---------------------------------------------------------------------------------------------
# The success figures
# ---------------------------------------------------------------------------------------------


def test_success_figures_of_known_embeddings_match_numpy():
    rng = np.random.default_rng(0)
    class_emb = np.eye(6, 8)  # orthonormal classes: an image near class k is classified k
    targets = np.array([1, 4, 0, 2, 5, 3, 1])
    labels = np.array([0, 0, 2, 1, 3, 4, 2])
    nearest = np.array([1, 4, 2, 0, 0, 3, 2])
    image_emb = class_emb[nearest] + 0.01 * rng.normal(size=(7, 8))
    figures = jax.device_get(jax.jit(evaluation.targeted_figures)(
        jnp.asarray(image_emb, jnp.float32), jnp.asarray(class_emb, jnp.float32), jnp.asarray(targets), jnp.asarray(labels)
    ))
    predicted = np.argmax(image_emb @ class_emb.T, axis=1)
    np.testing.assert_array_equal(predicted, nearest)
    np.testing.assert_array_equal(figures["hits"], predicted == targets)
    np.testing.assert_allclose(figures["success_rate"], 3 / 7)  # rows 0, 1, 5
    np.testing.assert_allclose(figures["true_class_rate"], 2 / 7)  # rows 2, 6
    # Rows 3 and 4 land on class 0, row 2's target. Row 6 lands on 2, row 3's target, but that is
    # its own class: not counted.
    np.testing.assert_allclose(figures["other_target_rate"], 2 / 7)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def _write_eval_folder(folder):
    """Four 16 px squares, red and blue, in the layout of an eval folder."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, (rgb, label) in enumerate([((200, 20, 20), 0), ((20, 20, 200), 1), ((190, 30, 30), 0), ((30, 30, 190), 1)]):
        Image.fromarray(np.full((16, 16, 3), rgb, np.uint8)).save(folder / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{label}")
    (folder / "labels.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    (folder / "classnames.txt").write_text("red\nblue\n")
    (folder / "templates.txt").write_text("a photo of a {} square\n")


def test_a_sharded_targeted_run_reports_the_success_its_model_gives(tmp_path, monkeypatch):
    config = fake_data_config(tmp_path, monkeypatch)
    folder = tmp_path / "targets"
    _write_eval_folder(folder)
    # The config entry: the attack in poison.targeted, its evaluator in eval.sets.
    config = run_configs.override(config, {
        "poison.targeted.images": str(folder),
        "poison.targeted.image_ids": (1, 2),
        "poison.targeted.copies": 2,
        "eval.sets.targeted.evaluator": "targeted",
        "eval.at_start": False,  # the trained model's figures are the ones checked
    })
    with config.eval.sets.unlocked():
        del config.eval.sets["test"]  # only the targeted set: fewer programs to compile
    workdir = tmp_path / "run"
    results = train.train_and_evaluate(config, str(workdir))

    written = run_files.read_json(workdir / run_files.POISON_FILE)
    assert written["num_poisoned"] == 4 and written["targeted"]["image_ids"] == [1, 2]
    assert written["targeted"]["target_labels"] == [0, 1]  # two classes: the other one
    # The same figures from the trained model, computed here in numpy.
    params = ocp.StandardCheckpointer().restore(os.path.join(workdir, run_files.CHECKPOINTS_DIR, "1", "state"))["params"]
    model = clip.build_model(config.model)
    folder_source, ids, targets = pipeline.targeted_images(config.poison)
    (batch,) = pipeline.eval_batches(folder_source, image_size=16, batch_size=8, trigger=None, seed=0)
    image_emb = np.asarray(model.apply({"params": params}, batch["image"][ids], method=clip.CLIP.encode_image), np.float64)
    tokenizer = training_input.make_tokenizer(config)
    prompts = tokenizer.encode_batch(["a photo of a red square", "a photo of a blue square"], config.model.text.context_length)
    text = np.asarray(model.apply({"params": params}, prompts, method=clip.CLIP.encode_text), np.float64)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    hits = np.argmax(image_emb @ text.T, axis=1) == targets
    assert results["targeted/num_images"] == 2
    assert results["targeted/success_rate"] == pytest.approx(hits.mean())
    assert [results["targeted/hit_1"], results["targeted/hit_2"]] == hits.astype(float).tolist()

    # A cleaning run that excludes the pretraining run's poisons trains on none of them.
    cleaning = run_configs.override(config, {"train.exclude_indices_file": str(workdir / run_files.POISON_FILE)})
    source, plan = training_input.training_examples(cleaning)
    assert len(plan) == 0 and not set(source.indices.tolist()) & set(written["indices"])
    assert len(source) == 8 - 4


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

TARGETED_KEYS = {"poison.count", "poison.targeted.images", "poison.targeted.num_images", "poison.targeted.copies"}


def _changed(before, after) -> dict:
    from test_configs import flat_fields

    before, after = flat_fields(before), flat_fields(after)
    return {key: after.get(key) for key in before.keys() | after.keys() if before.get(key, "absent") != after.get(key, "absent")}


def test_cc_entry_is_the_study_pretraining_with_the_papers_attack():
    from test_configs import load_config_module

    for arg in ("cc3m_mmcl", "cc6m_mmcl_ssl"):
        changed = _changed(load_config_module("pretrain_cc").get_config(arg), load_config_module("targeted_cc").get_config(arg))
        eval_keys = {key for key in changed if key.startswith("eval.sets.targeted.")}
        assert changed["eval.sets.targeted.evaluator"] == "targeted"
        assert {key: changed[key] for key in changed.keys() - eval_keys} == {
            "poison.count": 0,  # 1,500 / 3,000 backdoor poisons before
            "poison.targeted.num_images": 1,
            "poison.targeted.copies": 3,
            "poison.targeted.captions": "training_captions",
        }


def test_synthetic_entry_is_the_studys_mmcl_run_with_the_attack_and_its_control(tmp_path):
    from bclip import experiment
    from test_configs import CONFIG_DIR, flat_fields, load_config_module, load_from_command_line

    study = experiment.apply_proportions(load_config_module("study_synthetic").get_config("default"))
    mmcl = experiment.pretrain_configs(study, str(tmp_path))["MMCL"]
    for arg, copies in ((str(tmp_path), 4), (f"{tmp_path},control", 0)):
        config = load_config_module("targeted_synthetic").get_config(arg)
        changed = _changed(mmcl, config)
        assert {key: flat_fields(config)[key] for key in TARGETED_KEYS} == {
            "poison.count": 0,
            "poison.targeted.images": os.path.join(str(tmp_path), "test"),
            "poison.targeted.num_images": 8,
            "poison.targeted.copies": copies,
        }
        # Otherwise only the eval sets: the targeted one in, the final retrieval and probe sets out.
        assert all(key.startswith(("eval.sets.targeted.", "eval.sets.retrieval.", "eval.sets.probe.")) for key in changed.keys() - TARGETED_KEYS)
    # Explicit rows from the command line, as bclip.main reads them.
    command_line = load_from_command_line(
        f"{CONFIG_DIR}/targeted_synthetic.py:{tmp_path}", "--config.poison.targeted.image_ids=(3,17)",
        "--config.poison.targeted.num_images=0",
    )
    assert command_line.poison.targeted.image_ids == (3, 17)
    with pytest.raises(ValueError, match="takes WORLD or WORLD,control"):
        load_config_module("targeted_synthetic").get_config(f"{tmp_path},smoke")


def test_one_image_per_run_sweep_draws_an_image_and_label_per_seed(world):
    from test_configs import load_config_module

    module = load_config_module("targeted_synthetic")
    base = module.get_config(str(world))
    chosen = []
    for overrides in module.get_sweep(str(world)):
        config = run_configs.override(base, overrides)
        _, ids, targets = pipeline.targeted_images(config.poison)
        assert len(ids) == 1
        chosen.append((int(ids[0]), int(targets[0])))
    assert len(chosen) == 8 and len(set(chosen)) > 1
    assert [overrides["poison.seed"] for overrides in module.get_sweep(str(world))] == list(range(8))
