"""Image folder, array_record shards and TFDS sources, with bad records counted and skipped."""

import io
import json

import compile_cache
import ml_collections
import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import (  # noqa: F401
    array_record_source,
    folder,
    records,
    tfds_source,
    write_shards,
)
from vlm_jax.data.pipeline import build_pipeline, default_data_config
from vlm_jax.data.sources import build_source
from vlm_jax.data.tokenizers import build_tokenizer

CLASSES = ["zero", "one", "two"]


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def random_image(seed: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size + seed % 3, 3), np.uint8)


@pytest.fixture
def image_folder(tmp_path):
    """train.jsonl with one missing file, one empty caption and one corrupt image; val.csv;
    zeroshot.jsonl with labels; classnames.txt. Returns (root, {id: image})."""
    root = tmp_path / "folder"
    (root / "imgs").mkdir(parents=True)
    images = {}
    for i in range(9):
        images[i] = random_image(i)
        (root / "imgs" / f"{i}.png").write_bytes(png_bytes(images[i]))
    (root / "imgs" / "corrupt.png").write_bytes(b"\x89PNG not really an image")
    train = [{"image": f"imgs/{i}.png", "caption": f"picture number {i}"} for i in range(6)]
    train.insert(2, {"image": "imgs/missing.png", "caption": "gone"})
    train.insert(4, {"image": "imgs/6.png", "caption": "   "})
    train.insert(5, {"image": "imgs/corrupt.png", "caption": "broken"})
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train) + "\n")
    val_rows = [f"imgs/{i}.png,a val picture {i}" for i in (6, 7)]
    (root / "val.csv").write_text("image,caption\n" + "\n".join(val_rows) + "\n")
    zeroshot = [
        {"image": f"imgs/{i}.png", "caption": CLASSES[i % 3], "label": i % 3} for i in (6, 7, 8)
    ]
    (root / "zeroshot.jsonl").write_text("\n".join(json.dumps(r) for r in zeroshot))
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    return root, images


def data_config(source="shapes", **overrides) -> ml_collections.ConfigDict:
    config = default_data_config(source)
    config.update(overrides)
    return config


def test_folder_source_drops_bad_rows_and_raises_on_undecodable(image_folder, caplog):
    root, images = image_folder
    source = build_source(data_config(source="folder", path=str(root)), "train")
    assert len(source) == 7  # 9 rows - missing file - empty caption
    assert dict(source.bad.counts) == {"missing_file": 1, "empty_caption": 1}
    assert "missing_file" in caplog.text
    with pytest.raises(records.BadRecordError, match="undecodable_image: id=5 .*corrupt.png"):
        source[3]
    # In the pipeline the corrupt row (index 3 among usable rows) is replaced by the next one.
    tokenizer = build_tokenizer(ml_collections.ConfigDict({"name": "bytes", "max_len": 24}))
    bad = records.BadRecords("skip", "folder train")
    checked = records.CheckedSource(source, records.RecordCheck(tokenizer, 24), bad)
    loaded = [checked[i] for i in range(len(checked))]
    assert dict(bad.counts) == {"undecodable_image": 1}
    assert loaded[3]["id"] == loaded[4]["id"] == 6
    # Rows dropped from the manifest count at the record after them (the missing file at
    # record 2, the empty caption at record 3), the corrupt image where it is stepped over.
    assert [r["bad_records"] for r in loaded] == [0, 0, 1, 2, 0, 0, 0]
    for record in loaded:
        np.testing.assert_array_equal(record["image"], images[int(record["caption"].split()[-1])])
    val = build_source(data_config(source="folder", path=str(root)), "val")
    assert [val[i]["caption"] for i in range(2)] == ["a val picture 6", "a val picture 7"]
    zeroshot = build_source(data_config(source="folder", path=str(root)), "zeroshot")
    assert zeroshot.classnames == CLASSES and zeroshot.templates == folder.DEFAULT_TEMPLATES
    assert [zeroshot[i]["label"] for i in range(3)] == [0, 1, 2]


def test_folder_source_fails_when_asked(image_folder):
    root, _ = image_folder
    with pytest.raises(records.BadRecordError, match="missing_file.*missing.png"):
        build_source(data_config(source="folder", path=str(root), on_error="fail"), "train")
    with pytest.raises(ValueError, match="on_error='ignore' is not one of: skip, fail"):
        build_source(data_config(source="folder", path=str(root), on_error="ignore"), "train")
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        build_source(data_config(source="folder", path=str(root)), "test")


def test_write_shards_then_array_record_source(image_folder, tmp_path, capsys):
    root, images = image_folder
    out = tmp_path / "shards"
    write_shards.main(["--src", str(root), "--out", str(out), "--num_shards", "3"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"] == {
        "written": 6,
        "skipped": {"missing_file": 1, "empty_caption": 1, "undecodable_image": 1},
    }
    assert meta["classnames"] == CLASSES
    assert len(list(out.glob("train-*-of-00003.array_record"))) == 3
    source = build_source(data_config(source="array_record", path=str(out)), "train")
    assert len(source) == 6
    captions = [source[i]["caption"] for i in range(6)]
    assert captions == [f"picture number {i}" for i in range(6)]  # manifest order kept
    for i in range(6):
        np.testing.assert_array_equal(source[i]["image"], images[i])
    zeroshot = build_source(data_config(source="array_record", path=str(out)), "zeroshot")
    assert zeroshot.classnames == CLASSES and [zeroshot[i]["label"] for i in range(3)] == [0, 1, 2]


def shard_names(out, split: str = "train") -> list[str]:
    return sorted(path.name for path in out.glob(f"{split}-*.array_record"))


def read_captions(out) -> list[str]:
    source = build_source(data_config(source="array_record", path=str(out)), "train")
    return [source[i]["caption"] for i in range(len(source))]


def test_rewriting_shards_replaces_the_earlier_set(image_folder, tmp_path):
    root, _ = image_folder
    out = tmp_path / "shards"
    write_shards.write_shards(root, out, ["train", "val"], 3, "skip")
    write_shards.main(
        ["--src", str(root), "--out", str(out), "--splits", "train", "--num_shards", "2"]
    )
    assert shard_names(out) == [f"train-0000{i}-of-00002.array_record" for i in range(2)]
    assert read_captions(out) == [f"picture number {i}" for i in range(6)]  # each once
    assert shard_names(out, "val") == [f"val-0000{i}-of-00002.array_record" for i in range(2)]
    assert json.loads((out / "meta.json").read_text())["splits"]["val"]["written"] == 2


def test_an_interrupted_rewrite_keeps_the_earlier_shards(image_folder, tmp_path, monkeypatch):
    root, _ = image_folder
    out = tmp_path / "shards"
    write_shards.write_shards(root, out, ["train"], 3, "skip")
    before = {name: (out / name).read_bytes() for name in shard_names(out)}

    class DiskFullAtSecondShard(write_shards.ArrayRecordWriter):
        opened = 0

        def __init__(self, path, options):
            DiskFullAtSecondShard.opened += 1
            if DiskFullAtSecondShard.opened == 2:
                raise OSError("disk full")
            super().__init__(path, options)

    monkeypatch.setattr(write_shards, "ArrayRecordWriter", DiskFullAtSecondShard)
    with pytest.raises(OSError, match="disk full"):
        write_shards.write_shards(root, out, ["train"], 2, "skip")
    assert {name: (out / name).read_bytes() for name in shard_names(out)} == before
    assert read_captions(out) == [f"picture number {i}" for i in range(6)]


def test_array_record_source_reads_only_one_complete_shard_set(image_folder, tmp_path):
    root, _ = image_folder
    out, other = tmp_path / "shards", tmp_path / "other"
    write_shards.write_shards(root, out, ["train"], 3, "skip")
    write_shards.write_shards(root, other, ["train"], 2, "skip")
    stale = other / "train-00001-of-00002.array_record"
    (out / stale.name).write_bytes(stale.read_bytes())
    message = (
        "holds 2 shard sets of split 'train' \\(-of-00002: train-00001-of-00002.array_record; "
        "-of-00003: train-00000-of-00003.array_record, train-00001-of-00003.array_record, "
        "train-00002-of-00003.array_record\\); rerun write_shards"
    )
    with pytest.raises(ValueError, match=message):
        build_source(data_config(source="array_record", path=str(out)), "train")
    (out / stale.name).unlink()
    (out / "train-00001-of-00003.array_record").unlink()
    message = (
        "not one complete set: missing \\[train-00001-of-00003.array_record\\], unexpected \\[\\]"
    )
    with pytest.raises(ValueError, match=message):
        build_source(data_config(source="array_record", path=str(out)), "train")
    # A complete set by name whose shards hold 3 + 3 + 2 records, not the 6 meta.json names.
    for i in range(2):
        source_shard = other / f"train-0000{i}-of-00002.array_record"
        (out / f"train-0000{i}-of-00003.array_record").write_bytes(source_shard.read_bytes())
    message = "meta.json says 6 'train' records were written, but the shards .* hold 8"
    with pytest.raises(ValueError, match=message):
        build_source(data_config(source="array_record", path=str(out)), "train")


def test_sources_feed_the_grain_pipeline(image_folder, tmp_path):
    root, _ = image_folder
    write_shards.write_shards(root, tmp_path / "shards", ["train"], 2, "skip")
    tokenizer = build_tokenizer(ml_collections.ConfigDict({"name": "bytes", "max_len": 24}))
    for source, path in (("folder", root), ("array_record", tmp_path / "shards")):
        config = ml_collections.ConfigDict(
            {
                "data": data_config(source=source, path=str(path), image_size=8),
                "tokenizer": {"name": "bytes", "max_len": 24},
            }
        )
        batch = next(iter(build_pipeline(config, tokenizer, "train", batch_size=4, seed=1)))
        assert batch["image"].shape == (4, 8, 8, 3) and batch["tokens"].shape == (4, 24)
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1


def build_tiny_tfds(data_dir) -> dict[str, list[dict]]:
    """Prepare a tiny TFDS image-captions dataset (array_record) in `data_dir`; no TF needed
    since images are given PNG-encoded. Returns the examples per split."""
    import tensorflow_datasets as tfds

    examples = {
        split: [
            {
                "image": np.ascontiguousarray(random_image(10 * n + i, 8)[:, :8]),
                "captions": {"text": [f"caption {split} {i}", "another"]},
                "label": i % 3,
            }
            for i in range(n)
        ]
        for split, n in (("train", 5), ("validation", 3))
    }

    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(8, 8, 3)),
                "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
                "label": tfds.features.ClassLabel(names=CLASSES),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in examples}

        def _generate_examples(self, split):
            for i, example in enumerate(examples[split]):
                captions = [{"text": t} for t in example["captions"]["text"]]
                yield i, dict(example, image=png_bytes(example["image"]), captions=captions)

    TinyCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return examples


def test_tfds_source_reads_a_prepared_dataset(tmp_path):
    examples = build_tiny_tfds(tmp_path / "tfds")
    config = data_config(
        source="tfds",
        tfds_name="tiny_captions",
        tfds_data_dir=str(tmp_path / "tfds"),
        tfds_splits={"train": "train", "val": "validation", "zeroshot": "validation"},
        caption_key="captions/text",
    )
    train = build_source(config, "train")
    assert len(train) == 5
    for i in range(5):
        record = train[i]
        expected = next(
            e for e in examples["train"] if e["captions"]["text"][0] == record["caption"]
        )
        np.testing.assert_array_equal(record["image"], expected["image"])
        assert record["label"] == expected["label"]
    zeroshot = build_source(config, "zeroshot")
    assert zeroshot.classnames == CLASSES and len(zeroshot) == 3
    with pytest.raises(ValueError, match="split 'test' is not one of"):
        build_source(config, "test")


@pytest.mark.slow
def test_digits_folder_trains_and_zero_shot_classifies(tmp_path, tmp_path_factory):
    """Real images end to end through the CLI: scikit-learn's digits written as a folder +
    JSONL, trained and evaluated; zero-shot accuracy on held-out digits far above chance (0.1).
    One training image is corrupted on disk: it is stepped over and counted in metrics.jsonl.
    `evaluate` loads the evaluators train compiled for its last step from the cache."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo))
    env |= compile_cache.subprocess_env(compile_cache.session_dir(tmp_path_factory))
    data, workdir = tmp_path / "digits", tmp_path / "run"
    config = str(repo / "configs" / "digits_folder.py")
    subprocess.run([sys.executable, config, str(data)], check=True, env=env)
    first = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    (data / first["image"]).write_bytes(b"not an image")
    flags = ["--config", config, "--workdir", str(workdir), f"--config.data.path={data}"]
    for command in ("train", "evaluate"):
        subprocess.run([sys.executable, "-m", f"vlm_jax.{command}", *flags], check=True, env=env)
    results = json.loads(next(workdir.glob("eval_*.json")).read_text())
    assert results["eval/zeroshot_top1"] >= 0.5, results
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["data/bad_records"] >= 1 and rows[0]["data/truncated_captions"] == 0
