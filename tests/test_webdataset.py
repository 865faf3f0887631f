"""Training on img2dataset's webdataset shards: the shard patterns, the index, bad and lost samples,
poisoning by index (the same pairs and poisons as the same data in a CSV), and a run of the trainer.

Every shard here is written by the test with tarfile, in img2dataset's layout."""

import csv
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image
from test_train_fake_data import WORDS, fake_data_config

from bclip import run_files, train
from bclip.data import decode, pipeline, poisoning, records, sources, training_input, webdataset_index
from bclip.data.tokenizer import WordTokenizer

IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _image(colour, extension="jpg", size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=IMAGE_FORMATS[extension])
    return buffer.getvalue()


def _write_shard(path, samples):
    """samples: (key, {extension: bytes}) in tar order; each member is written as img2dataset's
    webdataset writer does, {key}.{extension}, the sample's members next to each other."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _pair(key, colour, caption, extension="jpg"):
    meta = json.dumps({"key": key, "caption": caption, "status": "success"}).encode()
    return key, {extension: _image(colour, extension), "txt": caption.encode(), "json": meta}


def _colour(i):
    return (20 * i % 256, 255 - 20 * i % 256, 90)


def _dataset(folder, num_shards=2, per_shard=3, extensions=("jpg", "png", "webp")):
    """Shards {00000..} of `per_shard` pairs each, written last shard first (name order, not write
    order, is record order), with img2dataset's parquet and stats files beside them. Returns the
    pairs in record order as (key, image bytes, caption)."""
    folder.mkdir(exist_ok=True)
    expected = []
    for shard in reversed(range(num_shards)):
        samples = []
        for k in range(per_shard):
            i = shard * per_shard + k
            key = f"{shard:05d}{k:04d}"
            samples.append(_pair(key, _colour(i), f"a photo of a red square {i}", extensions[i % len(extensions)]))
        _write_shard(folder / f"{shard:05d}.tar", samples)
        (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": per_shard + 2, "successes": per_shard}))
        expected[:0] = [(key, members[ext], members["txt"].decode()) for key, members in samples for ext in members if ext in IMAGE_FORMATS]
    return expected


def test_shards_give_their_pairs_in_shard_name_and_member_order(tmp_path, monkeypatch):
    expected = _dataset(tmp_path / "cc")
    source = sources.WebDatasetImageTextSource(str(tmp_path / "cc" / "{00000..00001}.tar"))
    assert len(source) == 6
    for i, (key, image_bytes, caption) in enumerate(expected):
        record = source[i]
        assert (record["image_bytes"], record["caption"], record["index"]) == (image_bytes, caption, i)
        shard = str(tmp_path / "cc" / f"{i // 3:05d}.tar")
        assert record["path"] == f"{shard}/{key}.{['jpg', 'png', 'webp'][i % 3]}"
    assert list(source.captions) == [caption for _, _, caption in expected]
    with pytest.raises(IndexError):
        source[6]

    # The index is plain JSON beside each shard; the next source reads it and not the tars.
    index_file = tmp_path / "cc" / "00001.tar.index.json"
    index = json.loads(index_file.read_text())
    assert index["format"] == "bclip-webdataset-index" and index["keys"] == ["000010000", "000010001", "000010002"]
    monkeypatch.setattr(tarfile, "open", lambda *args, **kwargs: pytest.fail("shard scanned again"))
    # A folder, a glob (which passes over the parquet, stats and index files) and a list: the same.
    for shards in (tmp_path / "cc", str(tmp_path / "cc" / "*"), [str(tmp_path / "cc" / n) for n in ("00001.tar", "00000.tar")]):
        again = sources.WebDatasetImageTextSource(shards)
        assert [again[i]["image_bytes"] for i in range(6)] == [data for _, data, _ in expected]
    # Grain pickles sources into its workers.
    copy = pickle.loads(pickle.dumps(source))
    assert copy[4]["image_bytes"] == expected[4][1] and copy[4]["caption"] == expected[4][2]


def test_index_dir_keeps_indexes_apart_from_read_only_shards(tmp_path):
    expected = _dataset(tmp_path / "cc", num_shards=1)
    source = sources.WebDatasetImageTextSource(tmp_path / "cc", index_dir=tmp_path / "indexes")
    assert [source[i]["caption"] for i in range(3)] == [caption for _, _, caption in expected]
    assert not list((tmp_path / "cc").glob("*.index.json"))
    (written,) = os.listdir(tmp_path / "indexes")
    assert written.startswith("00000.tar.") and written.endswith(".index.json")
    # A same-named shard of another folder gets its own index there.
    _dataset(tmp_path / "other", num_shards=1, per_shard=2)
    assert len(sources.WebDatasetImageTextSource(tmp_path / "other", index_dir=tmp_path / "indexes")) == 2
    assert len(os.listdir(tmp_path / "indexes")) == 2


def test_brace_patterns_expand_as_the_shell_does(tmp_path):
    expand = webdataset_index.expand_braces
    assert expand("/d/{00000..00003}.tar") == ["/d/00000.tar", "/d/00001.tar", "/d/00002.tar", "/d/00003.tar"]
    assert expand("{8..11}") == ["8", "9", "10", "11"]
    assert expand("{08..10}") == ["08", "09", "10"]
    assert expand("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert expand("plain.tar") == ["plain.tar"]
    for bad, why in (("{3..1}", "counts down"), ("{x}.tar", "neither a range"), ("a{b", "unbalanced")):
        with pytest.raises(ValueError, match=why):
            expand(bad)
    _dataset(tmp_path / "cc", num_shards=2, per_shard=1)
    with pytest.raises(FileNotFoundError, match="00002.tar"):
        webdataset_index.expand_shard_pattern(str(tmp_path / "cc" / "{00000..00002}.tar"))
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        webdataset_index.expand_shard_pattern(str(tmp_path / "cc" / "*.parquet"))
    with pytest.raises(ValueError, match="local or mounted"):
        webdataset_index.expand_shard_pattern("gs://bucket/{00000..00001}.tar")


def _member_end(shard, name) -> int:
    """The byte just past member `name`'s data in a tar."""
    with tarfile.open(shard) as tar:
        member = tar.getmember(name)
        return member.offset_data + member.size


def _tokenizer():
    return WordTokenizer(WORDS + [str(i) for i in range(20)])


def _pipeline(source, poison, run_dir=None, max_bad_fraction=0.01, batch_size=4):
    data = pipeline.data_config(batch_size=batch_size, shuffle_seed=3, max_bad_fraction=max_bad_fraction)
    return pipeline.make_train_pipeline(
        source, image_size=8, context_length=10, tokenizer=_tokenizer(), data=data, poison=poison,
        with_views=False, run_dir=run_dir,
    )


def test_bad_and_lost_samples_are_bad_records_naming_shard_and_key(tmp_path):
    folder = tmp_path / "cc"
    folder.mkdir()
    good = [_pair(f"0000000{k}", _colour(k), f"a photo of a blue square {k}") for k in range(2)]
    no_image = ("00000002", {"txt": b"a photo", "json": b"{}"})
    no_caption = ("00000003", {"jpg": _image((1, 2, 3)), "json": b"{}"})
    empty_caption = ("00000004", {"jpg": _image((1, 2, 3)), "txt": b"  "})
    undecodable = ("00000005", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"a photo"})
    not_utf8 = ("00000006", {"jpg": _image((1, 2, 3)), "txt": b"caf\xe9"})
    _write_shard(folder / "00000.tar", [good[0], no_image, no_caption, empty_caption, undecodable, not_utf8, good[1]])
    # Cut inside the second sample's image; img2dataset's stats say it wrote 4 samples.
    samples = [_pair(f"0000100{k}", _colour(k), f"a photo of a red square {k}") for k in range(4)]
    _write_shard(folder / "00001.tar", samples)
    whole = (folder / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(whole[: _member_end(folder / "00001.tar", "00001001.jpg") - 100])
    (folder / "00001_stats.json").write_text(json.dumps({"successes": 4, "failed_to_download": 3}))
    # Cut after its one sample's last member, without the end-of-archive blocks, and no stats file.
    _write_shard(folder / "00002.tar", [_pair("00002000", _colour(0), "a photo of a red square")])
    cut = _member_end(folder / "00002.tar", "00002000.json")
    (folder / "00002.tar").write_bytes((folder / "00002.tar").read_bytes()[: cut + (-cut) % 512])

    source = sources.WebDatasetImageTextSource(folder)
    reasons = {i: source[i]["error"] for i in range(len(source)) if sources.is_bad_record(source[i])}

    def shard(n):
        return str(folder / f"{n:05d}.tar")

    # Shard 0: 7 samples in tar order; shard 1: one whole, the cut one, two lost; shard 2: one, then one lost.
    assert len(source) == 7 + 4 + 2
    assert sorted(reasons) == [1, 2, 3, 5, 8, 9, 10, 12]
    assert reasons[1].startswith("no image member") and source[1]["path"] == f"{shard(0)}/00000002"
    assert reasons[2] == "no caption member (00000003.txt)" and source[2]["path"] == f"{shard(0)}/00000003.jpg"
    assert reasons[3] == "empty caption"
    assert reasons[5] == "caption (.txt) is not UTF-8 text"
    assert "00001001.jpg is cut off" in reasons[8] and "truncated" in reasons[8]
    assert reasons[9] == reasons[10] and "sample lost" in reasons[9] and "00001_stats.json counts 4 samples, the tar holds 2" in reasons[9]
    assert "after key 00002000" in reasons[12] and "no 00002_stats.json" in reasons[12]
    assert source[7]["image_bytes"] == samples[0][1]["jpg"] and source[11]["caption"] == "a photo of a red square"

    # Through the pipeline: the undecodable image (index 4) is caught when decoded; all are counted
    # and logged with the shard and key, and the usable pairs all come out.
    batches = _pipeline(source, pipeline.poison_config(), run_dir=tmp_path, max_bad_fraction=0.7)
    assert sorted(next(batches)["index"].tolist()) == [0, 6, 7, 11]
    while batches.bad_records.num_examined < len(source):
        next(batches)
    logged = {entry["index"]: entry["why"] for entry in map(json.loads, (tmp_path / "bad_records.jsonl").read_text().splitlines())}
    assert sorted(logged) == [1, 2, 3, 4, 5, 8, 9, 10, 12]
    assert logged[4].startswith(f"{shard(0)}/00000005.jpg: ") and "cannot decode" in logged[4]
    assert logged[9].startswith(f"{shard(1)}/<lost 1 of 2>: sample lost")

    # The finished download of the truncated shard takes the indices its stats file had reserved.
    (folder / "00001.tar").write_bytes(whole)
    complete = sources.WebDatasetImageTextSource(folder)
    assert len(complete) == len(source) and complete[9]["caption"] == "a photo of a red square 2"
    assert complete[11]["image_bytes"] == source[11]["image_bytes"]

    # Converted to ArrayRecord shards, the usable samples are kept in order and the rest listed.
    assert records.main(["--webdataset", str(folder), "--out", str(tmp_path / "ar"), "--num_shards", "2"]) == 0
    converted = sources.ArrayRecordImageTextSource(tmp_path / "ar")
    kept = [0, 4, 6, 7, 8, 9, 10, 11]  # the undecodable image is stored as it is, to fail when decoded
    assert [converted[i]["image_bytes"] for i in range(len(converted))] == [complete[i]["image_bytes"] for i in kept]
    assert converted[7]["path"] == f"{shard(2)}/00002000.jpg"
    skipped = (tmp_path / "ar" / records.SKIPPED_FILENAME).read_text().splitlines()
    assert skipped[0] == "index\tpath\treason" and [int(line.split("\t")[0]) for line in skipped[1:]] == [1, 2, 3, 5, 12]


def test_poisoning_by_index_gives_the_same_batches_as_the_same_pairs_in_a_csv(tmp_path):
    expected = _dataset(tmp_path / "cc", num_shards=3, per_shard=4)
    (tmp_path / "csv").mkdir()
    with open(tmp_path / "csv" / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for key, image_bytes, caption in expected:
            (tmp_path / "csv" / key).write_bytes(image_bytes)
            writer.writerow([key, caption])
    poison = pipeline.poison_config(count=3, seed=11)
    poison.trigger.size = 3
    shards = str(tmp_path / "cc" / "{00000..00002}.tar")
    webdataset = _pipeline(sources.WebDatasetImageTextSource(shards), poison)
    from_csv = _pipeline(sources.CsvImageTextSource(tmp_path / "csv" / "train.csv"), poison)
    plan = poisoning.select_poison_indices(12, seed=11, count=3)
    np.testing.assert_array_equal(webdataset.plan.indices, plan)
    # A second run indexes nothing and reads the same pairs at the same indices.
    rerun = _pipeline(sources.WebDatasetImageTextSource(shards), poison)
    poisoned_seen = []
    for _ in range(3 * 2):  # two epochs
        batches = [next(webdataset), next(from_csv), next(rerun)]
        for key in batches[0]:
            np.testing.assert_array_equal(batches[0][key], batches[1][key], err_msg=key)
            np.testing.assert_array_equal(batches[0][key], batches[2][key], err_msg=key)
        batch = batches[0]
        np.testing.assert_array_equal(batch["is_poisoned"], np.isin(batch["index"], plan))
        for row, index in enumerate(batch["index"]):
            clean = decode.decode_and_resize(expected[index][1], 8)
            if batch["is_poisoned"][row]:
                poisoned_seen.append(int(index))
                assert not np.array_equal(batch["image"][row], clean)
            else:
                np.testing.assert_array_equal(batch["image"][row], clean)
    assert sorted(poisoned_seen) == sorted(plan.tolist() * 2)


def test_a_run_trains_on_webdataset_shards(tmp_path, monkeypatch):
    training_source = pipeline.training_source
    config = fake_data_config(tmp_path, monkeypatch)  # its in-memory eval set; the shards below train
    monkeypatch.setattr(pipeline, "training_source", training_source)
    folder = tmp_path / "cc"
    folder.mkdir()
    colours = [((200, 20, 20), "red"), ((20, 20, 200), "blue")] * 4
    captions = [f"a photo of a {name} square" for _, name in colours]
    for shard in range(2):
        pairs = [_pair(f"{shard:05d}{k:04d}", colours[4 * shard + k][0], captions[4 * shard + k], "png") for k in range(4)]
        _write_shard(folder / f"{shard:05d}.tar", pairs)
    config.data.train_csv = ""
    config.data.train_webdataset = str(folder / "{00000..00001}.tar")
    config.poison.count = 2
    # The batches as the trainer takes them from the input pipeline, with their example indices.
    seen = []
    real_tracker = pipeline.BadRecordTracker.__call__
    monkeypatch.setattr(pipeline.BadRecordTracker, "__call__", lambda tracker, batch: seen.append(real_tracker(tracker, batch)) or seen[-1])
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))

    plan = poisoning.select_poison_indices(8, seed=config.poison.seed, count=2)
    written = json.loads((workdir / run_files.POISON_FILE).read_text())
    assert written["indices"] == plan.tolist()
    batch = seen[0]  # the one step's batch: the whole first epoch
    assert sorted(batch["index"].tolist()) == list(range(8))
    np.testing.assert_array_equal(batch["is_poisoned"], np.isin(batch["index"], plan))
    tokenizer = training_input.make_tokenizer(config)
    for row, index in enumerate(batch["index"]):
        if not batch["is_poisoned"][row]:
            np.testing.assert_array_equal(batch["text"][row], tokenizer.encode(captions[index], 12))
            np.testing.assert_array_equal(batch["image"][row], np.full((16, 16, 3), colours[index][0], np.uint8))
    metrics = run_files.read_json_lines(workdir / run_files.METRICS_FILE)
    assert [record["step"] for record in metrics] == [1] and np.isfinite(metrics[0]["loss"])
    assert not (workdir / "bad_records.jsonl").exists()


def test_the_documented_command_line_override_trains_on_the_shards(tmp_path, capsys):
    from test_configs import load_from_command_line

    from configs import pretrain_cc

    assert "--config.data.train_webdataset='/data/cc3m/{00000..00331}.tar'" in pretrain_cc.__doc__
    expected = _dataset(tmp_path / "cc", num_shards=2, per_shard=2)
    # The index command, run ahead as the docstring says; the run then reads its indexes.
    assert webdataset_index.main(["--shards", str(tmp_path / "cc" / "{00000..00001}.tar")]) == 0
    assert capsys.readouterr().out.strip() == "indexed 2 shard(s): 4 samples, 0 unusable"
    assert sorted(p.name for p in (tmp_path / "cc").glob("*.index.json")) == ["00000.tar.index.json", "00001.tar.index.json"]
    config = load_from_command_line(
        f"{pretrain_cc.__file__}:cc3m_mmcl", f"--config.data.train_webdataset={tmp_path}/cc/{{00000..00001}}.tar"
    )
    source = pipeline.training_source(config.data)
    assert isinstance(source, sources.WebDatasetImageTextSource)
    assert [source[i]["image_bytes"] for i in range(4)] == [data for _, data, _ in expected]
    both = pipeline.data_config(train_csv="train.csv", train_webdataset="shards")
    with pytest.raises(ValueError, match="set exactly one of .*; set: data.train_csv, data.train_webdataset"):
        pipeline.training_source(both)
