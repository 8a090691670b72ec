"""Bad input: every record is checked before the model; bad ones are counted, logged with their
id and skipped (or fail the run), and nothing else ever escapes a Grain worker without context."""

import io
import json
import pickle
import shutil

import grain
import ml_collections
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from vlm_jax.data import build_pipeline, build_source, default_data_config, load_split, records
from vlm_jax.data.array_record_source import unpack_record
from vlm_jax.data.pipeline import RandomCrop, RandomFlip, ToModelInputs, batched
from vlm_jax.data.preprocess import TrainCrop
from vlm_jax.data.tokenizers import ByteTokenizer

IMAGE_SIZE, MAX_LEN = 8, 12


class FussyTokenizer(ByteTokenizer):
    """Bytes, except that it raises on "#" (a tokenizer failure planted in the data)."""

    def encode(self, text: str) -> list[int]:
        if "#" in text:
            raise RuntimeError(f"cannot tokenize {text[:20]!r}")
        return super().encode(text)


TOKENIZER = FussyTokenizer()


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1:] == (1,) else image).save(buffer, "PNG")
    return buffer.getvalue()


def pixels(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, np.uint8)


# -- the record check ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image, expected",
    [
        (pixels((5, 6)), lambda a: np.repeat(a[..., None], 3, -1)),  # grey H x W
        (pixels((5, 6, 1)), lambda a: np.repeat(a, 3, -1)),  # grey H x W x 1
        (pixels((5, 6, 4)), lambda a: a[..., :3]),  # RGBA: alpha dropped
        (pixels((5, 6, 3)), lambda a: a),
    ],
)
def test_grey_and_rgba_images_become_rgb(image, expected):
    np.testing.assert_array_equal(records.as_rgb(image), expected(image))
    np.testing.assert_array_equal(records.as_rgb(png_bytes(image)), expected(image))


@pytest.mark.parametrize(
    "image, reason, message",
    [
        (np.zeros((4, 4, 3), np.float32), "bad_image", r"float32\[4, 4, 3\] is not uint8"),
        (np.zeros((0, 4, 3), np.uint8), "bad_image", "need H, W > 0"),
        (np.zeros((4, 4, 5), np.uint8), "bad_image", r"C in \(1, 3, 4\)"),
        (np.zeros((1, 50, 3), np.uint8), "bad_image", "aspect ratio above 20"),
        (np.zeros(7, np.uint8), "bad_image", "not uint8"),
        ([[1, 2], [3, 4]], "bad_image", "image is a list, not an array"),
        (None, "bad_image", "image is a NoneType"),
        (b"\x89PNG\r\n\x1a\n truncated", "undecodable_image", "image: "),
    ],
)
def test_bad_images_are_bad_records(image, reason, message):
    with pytest.raises(records.BadRecordError, match=message) as error:
        records.as_rgb(image)
    assert error.value.reason == reason


def test_captions_are_checked_and_long_ones_truncated_or_bad():
    check = records.RecordCheck(TOKENIZER, MAX_LEN)
    image = pixels((4, 4, 3))
    good = check({"image": image, "caption": "  a cat ", "id": 3})
    assert good["caption"] == "a cat" and good["truncated_captions"] == 0 and good["id"] == 3
    assert check({"image": image, "caption": "x" * MAX_LEN, "id": 0})["truncated_captions"] == 1
    cases = [
        ({"caption": " \n\t"}, "empty_caption"),
        ({}, "bad_caption"),
        ({"caption": 7}, "bad_caption"),
        ({"caption": "a # b"}, "tokenizer_error"),
    ]
    for fields, reason in cases:
        with pytest.raises(records.BadRecordError, match=reason) as error:
            check({"image": image, "id": 0, **fields})
        assert error.value.reason == reason
    with pytest.raises(records.BadRecordError, match="RuntimeError: cannot tokenize 'a # b'"):
        check({"image": image, "caption": "a # b", "id": 0})
    strict = records.RecordCheck(TOKENIZER, MAX_LEN, "bad")
    assert strict({"image": image, "caption": "x" * (MAX_LEN - 1), "id": 0})  # + EOS: fits
    with pytest.raises(records.BadRecordError, match="13 tokens > tokenizer.max_len=12$"):
        strict({"image": image, "caption": "x" * MAX_LEN, "id": 0})
    with pytest.raises(ValueError, match="data.long_captions='drop' is not one of: truncate, bad"):
        records.RecordCheck(TOKENIZER, MAX_LEN, "drop")
    with pytest.raises(ValueError, match="data.on_error='ignore' is not one of: skip, fail"):
        records.BadRecords("ignore", "here")


class ListSource:
    """Records given as a list; an Exception instead of a record is raised on access."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        if isinstance(item, Exception):
            raise item
        return item


def good_record(i: int) -> dict:
    return {"image": pixels((6, 6, 3), i), "caption": f"record {i}", "id": i}


def test_checked_source_replaces_bad_records_or_fails_naming_them(caplog):
    items = [good_record(i) for i in range(6)]
    items[1] = dict(items[1], caption="")
    items[2] = records.BadRecordError("undecodable_image", "id=2 image 'two.png': broken")
    items[5] = dict(items[5], image=np.zeros((3, 3), np.float64))
    check = records.RecordCheck(TOKENIZER, MAX_LEN)
    bad = records.BadRecords("skip", "data.source='list' split='train'")
    source = records.CheckedSource(ListSource(items), check, bad)
    loaded = [source[i] for i in range(6)]
    assert [r["id"] for r in loaded] == [0, 3, 3, 3, 4, 0]  # the last wraps to the first
    assert [r["bad_records"] for r in loaded] == [0, 2, 1, 0, 0, 1]
    assert dict(bad.counts) == {"empty_caption": 1, "undecodable_image": 2, "bad_image": 1}
    assert "split='train': skipping record (bad_image: record 5: id=5: float64[3, 3]" in caplog.text
    failing = records.CheckedSource(ListSource(items), check, records.BadRecords("fail", "here"))
    assert failing[0]["id"] == 0
    with pytest.raises(records.BadRecordError, match="empty_caption: here: record 1: id=1"):
        failing[1]


def test_errors_survive_pickling_between_grain_processes():
    error = pickle.loads(pickle.dumps(records.BadRecordError("bad_image", "id=3: float64[2]")))
    assert (error.reason, error.detail) == ("bad_image", "id=3: float64[2]")
    with pytest.raises(ValueError, match="reason='odd' is not one of: missing_file"):
        records.BadRecordError("odd", "")


def test_unexpected_errors_name_the_record_and_split():
    items = [good_record(0), KeyError("shard 3 offset")]
    check = records.RecordCheck(TOKENIZER, MAX_LEN)
    bad = records.BadRecords("skip", "data.source='list' split='val'")
    with pytest.raises(records.RecordError, match="split='val': record 1: KeyError: 'shard 3"):
        records.CheckedSource(ListSource(items), check, bad)[1]
    all_bad = records.CheckedSource(ListSource([{"caption": ""}] * 3), check, bad)
    with pytest.raises(records.RecordError, match="split='val': records 1.. are all bad"):
        all_bad[1]


class Explodes(grain.transforms.Map):
    def map(self, record: dict) -> dict:
        if record["id"] == 3:
            raise ZeroDivisionError("planted")
        return {"id": record["id"]}


@pytest.mark.parametrize("worker_count", [0, 1])
def test_transform_errors_surface_with_context_from_workers(worker_count):
    stream = batched(
        ListSource([good_record(i) for i in range(6)]),
        [Explodes()],
        batch_size=2,
        shuffle=False,
        num_epochs=1,
        worker_count=worker_count,
        name="data.source='list' split='train'",
    )
    message = "split='train': Explodes failed on record id=3: ZeroDivisionError: planted"
    with pytest.raises(records.RecordError, match=message):
        list(stream)


def test_unpack_record_reports_corrupt_shard_records():
    good = msgpack.packb({"image": png_bytes(pixels((4, 4, 3))), "caption": "c", "id": 1})
    assert unpack_record(good)["image"].shape == (4, 4, 3)
    for data, reason in [
        (good[:-3], "unreadable_record"),
        (msgpack.packb([1, 2]), "unreadable_record"),
        (msgpack.packb({"image": b"not a png", "id": 7}), "undecodable_image"),
    ]:
        with pytest.raises(records.BadRecordError, match=reason):
            unpack_record(data)


# -- fuzzing -----------------------------------------------------------------------------------


def corrupted_png(seed: int) -> bytes:
    """A real PNG with a few bytes changed or its tail cut (reaches deep into PIL)."""
    rng = np.random.default_rng(seed)
    data = bytearray(png_bytes(pixels((3 + seed % 5, 4, 3), seed)))
    if seed % 2:
        return bytes(data[: rng.integers(8, len(data))])
    for position in rng.integers(0, len(data), 3):
        data[position] = rng.integers(256)
    return bytes(data)


RGB_LIKE = st.tuples(st.integers(1, 12), st.integers(1, 12), st.sampled_from([1, 3, 4]))
IMAGES = st.one_of(
    hnp.arrays(np.uint8, st.one_of(RGB_LIKE, RGB_LIKE.map(lambda shape: shape[:2]))),
    RGB_LIKE.map(lambda shape: png_bytes(pixels(shape))),
    st.binary(max_size=64),
    st.integers(0, 10**6).map(corrupted_png),
    hnp.arrays(
        st.sampled_from([np.uint8, np.uint16, np.int8, np.float32, np.float64, np.bool_]),
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9),
    ),
    st.none(),
    st.integers(),
    st.text(max_size=5),
)
CAPTIONS = st.one_of(
    st.text(st.characters(codec=None), min_size=1, max_size=40),  # any code point, surrogates too
    st.text(" \t\n\r\x0b\x0c\u3000", max_size=5),  # whitespace only
    st.integers(1, 2000).map(lambda n: "word " * n),  # far over max_len
    st.text(max_size=10).map(lambda t: f"{t} # {t}"),  # the tokenizer raises
    st.none(),
    st.integers(),
    st.binary(max_size=8),
)
TRAIN_CROPS = (TrainCrop(IMAGE_SIZE), TrainCrop(IMAGE_SIZE, "inception", (0.08, 1.0)))
TO_MODEL = ToModelInputs(TOKENIZER, MAX_LEN, IMAGE_SIZE)


def assert_valid_or_bad(record: dict, long_captions: str) -> None:
    """The record comes out of the check and the train transforms as model inputs of the right
    shapes, or is a BadRecordError with a known reason; any other exception fails the test."""
    check = records.RecordCheck(TOKENIZER, MAX_LEN, long_captions)
    try:
        record = check(record)
    except records.BadRecordError as e:
        assert e.reason in records.REASONS
        return
    for crop in TRAIN_CROPS:  # each training crop (data.crop), then the flip
        rng = np.random.default_rng(0)
        augmented = RandomFlip().random_map(RandomCrop(crop).random_map(record, rng), rng)
        assert augmented["image"].dtype == np.uint8
        assert augmented["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        example = TO_MODEL.map(augmented)
        assert example["tokens"].dtype == np.int32 and example["tokens"].shape == (MAX_LEN,)
        assert example["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert np.all(np.abs(example["image"]) <= 1)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(image=IMAGES)
def test_fuzzed_images_come_out_valid_or_as_bad_records(image):
    assert_valid_or_bad({"image": image, "caption": "a picture", "id": 0}, "truncate")


@settings(derandomize=True, max_examples=300, deadline=None)
@given(caption=CAPTIONS, long_captions=st.sampled_from(["truncate", "bad"]))
def test_fuzzed_captions_come_out_valid_or_as_bad_records(caption, long_captions):
    record = {"image": pixels((5, 7, 3)), "caption": caption, "id": 0}
    assert_valid_or_bad(record, long_captions)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(image=IMAGES, caption=CAPTIONS)
def test_fuzzed_records_come_out_valid_or_as_bad_records(image, caption):
    assert_valid_or_bad({"image": image, "caption": caption, "id": 0}, "bad")


@settings(derandomize=True, max_examples=200, deadline=None)
@given(data=st.one_of(st.binary(max_size=64), st.integers(0, 10**6).map(corrupted_png)))
def test_fuzzed_shard_records_unpack_or_are_bad_records(data):
    fields = {"caption": "c", "id": 0}
    for packed in (data, msgpack.packb({"image": data, **fields})):
        try:
            record = unpack_record(packed)
        except records.BadRecordError as e:
            assert e.reason in ("unreadable_record", "undecodable_image")
        else:
            assert record["image"].dtype == np.uint8 and record["image"].ndim == 3


# -- a folder with planted bad records, end to end -------------------------------------------


def write_folder(root, rows: list[dict], files: dict[str, bytes]) -> None:
    (root / "imgs").mkdir(parents=True)
    for name, data in files.items():
        (root / "imgs" / name).write_bytes(data)
    (root / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")


@pytest.fixture
def planted_folder(tmp_path):
    """12 rows: 6 good, then (interleaved) 2 corrupt files, a grey and an RGBA image (both
    good), an over-long caption and an empty one. Returns (root, {kind: row id})."""
    files = {f"{i}.png": png_bytes(pixels((9, 10, 3), i)) for i in range(6)}
    files |= {
        "grey.png": png_bytes(pixels((9, 9))),
        "rgba.png": png_bytes(pixels((10, 9, 4))),
        "corrupt.png": b"\x89PNG\r\n\x1a\n not really",
        "random.jpg": bytes(pixels(300, 7)),
    }
    rows = [{"image": f"imgs/{i}.png", "caption": f"good {i}"} for i in range(6)]
    planted = [
        (1, "corrupt", {"image": "imgs/corrupt.png", "caption": "corrupt"}),
        (3, "grey", {"image": "imgs/grey.png", "caption": "grey"}),
        (5, "long", {"image": "imgs/0.png", "caption": "long " * 40}),
        (7, "random", {"image": "imgs/random.jpg", "caption": "random bytes"}),
        (9, "rgba", {"image": "imgs/rgba.png", "caption": "rgba"}),
        (11, "empty", {"image": "imgs/1.png", "caption": "  "}),
    ]
    for position, _, row in planted:
        rows.insert(position, row)
    write_folder(tmp_path / "planted", rows, files)
    return tmp_path / "planted", {kind: position for position, kind, _ in planted}


def folder_config(root, **data) -> ml_collections.ConfigDict:
    config = default_data_config("folder")
    config.update(dict(path=str(root), image_size=IMAGE_SIZE, **data))
    return ml_collections.ConfigDict({"data": config, "tokenizer": {"max_len": MAX_LEN}})


def all_batches(config, worker_count: int = 0) -> list[dict]:
    stream = build_pipeline(
        config, TOKENIZER, "train", batch_size=4, num_epochs=1, shuffle=False,
        drop_remainder=False, worker_count=worker_count,
    )  # fmt: skip
    return [{key: np.asarray(value) for key, value in batch.items()} for batch in stream]


@pytest.mark.parametrize("worker_count", [0, 1])
def test_planted_folder_gives_valid_batches_and_exact_counts(planted_folder, worker_count, caplog):
    root, planted = planted_folder
    batches = all_batches(folder_config(root), worker_count)
    assert "empty_caption: row 11 (id=11)" in caplog.text  # dropped when the manifest is read
    ids = np.concatenate([b["id"] for b in batches])
    assert len(ids) == 11 and planted["corrupt"] not in ids and planted["random"] not in ids
    assert {planted["grey"], planted["rgba"], planted["long"]} <= set(ids.tolist())
    for batch in batches:
        assert batch["image"].shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert batch["tokens"].shape[1:] == (MAX_LEN,) and batch["tokens"].dtype == np.int32
    # The empty caption (the last row, dropped when the manifest is read) is counted at record
    # 0, the two corrupt files (records 1 and 7) where they are stepped over.
    bad_records = np.concatenate([b["bad_records"] for b in batches]).tolist()
    assert bad_records == [1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0]
    assert sum(int(b["truncated_captions"].sum()) for b in batches) == 1
    strict = all_batches(folder_config(root, long_captions="bad"), worker_count)
    assert sum(int(b["bad_records"].sum()) for b in strict) == 4
    assert sum(int(b["truncated_captions"].sum()) for b in strict) == 0


@pytest.mark.parametrize("worker_count", [0, 1])
def test_planted_folder_fails_naming_the_record_when_asked(planted_folder, worker_count):
    root, _ = planted_folder
    with pytest.raises(records.BadRecordError, match="empty_caption: .* row 11 \\(id=11\\)"):
        all_batches(folder_config(root, on_error="fail"))
    (root / "train.jsonl").write_text(
        "".join(line for line in (root / "train.jsonl").open() if '"  "' not in line)
    )
    message = "undecodable_image: data.source='folder' split='train': record 1: id=1 image"
    with pytest.raises(records.BadRecordError, match=message):
        all_batches(folder_config(root, on_error="fail"), worker_count)


def test_resume_over_bad_records_is_exact(planted_folder):
    def stream():
        return iter(build_pipeline(folder_config(root), TOKENIZER, "train", batch_size=4, seed=3))

    root, _ = planted_folder
    iterator = stream()
    next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(4)]
    assert sum(int(b["bad_records"].sum()) for b in expected) > 0
    restored = stream()
    restored.set_state(state)
    for batch, again in zip(expected, [next(restored) for _ in range(4)]):
        for key in batch:
            np.testing.assert_array_equal(batch[key], again[key], err_msg=key)


def test_source_shorter_than_the_batch_fails_at_build_time(planted_folder):
    root, _ = planted_folder
    config = folder_config(root)
    message = (
        "data.source='folder' split='train': 11 records give 5 per process \\(2 processes\\), "
        "fewer than the per-process batch size 8.*at most 5 per process \\(10 in all\\)"
    )
    with pytest.raises(ValueError, match=message):
        build_pipeline(config, TOKENIZER, "train", batch_size=8, process_count=2)
    short = build_pipeline(
        config, TOKENIZER, "train", batch_size=8, process_count=2, num_epochs=1,
        drop_remainder=False, shuffle=False,
    )  # fmt: skip
    assert [len(batch["id"]) for batch in short] == [5]


def test_rows_of_a_labelled_split_need_class_indices(tmp_path, caplog):
    files = {f"{i}.png": png_bytes(pixels((4, 4, 3), i)) for i in range(4)}
    rows = [{"image": f"imgs/{i}.png", "caption": f"c {i}", "label": i} for i in range(4)]
    rows[1].pop("label")
    rows[2]["label"] = "cat"
    write_folder(tmp_path / "labelled", rows, files)
    source = build_source(folder_config(tmp_path / "labelled").data, "train")
    assert [source[i]["label"] for i in range(len(source))] == [0, 3]
    assert dict(source.bad.counts) == {"bad_label": 2}
    assert [source.dropped_before(i) for i in range(len(source))] == [0, 2]
    assert "bad_label: row 2 (id=2): label 'cat' is not a class index" in caplog.text


def test_rows_dropped_from_the_manifest_are_counted_once_per_pass_over_processes(tmp_path):
    """Rows 0 (missing file), 3 (empty caption) and 6 (the last: missing file) are dropped when
    the manifest is read; over one epoch the two processes' batches count each of them once."""
    files = {f"{i}.png": png_bytes(pixels((9, 10, 3), i)) for i in range(7)}
    rows = [{"image": f"imgs/{i}.png", "caption": f"caption {i}"} for i in range(7)]
    rows[0]["image"] = rows[6]["image"] = "imgs/gone.png"
    rows[3]["caption"] = " "
    write_folder(tmp_path / "dropped", rows, files)
    counted = 0
    for process_index in range(2):
        stream = build_pipeline(
            folder_config(tmp_path / "dropped"), TOKENIZER, "train", batch_size=2, num_epochs=1,
            process_index=process_index, process_count=2, drop_remainder=False, seed=5,
        )  # fmt: skip
        counted += sum(int(batch["bad_records"].sum()) for batch in stream)
    assert counted == 3


def test_evaluation_captions_belong_to_their_images_when_rows_are_dropped(tmp_path):
    """Row 1 (empty caption) is dropped when the manifest is read, so record ids and source
    indices differ from there on; the captions the pipeline carries (retrieval's gallery) still
    belong to their images' rows."""
    files = {f"{i}.png": png_bytes(pixels((9, 10, 3), i)) for i in range(5)}
    rows = [{"image": f"imgs/{i}.png", "caption": f"caption {i}"} for i in range(5)]
    rows[1]["caption"] = ""
    write_folder(tmp_path / "dropped", rows, files)
    stream = build_pipeline(
        folder_config(tmp_path / "dropped"), TOKENIZER, "train", batch_size=2, num_epochs=1,
        shuffle=False, drop_remainder=False, captions=True,
    )  # fmt: skip
    pairs = [(int(i), str(c)) for b in stream for i, c in zip(b["id"], b["caption"])]
    assert pairs == [(0, "caption 0"), (2, "caption 2"), (3, "caption 3"), (4, "caption 4")]


def test_evaluation_reads_every_good_record_once(planted_folder, caplog):
    """A bad record's slot holds the next good record (training keeps the batch full); an
    evaluation split must not score that record twice."""
    root, planted = planted_folder
    shutil.copy(root / "train.jsonl", root / "val.jsonl")
    data = load_split(folder_config(root), TOKENIZER, "val", batch_size=4)
    bad = {planted["corrupt"], planted["random"], planted["empty"]}
    assert data["id"].tolist() == [i for i in range(12) if i not in bad]
    assert len(data["caption"]) == len(data["image"]) == len(data["tokens"]) == 9
    assert "2 bad records left out of the evaluation (9 kept)" in caplog.text
    # The training pass over the same rows keeps 11 (two substitutes), flagged as such.
    train = all_batches(folder_config(root))
    assert np.concatenate([b["substitute"] for b in train]).sum() == 2
