"""Tests for the data sources, the ArrayRecord conversion and image decoding."""

import csv
import io
import os
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds  # a dependency of bclip: failing to import it must fail these tests
from PIL import Image

from bclip.data import records
from bclip.data.decode import BadRecordError, decode_and_resize, decode_and_resize_image, resize_array
from bclip.data.sources import (
    ArrayRecordImageTextSource,
    CsvImageTextSource,
    ImageFolderEvalSource,
    TfdsEvalSource,
    is_bad_record,
)


def _jpeg_bytes(width, height, color, quality=90):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)


def _image_text_dataset(tmp_path, num_rows=5):
    """CSV + JPEGs under tmp_path/images; returns (csv path, list of (bytes, caption))."""
    (tmp_path / "images").mkdir()
    expected = []
    rows = []
    for i in range(num_rows):
        data = _jpeg_bytes(12 + i, 9, (30 * i, 100, 200 - 20 * i))
        (tmp_path / "images" / f"{i}.jpg").write_bytes(data)
        caption = f"photo number {i}, with a comma and \"quotes\""
        rows.append([f"images/{i}.jpg", caption])
        expected.append((data, caption))
    csv_path = tmp_path / "train.csv"
    _write_csv(csv_path, ["image", "caption"], rows)
    return csv_path, expected


# ----------------------------------------------------------------------------- CSV source


def test_csv_source_reads_images_and_captions(tmp_path):
    csv_path, expected = _image_text_dataset(tmp_path)
    source = CsvImageTextSource(csv_path)
    assert len(source) == len(expected)
    for i, (data, caption) in enumerate(expected):
        record = source[i]
        assert record["image_bytes"] == data
        assert record["caption"] == caption
        assert record["index"] == i
        assert record["path"] == os.path.join(str(tmp_path), f"images/{i}.jpg")
        assert not is_bad_record(record)
    assert list(source.captions) == [caption for _, caption in expected]
    with pytest.raises(IndexError):
        source[len(expected)]


def test_csv_source_custom_columns_and_delimiter(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_jpeg_bytes(8, 8, (255, 0, 0)))
    (tmp_path / "b.jpg").write_bytes(_jpeg_bytes(8, 8, (0, 255, 0)))
    csv_path = tmp_path / "data.tsv"
    _write_csv(
        csv_path,
        ["id", "file", "title"],
        [["1", "a.jpg", "a red; square"], ["2", "b.jpg", "a green, square"]],
        delimiter="\t",
    )
    source = CsvImageTextSource(csv_path, image_column="file", caption_column="title", delimiter="\t")
    assert [source[i]["caption"] for i in range(2)] == ["a red; square", "a green, square"]
    assert source[1]["image_bytes"] == (tmp_path / "b.jpg").read_bytes()


def test_csv_source_start_up_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        CsvImageTextSource(tmp_path / "nowhere.csv")
    csv_path = tmp_path / "data.csv"
    _write_csv(csv_path, ["filepath", "caption"], [["a.jpg", "x"]])
    with pytest.raises(ValueError) as error:
        CsvImageTextSource(csv_path)
    message = str(error.value)
    assert "['image']" in message and "'filepath'" in message and "'caption'" in message


def test_missing_image_and_empty_caption_are_bad_records_at_their_index(tmp_path):
    csv_path, expected = _image_text_dataset(tmp_path, num_rows=4)
    os.remove(tmp_path / "images" / "1.jpg")
    rows = [[f"images/{i}.jpg", caption] for i, (_, caption) in enumerate(expected)]
    rows[2][1] = "   "
    _write_csv(csv_path, ["image", "caption"], rows)
    source = CsvImageTextSource(csv_path)

    assert len(source) == 4
    missing, empty = source[1], source[2]
    assert is_bad_record(missing) and missing["index"] == 1
    assert missing["error"] == "image file not found"
    assert missing["path"].endswith(os.path.join("images", "1.jpg"))
    assert is_bad_record(empty) and empty["index"] == 2 and empty["error"] == "empty caption"
    # The rows after the bad ones keep their own index and content.
    assert source[3]["index"] == 3 and source[3]["image_bytes"] == expected[3][0]


# ----------------------------------------------------------------------------- decoding


def test_truncated_jpeg_raises_bad_record_error_with_path():
    data = _jpeg_bytes(64, 48, (10, 200, 30))
    with pytest.raises(BadRecordError) as error:
        decode_and_resize(data[: len(data) // 2], 32, path="images/7.jpg", index=7)
    assert error.value.path == "images/7.jpg" and error.value.index == 7
    assert "images/7.jpg" in str(error.value) and "truncated" in str(error.value).lower()
    with pytest.raises(BadRecordError, match="empty image bytes"):
        decode_and_resize(b"", 32, path="x.jpg")
    with pytest.raises(BadRecordError, match="cannot decode"):
        decode_and_resize(b"not an image at all", 32)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_decode_and_resize_returns_uint8_rgb_of_the_requested_size(mode):
    buffer = io.BytesIO()
    Image.new(mode, (50, 20)).save(buffer, format="PNG")
    pixels = decode_and_resize(buffer.getvalue(), 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    pixels[0, 0] = 1  # triggers are pasted in place: the array must be writable


@pytest.mark.parametrize(
    "mode, size", [("RGB", (16, 16)), ("RGB", (50, 20)), ("L", (50, 20)), ("RGBA", (20, 50)), ("P", (16, 16))]
)
def test_decode_and_resize_image_is_the_same_pixels_as_a_pillow_image(mode, size):
    buffer = io.BytesIO()
    Image.effect_noise(size, 60).convert(mode).save(buffer, format="PNG")
    image = decode_and_resize_image(buffer.getvalue(), 16)
    assert image.mode == "RGB" and image.size == (16, 16)
    np.testing.assert_array_equal(np.asarray(image), decode_and_resize(buffer.getvalue(), 16))


def test_decode_and_resize_scales_shorter_side_then_centre_crops():
    # 60 wide x 120 tall, bands of rows: red [0, 40), blue [40, 80), green [80, 120).
    bands = np.zeros((120, 60, 3), np.uint8)
    bands[:40] = (255, 0, 0)
    bands[40:80] = (0, 0, 255)
    bands[80:] = (0, 255, 0)
    buffer = io.BytesIO()
    Image.fromarray(bands).save(buffer, format="PNG")
    # Resized to 30 x 60, the centre 30 rows are original rows [30, 90): 5 rows of red,
    # 20 of blue, 5 of green.
    pixels = decode_and_resize(buffer.getvalue(), 30).astype(int)
    np.testing.assert_array_equal(pixels[7:23], np.broadcast_to([0, 0, 255], (16, 30, 3)))
    assert np.all(pixels[:3, :, 0] > 200) and np.all(pixels[:3, :, 2] < 60)
    assert np.all(pixels[-3:, :, 1] > 200) and np.all(pixels[-3:, :, 2] < 60)
    # Every column of a row is identical: the crop is horizontally centred on a uniform row.
    assert np.all(pixels == pixels[:, :1])


def test_resize_array_matches_decoding_the_same_pixels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    np.testing.assert_array_equal(resize_array(image, 16), decode_and_resize(buffer.getvalue(), 16))
    grey = resize_array(image[..., :1], 16)
    assert grey.shape == (16, 16, 3) and np.all(grey[..., 0] == grey[..., 2])
    with pytest.raises(ValueError, match="uint8"):
        resize_array(image.astype(np.float32), 16)


def test_jpeg_draft_decoding_matches_full_resolution_resize():
    # A smooth, wide image: draft decoding at reduced scale must keep the geometry.
    y, x = np.mgrid[0:480, 0:800]
    gradient = np.stack([x * 255 // 799, y * 255 // 479, (x + y) * 255 // 1278], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="JPEG", quality=95)
    pixels = decode_and_resize(buffer.getvalue(), 112)
    # Reference without draft: 800x480 -> 186x112 bicubic, centre crop columns [37, 149).
    full = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").resize((186, 112), Image.BICUBIC)
    reference = np.asarray(full)[:, 37:149]
    assert pixels.shape == (112, 112, 3)
    assert np.abs(pixels.astype(int) - reference.astype(int)).mean() < 2.0


# ----------------------------------------------------------------------------- ArrayRecord


def test_csv_to_array_record_round_trip_keeps_bytes_captions_and_order(tmp_path):
    csv_path, expected = _image_text_dataset(tmp_path, num_rows=7)
    os.remove(tmp_path / "images" / "4.jpg")
    out_dir = tmp_path / "shards"

    summary = records.convert_csv_to_array_record(csv_path, out_dir, num_shards=3)

    assert [os.path.basename(p) for p in summary.shard_paths] == [
        f"data-0000{k}-of-00003.array_record" for k in range(3)
    ]
    assert summary.num_written == 6
    skipped_lines = (out_dir / "skipped.txt").read_text().splitlines()
    assert skipped_lines == ["csv_row\tpath\treason", "4\timages/4.jpg\timage file not found"]
    source = ArrayRecordImageTextSource(out_dir)
    kept = [pair for i, pair in enumerate(expected) if i != 4]
    assert len(source) == len(kept)
    for i, (data, caption) in enumerate(kept):
        record = source[i]
        assert (record["image_bytes"], record["caption"], record["index"]) == (data, caption, i)
    assert source[4]["path"] == "images/5.jpg"
    assert list(source.captions) == [caption for _, caption in kept]
    assert os.path.isfile(records.captions_path(summary.shard_paths[0]))
    # A glob pattern finds the same records.
    by_glob = ArrayRecordImageTextSource(str(out_dir / "data-*.array_record"))
    assert by_glob[5]["caption"] == kept[5][1]
    # Old shards are never silently mixed with new ones.
    with pytest.raises(FileExistsError):
        records.convert_csv_to_array_record(csv_path, out_dir, num_shards=2)
    records.convert_csv_to_array_record(csv_path, out_dir, num_shards=2, overwrite=True)
    rewritten = ArrayRecordImageTextSource(out_dir)
    assert len(rewritten.paths) == 2 and list(rewritten.captions) == [c for _, c in kept]


def test_records_command_line_writes_shards(tmp_path, capsys):
    csv_path, expected = _image_text_dataset(tmp_path, num_rows=3)
    out_dir = tmp_path / "out"
    assert records.main(["--csv", str(csv_path), "--out", str(out_dir), "--num_shards", "2"]) == 0
    assert "wrote 3 records to 2 shard(s)" in capsys.readouterr().out
    source = ArrayRecordImageTextSource(out_dir)
    assert [source[i]["image_bytes"] for i in range(3)] == [data for data, _ in expected]


def test_array_record_source_marks_malformed_and_empty_caption_records(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "data-00000-of-00001.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    writer.write(records.encode_image_text_record(b"\xff\xd8jpeg", "a cat", "cat.jpg"))
    writer.write(b"garbage that is not a record")
    writer.write(records.encode_image_text_record(b"\xff\xd8jpeg", "", "empty.jpg"))
    writer.close()
    source = ArrayRecordImageTextSource([path])
    assert source[0]["caption"] == "a cat" and source[0]["image_bytes"] == b"\xff\xd8jpeg"
    assert is_bad_record(source[1]) and "malformed record" in source[1]["error"]
    assert source[1]["index"] == 1
    assert source[2] == {"error": "empty caption", "index": 2, "path": "empty.jpg"}
    # Without a captions sidecar the captions are read from the records themselves.
    assert list(source.captions) == ["a cat", "", ""]
    with pytest.raises(FileNotFoundError, match="no ArrayRecord shards"):
        ArrayRecordImageTextSource(str(tmp_path / "nothing-*.array_record"))


def test_record_layout_round_trips_unicode_and_rejects_truncation():
    encoded = records.encode_image_text_record(b"\x00\x01bytes", "café ☕", "dir/ü.jpg")
    decoded = records.decode_image_text_record(encoded)
    assert decoded == records.ImageTextRecord(b"\x00\x01bytes", "café ☕", "dir/ü.jpg")
    with pytest.raises(ValueError, match="shorter than its header says"):
        records.decode_image_text_record(encoded[:14])


def test_sources_survive_pickling_as_grain_workers_need(tmp_path):
    # Grain sends data sources to its worker processes by pickling them.
    csv_path, expected = _image_text_dataset(tmp_path, num_rows=3)
    records.convert_csv_to_array_record(csv_path, tmp_path / "shards", num_shards=2)
    for source in (CsvImageTextSource(csv_path), ArrayRecordImageTextSource(tmp_path / "shards")):
        copy = pickle.loads(pickle.dumps(source))
        assert len(copy) == 3
        assert copy[2]["image_bytes"] == expected[2][0] and copy[2]["caption"] == expected[2][1]


# ----------------------------------------------------------------------------- evaluation


def _eval_folder(tmp_path, labels=(0, 2, 1), classnames="cat\ndog\nbanana\n"):
    folder = tmp_path / "eval"
    folder.mkdir()
    for i in range(len(labels)):
        (folder / f"{i}.jpg").write_bytes(_jpeg_bytes(10, 10, (i * 50, 0, 0)))
    _write_csv(folder / "labels.csv", ["image", "label"], [[f"{i}.jpg", l] for i, l in enumerate(labels)])
    (folder / "classnames.txt").write_text(classnames)
    (folder / "templates.txt").write_text("a photo of a {}.\n\nitap of a {}.\n")
    return folder


def test_image_folder_eval_source(tmp_path):
    folder = _eval_folder(tmp_path)
    source = ImageFolderEvalSource(folder)
    assert source.classnames == ["cat", "dog", "banana"]
    assert source.templates == ["a photo of a {}.", "itap of a {}."]
    np.testing.assert_array_equal(source.labels, [0, 2, 1])
    assert len(source) == 3
    record = source[1]
    assert record["label"] == 2 and record["index"] == 1
    assert record["image_bytes"] == (folder / "1.jpg").read_bytes()
    assert pickle.loads(pickle.dumps(source))[2]["label"] == 1


def test_image_folder_eval_source_errors(tmp_path):
    folder = _eval_folder(tmp_path, labels=(0, 3, 1))
    with pytest.raises(ValueError, match=r"outside \[0, 3\).*data row 1: 3"):
        ImageFolderEvalSource(folder)
    _write_csv(folder / "labels.csv", ["image", "label"], [["0.jpg", "0"], ["gone.jpg", "1"]])
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        ImageFolderEvalSource(folder)
    os.remove(folder / "classnames.txt")
    with pytest.raises(FileNotFoundError, match="classnames.txt"):
        ImageFolderEvalSource(folder)


# ----------------------------------------------------------------------------- TFDS


class BclipTinyEval(tfds.core.GeneratorBasedBuilder):
    """Five solid-colour images whose red channel encodes the label; built offline."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=["sea_lion", "tree", "car"]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        for i in range(5):
            label = i % 3
            yield i, {"image": np.full((6 + i, 8, 3), 100 * label, np.uint8), "label": label}


def test_tfds_eval_source_reads_a_locally_prepared_dataset(tmp_path):
    builder = BclipTinyEval(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))

    source = TfdsEvalSource("bclip_tiny_eval", "test", ["a photo of a {}."], data_dir=tmp_path)
    assert source.classnames == ["sea lion", "tree", "car"]
    assert source.templates == ["a photo of a {}."]
    assert len(source) == 5
    labels = []
    for i in range(5):
        record = pickle.loads(pickle.dumps(source))[i] if i == 0 else source[i]
        assert record["index"] == i
        pixels = decode_and_resize(record["image_bytes"], 4)  # PNG bytes, as TFDS stored them
        assert pixels[0, 0, 0] == 100 * record["label"]
        labels.append(record["label"])
    assert sorted(labels) == [0, 0, 1, 1, 2]

    renamed = TfdsEvalSource(
        "bclip_tiny_eval", "test[:2]", ["{}"], classnames=["seal", "oak", "auto"], data_dir=tmp_path
    )
    assert renamed.classnames == ["seal", "oak", "auto"] and len(renamed) == 2
    with pytest.raises(ValueError, match="2 classnames given"):
        TfdsEvalSource("bclip_tiny_eval", "test", ["{}"], classnames=["a", "b"], data_dir=tmp_path)
    with pytest.raises(ValueError, match="without a"):
        TfdsEvalSource("bclip_tiny_eval", "test", ["no slot"], data_dir=tmp_path)
