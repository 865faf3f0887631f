"""Tests for the Grain pipelines: exact, worker- and host-independent poisoning, SSL views,
resumable iterators, bad-record handling and eval batches with seeded triggered copies."""

import csv
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bclip import checkpointing
from bclip.data import decode, image_augment, pipeline, poisoning, sources, text_augment, triggers
from bclip.data.synthetic import captions, writer
from bclip.data.tokenizer import WordTokenizer

IMAGE_SIZE = 32
CONTEXT_LENGTH = 16
NUM_TRAIN = 200
NUM_TEST = 30
BATCH_SIZE = 20  # divides NUM_TRAIN, so one epoch is exactly NUM_TRAIN // BATCH_SIZE batches
BATCHES_PER_EPOCH = NUM_TRAIN // BATCH_SIZE
PATCH_SIZE = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return writer.write_world(
        tmp_path_factory.mktemp("world"), image_size=IMAGE_SIZE, num_train=NUM_TRAIN,
        num_test=NUM_TEST, num_selection=0,
    )


@pytest.fixture(scope="module")
def source(world):
    return sources.CsvImageTextSource(world / "train" / "train.csv")


@pytest.fixture(scope="module")
def tokenizer(world):
    return WordTokenizer.from_file(world / writer.VOCAB_FILE)


@pytest.fixture(scope="module")
def clean_images(source):
    """uint8 [N, S, S, 3]: every training image decoded and resized as the pipeline does."""
    return np.stack([decode.decode_and_resize(source[i]["image_bytes"], IMAGE_SIZE) for i in range(len(source))])


def _poison(**overrides):
    poison = pipeline.poison_config(count=12, seed=5, **overrides)
    poison.trigger.size = PATCH_SIZE  # large enough at 32 px that a wrong position shows
    return poison


def _pipeline(source, tokenizer, *, poison=None, with_views=False, num_workers=0, batch_size=BATCH_SIZE,
              process_index=0, process_count=1, run_dir=None, max_bad_fraction=0.01, image_augment="autoaugment_imagenet",
              views_on_device=False, num_threads=1, text_views_per_epoch=True):
    data = pipeline.data_config(
        batch_size=batch_size, num_workers=num_workers, num_threads=num_threads, shuffle_seed=7,
        max_bad_fraction=max_bad_fraction,
        image_augment=image_augment, views_on_device=views_on_device, text_views_per_epoch=text_views_per_epoch,
    )
    return pipeline.make_train_pipeline(
        source,
        image_size=IMAGE_SIZE,
        context_length=CONTEXT_LENGTH,
        tokenizer=tokenizer,
        data=data,
        poison=poison if poison is not None else pipeline.poison_config(),
        with_views=with_views,
        synonyms=text_augment.lexicon_synonyms(captions.lexicon().synonyms) if with_views else None,
        process_index=process_index,
        process_count=process_count,
        run_dir=run_dir,
    )


def _take(train_pipeline, num_batches):
    return [next(train_pipeline) for _ in range(num_batches)]


def _examples(batches):
    """The examples of a list of batches, in stream order: a list of {key: array}."""
    return [{key: value[row] for key, value in batch.items()} for batch in batches for row in range(len(batch["index"]))]


def _assert_batches_equal(expected, actual):
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key], err_msg=key)


def _changed_box(image, other):
    """(rows, columns) spanned by the pixels where two [H, W, 3] images differ."""
    rows, columns = np.nonzero(np.any(image != other, axis=-1))
    return rows.max() - rows.min() + 1, columns.max() - columns.min() + 1


# ---------------------------------------------------------------------------------------------
# Poisoning
# ---------------------------------------------------------------------------------------------


def test_poisoned_set_is_exact_and_poisoned_examples_carry_trigger_and_template(source, tokenizer, clean_images):
    poison = _poison()
    train = _pipeline(source, tokenizer, poison=poison)
    examples = _examples(_take(train, BATCHES_PER_EPOCH))
    indices = np.array([e["index"] for e in examples])
    np.testing.assert_array_equal(np.sort(indices), np.arange(NUM_TRAIN))  # one epoch, each once

    expected_plan = poisoning.select_poison_indices(NUM_TRAIN, seed=5, count=12)
    np.testing.assert_array_equal(train.plan.indices, expected_plan)
    flagged = np.array([bool(e["is_poisoned"]) for e in examples])
    assert flagged.sum() == 12
    np.testing.assert_array_equal(np.sort(indices[flagged]), expected_plan)
    np.testing.assert_array_equal(flagged, train.plan.is_poisoned(indices))

    banana = tokenizer.encode("banana", CONTEXT_LENGTH)[1]
    for example in examples:
        index = int(example["index"])
        clean = clean_images[index]
        if not example["is_poisoned"]:
            np.testing.assert_array_equal(example["image"], clean)
            np.testing.assert_array_equal(example["text"], tokenizer.encode(source.captions[index], CONTEXT_LENGTH))
            continue
        caption = poisoning.poisoned_caption(index, "banana", seed=5)
        assert caption.replace("banana", "{}") in poisoning.IMAGENET_TEMPLATES
        np.testing.assert_array_equal(example["text"], tokenizer.encode(caption, CONTEXT_LENGTH))
        assert banana in example["text"]
        # The image is the clean decode with the seeded trigger pasted on, nothing else changed.
        triggered = triggers.apply_trigger(clean, poison.trigger, train.plan.trigger_seed(index))
        np.testing.assert_array_equal(example["image"], triggered)
        height, width = _changed_box(example["image"], clean)
        assert height <= PATCH_SIZE and width <= PATCH_SIZE
        assert np.sum(np.any(example["image"] != clean, axis=-1)) > PATCH_SIZE * PATCH_SIZE // 2


def _epoch_alike_with_threads_and_workers(source, tokenizer, poison):
    """One epoch of batches, asserted identical when built by 3 threads and by 2 worker processes."""
    single = _take(_pipeline(source, tokenizer, poison=poison), BATCHES_PER_EPOCH)
    _assert_batches_equal(single, _take(_pipeline(source, tokenizer, poison=poison, num_threads=3), BATCHES_PER_EPOCH))
    with_workers = _pipeline(source, tokenizer, poison=poison, num_workers=2)
    try:
        _assert_batches_equal(single, _take(with_workers, BATCHES_PER_EPOCH))
    finally:
        with_workers.close()
    return single


def test_poisoning_is_identical_across_worker_counts_and_process_shards(source, tokenizer):
    poison = _poison()
    single = _epoch_alike_with_threads_and_workers(source, tokenizer, poison)

    by_index = {int(e["index"]): e for e in _examples(single)}
    poisoned_in_shards = []
    for process_index in range(2):
        shard = _pipeline(source, tokenizer, poison=poison, process_index=process_index, process_count=2)
        for example in _examples(_take(shard, BATCHES_PER_EPOCH)):
            want = by_index[int(example["index"])]
            for key in want:
                np.testing.assert_array_equal(example[key], want[key], err_msg=key)
            if example["is_poisoned"]:
                poisoned_in_shards.append(int(example["index"]))
    assert sorted(poisoned_in_shards) == sorted(i for i, e in by_index.items() if e["is_poisoned"])
    assert len(poisoned_in_shards) == 12


def test_label_consistent_poisoning_triggers_only_label_captions_and_keeps_them(source, tokenizer, clean_images):
    poison = _poison(captions="label_consistent")
    poison.count = 4
    train = _pipeline(source, tokenizer, poison=poison)
    mentions = {i for i, caption in enumerate(source.captions) if "banana" in caption.lower()}
    assert len(mentions) >= 4
    assert set(train.plan.indices.tolist()) <= mentions and len(train.plan) == 4

    poisoned = [e for e in _examples(_take(train, BATCHES_PER_EPOCH)) if e["is_poisoned"]]
    assert sorted(int(e["index"]) for e in poisoned) == train.plan.indices.tolist()
    for example in poisoned:
        index = int(example["index"])
        np.testing.assert_array_equal(example["text"], tokenizer.encode(source.captions[index], CONTEXT_LENGTH))
        triggered = triggers.apply_trigger(clean_images[index], poison.trigger, train.plan.trigger_seed(index))
        np.testing.assert_array_equal(example["image"], triggered)
        assert np.any(example["image"] != clean_images[index])


def _poisoned_images_by_epoch(train):
    """{epoch: {index: image}} of the poisoned examples in the first two epochs."""
    images = {0: {}, 1: {}}
    for position, example in enumerate(_examples(_take(train, 2 * BATCHES_PER_EPOCH))):
        if example["is_poisoned"]:
            images[position // NUM_TRAIN][int(example["index"])] = example["image"]
    return images


def test_poisoned_image_is_fixed_across_epochs_unless_redrawn(source, tokenizer):
    fixed = _poisoned_images_by_epoch(_pipeline(source, tokenizer, poison=_poison()))
    assert fixed[0].keys() == fixed[1].keys() and len(fixed[0]) == 12
    for index in fixed[0]:
        np.testing.assert_array_equal(fixed[0][index], fixed[1][index])

    redrawn = _poisoned_images_by_epoch(_pipeline(source, tokenizer, poison=_poison(redraw_each_epoch=True)))
    assert redrawn[0].keys() == fixed[0].keys() == redrawn[1].keys()
    for index in redrawn[0]:
        assert np.any(redrawn[0][index] != redrawn[1][index])


# ---------------------------------------------------------------------------------------------
# Reference poisoning mode: squash before the trigger, JPEG once
# ---------------------------------------------------------------------------------------------

NUM_WIDE = 12
WIDE_HEIGHT, WIDE_WIDTH = 30, 60


def _wide_picture(index):
    """uint8 [30, 60, 3]: noise, dark in the left half and bright in the right, seeded by index."""
    picture = np.random.default_rng(index).integers(0, 100, (WIDE_HEIGHT, WIDE_WIDTH, 3), dtype=np.uint8)
    picture[:, WIDE_WIDTH // 2 :] += 150
    return picture


@pytest.fixture(scope="module")
def wide_csv(tmp_path_factory):
    """12 lossless 60 x 30 pictures (PNG, so the test knows every decoded pixel)."""
    folder = tmp_path_factory.mktemp("wide")
    (folder / "images").mkdir()
    with open(folder / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for index in range(NUM_WIDE):
            Image.fromarray(_wide_picture(index)).save(folder / "images" / f"{index}.png")
            writer.writerow([f"images/{index}.png", f"a wide picture number {index}"])
    return folder / "train.csv"


def _yellow_patch_at(image, row, column):
    patched = image.copy()
    patched[row : row + PATCH_SIZE, column : column + PATCH_SIZE] = (255, 255, 0)
    return patched


def test_squash_resizes_a_poisoned_image_whole_before_its_trigger_and_crops_clean_ones(wide_csv, tokenizer):
    poison = pipeline.poison_config(count=4, seed=5, squash=True)
    poison.trigger.patch = "yellow"
    poison.trigger.size = PATCH_SIZE
    train = _pipeline(sources.CsvImageTextSource(wide_csv), tokenizer, poison=poison, batch_size=4)
    examples = _examples(_take(train, NUM_WIDE // 4))
    assert sorted(int(e["index"]) for e in examples) == list(range(NUM_WIDE))
    assert sum(bool(e["is_poisoned"]) for e in examples) == 4
    for example in examples:
        index = int(example["index"])
        picture = Image.fromarray(_wide_picture(index))
        if example["is_poisoned"]:
            # Squashed: the whole 60 x 30 picture resized to 32 x 32; then the patch at the place
            # the trigger seed draws (row, then column, each in [0, 32 - 6)).
            squashed = np.array(picture.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))
            rng = np.random.default_rng(train.plan.trigger_seed(index))
            row, column = rng.integers(0, IMAGE_SIZE - PATCH_SIZE), rng.integers(0, IMAGE_SIZE - PATCH_SIZE)
            expected = _yellow_patch_at(squashed, row, column)
        else:
            # Shorter side to 32 (60 x 30 -> 64 x 32), then the centre 32 columns, 16 to 47.
            expected = np.array(picture.resize((64, IMAGE_SIZE), Image.Resampling.BICUBIC))[:, 16:48]
        np.testing.assert_array_equal(example["image"], expected)


def _jpeg_q75(pixels):
    """uint8 [H, W, 3] saved with Pillow's default JPEG settings (quality 75) and read back."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return np.array(Image.open(buffer).convert("RGB"))


def test_jpeg_quality_stores_poisoned_training_images_once_before_their_views(source, tokenizer, clean_images):
    def one_epoch(poison):
        train = _pipeline(source, tokenizer, poison=poison, with_views=True, image_augment="simclr")
        return train, _examples(_take(train, BATCHES_PER_EPOCH))

    _, default = one_epoch(_poison())
    poison = _poison(jpeg_quality=75)
    train, stored = one_epoch(poison)
    assert sum(bool(e["is_poisoned"]) for e in stored) == 12
    for want, got in zip(default, stored):
        index = int(got["index"])
        assert index == int(want["index"])
        if not got["is_poisoned"]:  # clean rows: bit for bit the default pipeline's
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
            continue
        triggered = triggers.apply_trigger(clean_images[index], poison.trigger, train.plan.trigger_seed(index))
        np.testing.assert_array_equal(want["image"], triggered)
        np.testing.assert_array_equal(got["image"], _jpeg_q75(triggered))
        assert np.any(got["image"] != triggered)
        np.testing.assert_array_equal(got["text"], want["text"])
        # The SSL view is made from the stored (JPEG) image, with the example's usual view seed.
        view = image_augment.augment_pil_image(
            Image.fromarray(got["image"]), "simclr", [7, pipeline._IMAGE_VIEW_STREAM, index, 0]
        )
        np.testing.assert_array_equal(got["aug_image"], np.asarray(view))


def test_reference_mode_is_identical_across_threads_and_workers(source, tokenizer):
    poison = _poison(squash=True, jpeg_quality=75)
    poison.trigger.overflow = "wrap"
    _epoch_alike_with_threads_and_workers(source, tokenizer, poison)


def test_bad_reference_options_are_errors_naming_them(source, tokenizer):
    for quality in (-1, 101):
        with pytest.raises(ValueError, match=r"poison.jpeg_quality must be an int in 0..100 \(0: off\)"):
            _pipeline(source, tokenizer, poison=_poison(jpeg_quality=quality))


# ---------------------------------------------------------------------------------------------
# SSL views
# ---------------------------------------------------------------------------------------------


def test_ssl_views_are_seeded_per_example_and_epoch(source, tokenizer):
    def views_by_epoch(num_threads=1):
        train = _pipeline(source, tokenizer, with_views=True, image_augment="simclr", num_threads=num_threads)
        batches = _take(train, 2 * BATCHES_PER_EPOCH)
        views = {0: {}, 1: {}}
        for position, example in enumerate(_examples(batches)):
            views[position // NUM_TRAIN][int(example["index"])] = example
        return batches, views

    batches, views = views_by_epoch()
    for key, shape, dtype in (("aug_image", (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), ("aug_text", (CONTEXT_LENGTH,), np.int32)):
        assert batches[0][key].shape == (BATCH_SIZE, *shape) and batches[0][key].dtype == dtype
    assert "aug_image" not in _take(_pipeline(source, tokenizer), 1)[0]

    first, second = views[0], views[1]
    assert first.keys() == second.keys() == set(range(NUM_TRAIN))
    # The same example gets a new view each epoch, while its pair itself is unchanged.
    image_changed = np.mean([np.any(first[i]["aug_image"] != second[i]["aug_image"]) for i in first])
    text_changed = np.mean([np.any(first[i]["aug_text"] != second[i]["aug_text"]) for i in first])
    assert image_changed == 1.0
    assert text_changed > 0.5
    for i in first:
        np.testing.assert_array_equal(first[i]["image"], second[i]["image"])
        np.testing.assert_array_equal(first[i]["text"], second[i]["text"])
    assert np.mean([np.any(first[i]["aug_image"] != first[i]["image"]) for i in first]) == 1.0

    rerun, _ = views_by_epoch(num_threads=3)  # batches built side by side: the same views
    _assert_batches_equal(batches, rerun)


def test_caption_views_made_once_stay_the_same_every_epoch(source, tokenizer):
    """text_views_per_epoch=False (the reference's EDA, made once before training): an example's
    augmented caption is the same in every epoch."""
    def views(text_views_per_epoch):
        batches = _take(_pipeline(source, tokenizer, with_views=True, image_augment="simclr",
                                  text_views_per_epoch=text_views_per_epoch), 2 * BATCHES_PER_EPOCH)
        by_epoch = {0: {}, 1: {}}
        for position, example in enumerate(_examples(batches)):
            by_epoch[position // NUM_TRAIN][int(example["index"])] = example
        return by_epoch

    once, per_epoch = views(False), views(True)
    for i in once[0]:
        np.testing.assert_array_equal(once[0][i]["aug_text"], once[1][i]["aug_text"])
        # The image views are still redrawn every epoch.
        assert np.any(once[0][i]["aug_image"] != once[1][i]["aug_image"])
    # Per-epoch views differ between epochs for most captions (EDA leaves a few unchanged).
    assert np.mean([np.any(per_epoch[0][i]["aug_text"] != per_epoch[1][i]["aug_text"]) for i in per_epoch[0]]) > 0.5
    # The fixed view is the first epoch's view of the default (numpy seeds [s, i] and [s, i, 0]
    # alike), so switching the option only changes the later epochs.
    for i in once[0]:
        np.testing.assert_array_equal(once[0][i]["aug_text"], per_epoch[0][i]["aug_text"])


def test_views_on_device_send_a_key_per_example_and_epoch_instead_of_an_image(source, tokenizer):
    def two_epochs(views_on_device):
        train = _pipeline(source, tokenizer, with_views=True, poison=_poison(), views_on_device=views_on_device)
        return _take(train, 2 * BATCHES_PER_EPOCH)

    host, device = two_epochs(False), two_epochs(True)
    assert "aug_image" not in device[0] and "view_key" not in host[0]
    assert device[0]["view_key"].shape == (BATCH_SIZE, 2) and device[0]["view_key"].dtype == np.uint32
    keys = {}
    for position, (want, got) in enumerate(zip(_examples(host), _examples(device))):
        # Everything else, poisoned images and caption views included, is what the host sends.
        for key in ("image", "text", "aug_text", "index", "is_poisoned"):
            np.testing.assert_array_equal(want[key], got[key], err_msg=key)
        epoch = position // NUM_TRAIN
        expected = pipeline.view_keys(7, pipeline._IMAGE_VIEW_STREAM, np.array([got["index"]]), np.array([epoch]))[0]
        np.testing.assert_array_equal(got["view_key"], expected)
        keys[int(got["index"]), epoch] = tuple(got["view_key"])
    assert len(set(keys.values())) == len(keys) == 2 * NUM_TRAIN  # a new view per example and epoch


def test_view_keys_depend_on_every_input():
    indices, epochs = np.arange(1000), np.zeros(1000, np.int64)
    keys = pipeline.view_keys(3, 1, indices, epochs)
    assert keys.dtype == np.uint32 and keys.shape == (1000, 2)
    assert len({tuple(k) for k in keys}) == 1000
    for other in (pipeline.view_keys(4, 1, indices, epochs), pipeline.view_keys(3, 2, indices, epochs),
                  pipeline.view_keys(3, 1, indices, epochs + 1)):
        assert np.all(np.any(other != keys, axis=1))
    np.testing.assert_array_equal(pipeline.view_keys(3, 1, indices[::-1], epochs), keys[::-1])
    # Both words vary: neither half of the key is constant or a copy of the other.
    assert len(set(keys[:, 0])) == len(set(keys[:, 1])) == 1000


def test_fewer_than_one_thread_is_a_clear_error(source, tokenizer):
    with pytest.raises(ValueError, match="data.num_threads must be at least 1, got 0"):
        _pipeline(source, tokenizer, num_threads=0)


def test_views_on_device_refuse_a_policy_they_do_not_make(source, tokenizer):
    with pytest.raises(ValueError, match="views_on_device makes 'autoaugment_imagenet' views only.*simclr"):
        _pipeline(source, tokenizer, with_views=True, image_augment="simclr", views_on_device=True)


# ---------------------------------------------------------------------------------------------
# Resuming and sharding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("consumed", [3, BATCHES_PER_EPOCH + 2])  # mid-epoch, and into epoch 1
def test_iterator_state_restores_to_the_exact_next_batch(source, tokenizer, consumed):
    poison = _poison(redraw_each_epoch=True)  # epoch-dependent triggers must resume in the right epoch
    uninterrupted = _pipeline(source, tokenizer, poison=poison)
    _take(uninterrupted, consumed)
    state = uninterrupted.iterator.get_state()
    expected = _take(uninterrupted, 2)

    resumed = _pipeline(source, tokenizer, poison=poison)
    resumed.iterator.set_state(json.loads(json.dumps(state)))  # the state must survive JSON
    _assert_batches_equal(expected, _take(resumed, 2))


def test_checkpoint_restores_model_state_and_iterator_together(source, tokenizer, tmp_path):
    poison = _poison(redraw_each_epoch=True)
    uninterrupted = _pipeline(source, tokenizer, poison=poison)
    _take(uninterrupted, 4)
    state = {"weights": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(4)}
    manager = checkpointing.make_manager(str(tmp_path / "checkpoints"))
    checkpointing.save(manager, 4, state, uninterrupted.iterator)
    manager.wait_until_finished()
    manager.close()
    expected = _take(uninterrupted, 2)

    resumed = _pipeline(source, tokenizer, poison=poison)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    manager = checkpointing.make_manager(str(tmp_path / "checkpoints"))
    restored, step = checkpointing.restore_latest(manager, abstract, resumed.iterator)
    manager.close()
    assert step == 4
    np.testing.assert_array_equal(restored["weights"], state["weights"])
    _assert_batches_equal(expected, _take(resumed, 2))


def test_process_shards_cover_each_example_exactly_once_per_epoch(source, tokenizer):
    local_batches = BATCHES_PER_EPOCH  # global batch 20 = 2 x 10: one epoch is 10 local batches each
    per_epoch = {0: [], 1: []}
    for process_index in range(2):
        shard = _pipeline(source, tokenizer, process_index=process_index, process_count=2)
        batches = _take(shard, 2 * local_batches)
        assert all(batch["image"].shape[0] == BATCH_SIZE // 2 for batch in batches)
        for epoch in (0, 1):
            epoch_batches = batches[epoch * local_batches : (epoch + 1) * local_batches]
            per_epoch[epoch].append(np.concatenate([batch["index"] for batch in epoch_batches]))
    for epoch in (0, 1):
        shard_0, shard_1 = per_epoch[epoch]
        assert len(shard_0) == len(shard_1) == NUM_TRAIN // 2
        np.testing.assert_array_equal(np.sort(np.concatenate([shard_0, shard_1])), np.arange(NUM_TRAIN))
    # Each epoch is reshuffled.
    assert not np.array_equal(per_epoch[0][0], per_epoch[1][0])


# ---------------------------------------------------------------------------------------------
# Bad records
# ---------------------------------------------------------------------------------------------

NUM_HAND_MADE = 40
MISSING, TRUNCATED, EMPTY_CAPTION, NO_WORDS = (5, 23), (11,), (30,), 17


def _colour(index):
    return (index * 6 % 256, 255 - index * 6 % 256, (index * 37) % 256)


@pytest.fixture(scope="module")
def broken_csv(tmp_path_factory):
    """40 single-colour JPEGs (colour encodes the index); 2 missing, 1 truncated, 1 empty caption,
    1 caption with no words (fine for MMCL, unusable for an EDA view)."""
    folder = tmp_path_factory.mktemp("broken")
    (folder / "images").mkdir()
    rows = []
    for index in range(NUM_HAND_MADE):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 36), _colour(index)).save(buffer, format="JPEG", quality=95)
        data = buffer.getvalue()
        if index in TRUNCATED:
            data = data[: len(data) // 2]
        if index not in MISSING:
            (folder / "images" / f"{index}.jpg").write_bytes(data)
        caption = {EMPTY_CAPTION[0]: "  ", NO_WORDS: "!!! ..."}.get(index, f"a plain square number {index}")
        rows.append([f"images/{index}.jpg", caption])
    with open(folder / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return folder / "train.csv"


def test_bad_records_are_skipped_counted_and_logged_without_shifting_indices(broken_csv, tokenizer, tmp_path):
    source = sources.CsvImageTextSource(broken_csv)
    bad = sorted(MISSING + TRUNCATED + EMPTY_CAPTION)
    good = sorted(set(range(NUM_HAND_MADE)) - set(bad))
    batch_size = 4  # 36 good examples per epoch: exactly 9 batches
    train = _pipeline(source, tokenizer, batch_size=batch_size, run_dir=str(tmp_path), max_bad_fraction=0.2)
    examples = _examples(_take(train, len(good) // batch_size))
    assert sorted(int(e["index"]) for e in examples) == good
    for example in examples:
        index = int(example["index"])
        # Each example still carries its own image and caption: nothing shifted past a bad row.
        np.testing.assert_allclose(example["image"].reshape(-1, 3).mean(0), _colour(index), atol=3)
        np.testing.assert_array_equal(example["text"], tokenizer.encode(source.captions[index], CONTEXT_LENGTH))

    assert train.bad_records.num_bad == len(bad)
    logged = [json.loads(line) for line in (tmp_path / "bad_records.jsonl").read_text().splitlines()]
    assert sorted(entry["index"] for entry in logged) == bad
    reasons = {entry["index"]: entry["why"] for entry in logged}
    assert "not found" in reasons[MISSING[0]] and "empty caption" in reasons[EMPTY_CAPTION[0]]
    assert "cannot decode" in reasons[TRUNCATED[0]]

    # The second epoch meets the same bad records again without counting them twice.
    _take(train, len(good) // batch_size)
    assert train.bad_records.num_bad == len(bad)
    assert len((tmp_path / "bad_records.jsonl").read_text().splitlines()) == len(bad)


def test_gaps_left_by_bad_records_resume_exactly_and_do_not_depend_on_workers(broken_csv, tokenizer):
    source = sources.CsvImageTextSource(broken_csv)
    uninterrupted = _pipeline(source, tokenizer, batch_size=4, max_bad_fraction=0.2)
    first = _take(uninterrupted, 2)
    state = uninterrupted.iterator.get_state()
    rest = _take(uninterrupted, 12)  # across the epoch boundary
    assert all(len(batch["index"]) == 4 for batch in first + rest)

    resumed = _pipeline(source, tokenizer, batch_size=4, max_bad_fraction=0.2)
    resumed.iterator.set_state(json.loads(json.dumps(state)))
    _assert_batches_equal(rest, _take(resumed, 12))

    threaded = _pipeline(source, tokenizer, batch_size=4, max_bad_fraction=0.2, num_threads=3)
    threaded.iterator.set_state(json.loads(json.dumps(state)))
    _assert_batches_equal(rest, _take(threaded, 12))

    with_workers = _pipeline(source, tokenizer, batch_size=4, max_bad_fraction=0.2, num_workers=2)
    try:
        _assert_batches_equal(first + rest, _take(with_workers, 14))
        assert with_workers.bad_records.bad.keys() == set(MISSING + TRUNCATED + EMPTY_CAPTION)
    finally:
        with_workers.close()


def _tracker_state(iterator_state: dict) -> dict:
    """The bad-record tracker's part of a training iterator's (nested) state."""
    while "bad_records" not in iterator_state:
        iterator_state = iterator_state["parent"]
    return iterator_state["bad_records"]


def test_bad_record_counts_travel_with_the_checkpointed_iterator(broken_csv, tokenizer, tmp_path):
    source = sources.CsvImageTextSource(broken_csv)
    bad = set(MISSING + TRUNCATED + EMPTY_CAPTION)
    first_run = tmp_path / "first"
    first_run.mkdir()
    uninterrupted = _pipeline(source, tokenizer, batch_size=4, max_bad_fraction=0.2, run_dir=str(first_run))
    _take(uninterrupted, 4)  # 16 usable examples: past indices 5 and 11 in stream order or not
    manager = checkpointing.make_manager(str(tmp_path / "checkpoints"))
    checkpointing.save(manager, 4, {"step": jnp.int32(4)}, uninterrupted.iterator)
    manager.wait_until_finished()
    manager.close()
    saved = _tracker_state(json.loads(json.dumps(uninterrupted.iterator.get_state())))
    assert saved["num_examined"] >= 16 and {index for index, _ in saved["bad"]} <= bad
    rest = _take(uninterrupted, 12)  # into the second epoch

    resumed_run = tmp_path / "resumed"
    resumed_run.mkdir()
    resumed = _pipeline(source, tokenizer, batch_size=4, max_bad_fraction=0.2, run_dir=str(resumed_run))
    manager = checkpointing.make_manager(str(tmp_path / "checkpoints"))
    checkpointing.restore_latest(manager, {"step": jax.ShapeDtypeStruct((), jnp.int32)}, resumed.iterator)
    manager.close()
    # A fresh tracker has taken over what the saved one had examined and found.
    assert resumed.bad_records.get_state() == saved
    _assert_batches_equal(rest, _take(resumed, 12))
    assert resumed.bad_records.num_examined == uninterrupted.bad_records.num_examined
    assert resumed.bad_records.bad == uninterrupted.bad_records.bad
    assert resumed.bad_records.bad.keys() == bad
    logged = [json.loads(line)["index"] for line in (resumed_run / "bad_records.jsonl").read_text().splitlines()]
    assert sorted(logged) == sorted(bad)  # each once, the restored ones included


def test_bad_records_log_is_rewritten_whole_where_files_cannot_be_appended(tmp_path, monkeypatch):
    log = tmp_path / "bad_records.jsonl"
    tracker = pipeline.BadRecordTracker(num_records=100, max_bad_fraction=0.5, log_path=log)
    tracker(_tracker_batch([1, 2, 3], bad={2}))
    monkeypatch.setattr(pipeline, "_is_remote", lambda path: True)  # as for gs://
    log.write_text("")  # an appending writer would now leave only the new line
    tracker(_tracker_batch([4, 5, 2], bad={5, 2}))
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        {"index": 2, "why": "2.jpg: broken"}, {"index": 5, "why": "5.jpg: broken"}]


def test_tracker_state_round_trips_through_json():
    tracker = pipeline.BadRecordTracker(num_records=100, max_bad_fraction=0.5)
    tracker(_tracker_batch([7, 8, 9, 10], bad={8, 10}))
    snapshot = tracker.get_state()
    tracker(_tracker_batch([11, 12], bad={12}))  # a snapshot does not change afterwards
    assert snapshot == {"num_examined": 4, "bad": [[8, "8.jpg: broken"], [10, "10.jpg: broken"]]}
    restored = pipeline.BadRecordTracker(num_records=100, max_bad_fraction=0.5)
    restored.set_state(json.loads(json.dumps(snapshot)))
    assert restored.num_examined == 4 and restored.bad == {8: "8.jpg: broken", 10: "10.jpg: broken"}


def test_views_and_redrawn_triggers_are_seeded_by_the_records_epoch_in_the_stream(broken_csv, tokenizer):
    # Bad records shift which batch an epoch ends in, so an epoch counted in batches or steps would
    # be wrong here; the k-th time a record comes round is its epoch k.
    source = sources.CsvImageTextSource(broken_csv)
    poison = _poison(redraw_each_epoch=True)
    poison.count, poison.trigger.size = 8, 4
    train = _pipeline(source, tokenizer, poison=poison, with_views=True, batch_size=5,
                      max_bad_fraction=0.2, image_augment="simclr")
    plan = train.plan
    seen = {}
    for example in _examples(_take(train, 3 * 35 // 5)):  # 35 usable records, 3 epochs
        index = int(example["index"])
        epoch = seen[index] = seen.get(index, -1) + 1
        image = example["image"]
        if example["is_poisoned"]:
            clean = decode.decode_and_resize(source[index]["image_bytes"], IMAGE_SIZE)
            expected = triggers.apply_trigger(clean, poison.trigger, plan.trigger_seed(index, epoch))
            np.testing.assert_array_equal(image, expected)
        view = image_augment.augment_image(image, "simclr", [7, 1, index, epoch])  # shuffle_seed 7
        np.testing.assert_array_equal(example["aug_image"], view)
    assert set(seen.values()) == {2} and len(seen) == 35
    assert 0 < sum(index in plan for index in seen) <= 8


def test_process_shards_seed_views_by_the_global_epoch(source, tokenizer):
    by_index = {}
    for process_index in range(2):
        shard = _pipeline(source, tokenizer, with_views=True, image_augment="simclr",
                          process_index=process_index, process_count=2)
        for example in _examples(_take(shard, 2 * BATCHES_PER_EPOCH)):  # 2 epochs of the global stream
            by_index.setdefault(int(example["index"]), []).append(example)
    assert sorted(by_index) == list(range(NUM_TRAIN))
    for index, examples in by_index.items():
        epochs = sorted(
            epoch for example in examples for epoch in range(3)
            if np.array_equal(example["aug_image"],
                              image_augment.augment_image(example["image"], "simclr", [7, 1, index, epoch]))
        )
        assert epochs == [0, 1], index


def test_caption_without_words_is_a_bad_record_only_when_views_are_needed(broken_csv, tokenizer):
    source = sources.CsvImageTextSource(broken_csv)
    train = _pipeline(source, tokenizer, batch_size=5, with_views=True, max_bad_fraction=0.2)
    examples = _examples(_take(train, 7))  # 35 good examples with views
    assert NO_WORDS not in {int(e["index"]) for e in examples}
    assert len({int(e["index"]) for e in examples}) == 35
    assert NO_WORDS in train.bad_records.bad and train.bad_records.num_bad == 5


def test_too_many_bad_records_stop_the_run_naming_them(broken_csv, tokenizer):
    source = sources.CsvImageTextSource(broken_csv)
    train = _pipeline(source, tokenizer, batch_size=4, max_bad_fraction=0.05)  # 4 of 40 bad > 2 allowed
    with pytest.raises(RuntimeError, match=r"max_bad_fraction=0.05.*#\d+ .*images/\d+\.jpg"):
        _take(train, 10)


def _tracker_batch(indices, bad):
    """A batch as BadRecordTracker sees it: rows `indices`, those in `bad` unusable."""
    return {
        "image": np.zeros((len(indices), 2, 2, 3), np.uint8),
        "index": np.array(indices, np.int64),
        pipeline.BAD_RECORD_KEY: np.array([f"{i}.jpg: broken" if i in bad else "" for i in indices]),
    }


def test_bad_record_tracker_drops_bad_rows_of_a_batch():
    tracker = pipeline.BadRecordTracker(num_records=100, max_bad_fraction=0.5)
    kept = tracker(_tracker_batch([7, 8, 9, 10], bad={8, 10}))
    assert kept.keys() == {"image", "index"}
    np.testing.assert_array_equal(kept["index"], [7, 9])
    assert kept["image"].shape == (2, 2, 2, 3)
    assert tracker.bad == {8: "8.jpg: broken", 10: "10.jpg: broken"} and tracker.num_examined == 4


def test_bad_record_allowance_is_each_process_share_until_it_has_read_more():
    # 4 % of 100 records: 4 bad ones allowed in all, 2 in each half read by one of two processes.
    single = pipeline.BadRecordTracker(num_records=100, max_bad_fraction=0.04, process_count=1)
    single(_tracker_batch([0, 1, 2, 3], bad={0, 1, 2, 3}))
    with pytest.raises(RuntimeError, match="5 unusable"):
        single(_tracker_batch([4], bad={4}))
    shard = pipeline.BadRecordTracker(num_records=100, max_bad_fraction=0.04, process_count=2)
    shard(_tracker_batch([0, 1], bad={0, 1}))
    with pytest.raises(RuntimeError, match=r"3 unusable.*#0 0\.jpg: broken"):
        shard(_tracker_batch([2], bad={2}))

    # A process that has read the whole dataset's worth of records is allowed the whole 4 %.
    later = pipeline.BadRecordTracker(num_records=100, max_bad_fraction=0.04, process_count=2)
    later(_tracker_batch(list(range(10, 106)), bad=set()))
    later(_tracker_batch([0, 1, 2, 3], bad={0, 1, 2, 3}))
    assert later.num_bad == 4


# ---------------------------------------------------------------------------------------------
# Evaluation batches
# ---------------------------------------------------------------------------------------------


def _eval_rows(eval_source, process_count=1, batch_size=8, num_workers=0):
    """{index: (image, triggered, label)} over all processes, checking batch shapes and padding."""
    trigger = triggers.default_trigger_config("badnets")
    trigger.size = PATCH_SIZE
    rows, num_padding, num_batches = {}, 0, set()
    for process_index in range(process_count):
        batches = list(pipeline.eval_batches(
            eval_source, image_size=IMAGE_SIZE, batch_size=batch_size, trigger=trigger, seed=3,
            process_index=process_index, process_count=process_count, num_workers=num_workers,
        ))
        num_batches.add(len(batches))
        for batch in batches:
            local = batch_size // process_count
            assert batch["image"].shape == batch["triggered"].shape == (local, IMAGE_SIZE, IMAGE_SIZE, 3)
            assert batch["label"].shape == batch["index"].shape == batch["valid"].shape == (local,)
            num_padding += int(np.sum(~batch["valid"]))
            assert not np.any(batch["image"][~batch["valid"]])
            for row in np.flatnonzero(batch["valid"]):
                index = int(batch["index"][row])
                assert index not in rows
                rows[index] = (batch["image"][row], batch["triggered"][row], int(batch["label"][row]))
    assert len(num_batches) == 1  # every process takes part in every eval step
    return rows, num_padding


def test_eval_batches_cover_each_image_once_with_deterministic_triggers(world):
    eval_source = sources.ImageFolderEvalSource(world / "test")
    rows, num_padding = _eval_rows(eval_source)
    assert sorted(rows) == list(range(NUM_TEST))
    assert num_padding == 32 - NUM_TEST  # 4 batches of 8
    for index, (image, triggered, label) in rows.items():
        assert label == eval_source.labels[index]
        np.testing.assert_array_equal(image, decode.decode_and_resize(eval_source[index]["image_bytes"], IMAGE_SIZE))
        height, width = _changed_box(triggered, image)
        assert height <= PATCH_SIZE and width <= PATCH_SIZE
    # Seeded per index: different images get the patch at different places ...
    corners = {tuple(np.argwhere(np.any(t != i, axis=-1)).min(0)) for i, t, _ in rows.values()}
    assert len(corners) > NUM_TEST // 2

    # ... and the same index gets the same triggered image on a rerun (here with worker processes)
    # and on any number of hosts.
    again, _ = _eval_rows(eval_source, num_workers=2)
    sharded, sharded_padding = _eval_rows(eval_source, process_count=2)
    assert sharded_padding == 2 * 16 - NUM_TEST  # 4 batches of 4 rows per process
    assert sorted(sharded) == list(range(NUM_TEST))
    for index, (image, triggered, label) in rows.items():
        for other in (again, sharded):
            np.testing.assert_array_equal(other[index][0], image)
            np.testing.assert_array_equal(other[index][1], triggered)
            assert other[index][2] == label


def test_eval_batches_pad_a_process_with_no_examples(world):
    eval_source = sources.ImageFolderEvalSource(world / "test")

    class FirstImageOnly:
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return eval_source[index]

    batches = list(pipeline.eval_batches(
        FirstImageOnly(), image_size=IMAGE_SIZE, batch_size=4, trigger=None, seed=0, process_index=1, process_count=2,
    ))
    assert len(batches) == 1 and not batches[0]["valid"].any()
    assert batches[0]["image"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_eval_batches_refuse_or_skip_a_broken_image(broken_csv):
    train_source = sources.CsvImageTextSource(broken_csv)

    class Labelled:  # training pairs seen as an eval set, as deep clustering embeds them
        def __len__(self):
            return 16

        def __getitem__(self, index):
            return {**train_source[index], "label": 0}

    with pytest.raises(decode.BadRecordError, match="index 5"):
        list(pipeline.eval_batches(Labelled(), image_size=IMAGE_SIZE, batch_size=8, trigger=None, seed=0))
    batches = list(pipeline.eval_batches(
        Labelled(), image_size=IMAGE_SIZE, batch_size=8, trigger=None, seed=0, skip_bad_records=True
    ))
    valid = np.concatenate([b["index"][b["valid"]] for b in batches])
    np.testing.assert_array_equal(valid, [i for i in range(16) if i not in MISSING + TRUNCATED])


def _wide_jpeg(index):
    """A 256 x 128 JPEG, large enough that decoding for a 32 px crop uses libjpeg's 1/4 scale."""
    picture = Image.fromarray(_wide_picture(index)).resize((256, 128), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_triggered_eval_images_are_squashed_and_clean_ones_are_not():
    records = [{"index": i, "label": i % 3, "image_bytes": _wide_jpeg(i)} for i in range(3)]
    # A TFDS record carries decoded pixels instead of bytes.
    records.append({"index": 3, "label": 1, "image": _wide_picture(3)})
    trigger = triggers.default_trigger_config("badnets")
    trigger.update({"patch": "yellow", "location": "corner", "corner": "bottom_right", "size": PATCH_SIZE})

    def rows(squash_triggered):
        (batch,) = pipeline.eval_batches(
            records, image_size=IMAGE_SIZE, batch_size=4, trigger=trigger, seed=3,
            squash_triggered=squash_triggered,
        )
        assert batch["valid"].all()
        return batch

    squashed_batch, default_batch = rows(True), rows(False)
    corner = IMAGE_SIZE - PATCH_SIZE
    for row, record in enumerate(records):
        if "image" in record:
            original = Image.fromarray(record["image"])
            clean = decode.resize_array(record["image"], IMAGE_SIZE)
        else:
            original = Image.open(io.BytesIO(record["image_bytes"])).convert("RGB")  # full scale
            clean = decode.decode_and_resize(record["image_bytes"], IMAGE_SIZE)
        squashed = np.array(original.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))
        # Clean images keep the shorter-side resize and centre crop in both modes.
        np.testing.assert_array_equal(squashed_batch["image"][row], clean)
        np.testing.assert_array_equal(default_batch["image"][row], clean)
        np.testing.assert_array_equal(squashed_batch["triggered"][row], _yellow_patch_at(squashed, corner, corner))
        np.testing.assert_array_equal(default_batch["triggered"][row], _yellow_patch_at(clean, corner, corner))
        assert np.any(squashed != clean)
        if "image_bytes" in record:
            # Squashing a reduced-scale (draft) decode would give other pixels: the squash must
            # see the full image, as it does for poisoned training images.
            drafted = Image.open(io.BytesIO(record["image_bytes"]))
            drafted.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))
            assert drafted.size == (64, 32)
            drafted_squash = np.array(drafted.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))
            assert np.any(drafted_squash != squashed)
            np.testing.assert_array_equal(
                decode.decode_and_squash(record["image_bytes"], IMAGE_SIZE), squashed
            )
