"""The webdataset source: img2dataset-style tar shards of real images (scikit-learn's digits),
read by a cached member index; bad members counted exactly; training resumes exactly."""

import importlib.util
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from compile_cache import compilation_cache  # noqa: F401 (autouse: compiles go through the cache)
from conftest import tiny_contrastive_config
from PIL import Image

from vlm_jax.config import MissingInput
from vlm_jax.data import webdataset_source, write_shards
from vlm_jax.data.pipeline import default_data_config
from vlm_jax.data.records import BadRecordError
from vlm_jax.data.sources import build_source
from vlm_jax.data.webdataset_source import expand_braces, shard_paths

REPO = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("digits_folder", REPO / "configs/digits_folder.py")
digits_folder = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(digits_folder)
NAMES = list(digits_folder.NAMES)
CORRUPT, NO_CAPTION, NO_IMAGE = 5, 12, 20  # positions in the first train shard
CORRUPT_2, TRAIN_2 = 10, 24  # the second train shard: a corrupt one, 24 samples (last one cut)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return load_digits()


def digit(digits, i: int, size: int = 24) -> tuple[np.ndarray, int]:
    """Digit `i` upscaled to uint8[size, size, 3], and its label."""
    pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
    image = Image.fromarray(pixels).resize((size, size), Image.BILINEAR).convert("RGB")
    return np.asarray(image), int(digits.target[i])


def encode(image: np.ndarray, extension: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format={"jpg": "JPEG"}.get(extension, extension.upper()))
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def sample(digits, i: int, extension: str = "png") -> tuple[str, dict[str, bytes]]:
    """(key, {extension: bytes}) of digit i as img2dataset writes it."""
    image, label = digit(digits, i)
    caption = digits_folder.CAPTIONS[i % 4].format(NAMES[label])
    meta = {"key": f"{i:09d}", "caption": caption, "label": label}
    members = {extension: encode(image, extension), "txt": caption.encode(), "json": b""}
    members["json"] = json.dumps(meta).encode()
    return f"{i:09d}", members


def make_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def cut_in_last_image(path: Path) -> None:
    """Truncate the tar in the middle of its last image member's data."""
    with tarfile.open(path) as tar:
        last = [m for m in tar.getmembers() if not m.name.endswith((".txt", ".json"))][-1]
    os.truncate(path, last.offset_data + last.size // 2)


@pytest.fixture(scope="module")
def shard_dir(digits, tmp_path_factory):
    """train-0000{0,1}.tar: 27 + 24 samples, of which 2 corrupt images, one without a caption,
    one without an image and the last of the second shard cut by a truncation (48 records
    indexed, 3 dropped); val-00000.tar (16), zeroshot-00000.tar (20); classnames, templates."""
    root = tmp_path_factory.mktemp("webdataset")
    first = [sample(digits, i, "jpg" if i % 2 else "png") for i in range(27)]
    first[CORRUPT][1]["jpg"] = b"\xff\xd8\xff not really a jpeg"
    del first[NO_CAPTION][1]["txt"]
    del first[NO_IMAGE][1]["png"]
    second = [sample(digits, i) for i in range(27, 27 + TRAIN_2)]
    second[CORRUPT_2][1]["png"] = b"\x89PNG broken"
    make_tar(root / "train-00000.tar", first)
    cut_in_last_image(make_tar(root / "train-00001.tar", second))
    make_tar(root / "val-00000.tar", [sample(digits, i, "webp") for i in range(100, 116)])
    make_tar(root / "zeroshot-00000.tar", [sample(digits, i) for i in range(200, 220)])
    (root / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    (root / "templates.txt").write_text("\n".join(digits_folder.TEMPLATES) + "\n")
    return root


def data_config(root: Path, index_dir: Path, **overrides):
    config = default_data_config("webdataset")
    shards = {
        "train_shards": str(root / "train-{00000..00001}.tar"),
        "val_shards": str(root / "val-*.tar"),
        "zeroshot_shards": (str(root / "zeroshot-00000.tar"),),
    }
    config.update({"image_size": 16, "index_dir": str(index_dir), **shards, **overrides})
    return config


def test_brace_ranges_lists_and_globs_expand():
    assert expand_braces("/d/{00000..00002}.tar") == [f"/d/0000{i}.tar" for i in range(3)]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("{03..01}") == ["03", "02", "01"]
    assert expand_braces("x{a,{b,c}}y") == ["xay", "xby", "xcy"]


def test_shard_patterns_resolve_in_order_and_bad_ones_name_the_pattern(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    paths = shard_paths([str(tmp_path / "{00001..00002}.tar"), str(tmp_path / "*.tar")], "k")
    assert [p.name for p in paths] == ["00001.tar", "00002.tar", "00000.tar"]  # each once
    pattern = str(tmp_path / "{00000..00004}.tar")
    with pytest.raises(MissingInput, match=r"data.train_shards='.*\{00000..00004\}.tar': 2 of"):
        shard_paths(pattern, "data.train_shards")
    with pytest.raises(MissingInput, match=r"00003.tar, .*00004.tar\] \(3 found\)"):
        shard_paths(pattern, "data.train_shards")
    with pytest.raises(MissingInput, match=r"'.*nothing-\*.tar': 1 of its shards"):
        shard_paths(str(tmp_path / "nothing-*.tar"), "data.val_shards")
    with pytest.raises(MissingInput, match="data.val_shards=None names no shards"):
        shard_paths(None, "data.val_shards")
    with pytest.raises(ValueError, match=r"\{x\} is neither a range"):
        shard_paths(str(tmp_path / "{x}.tar"), "data.val_shards")
    config = data_config(tmp_path, tmp_path)
    with pytest.raises(ValueError, match="split 'test' is not one of: train, val, zeroshot"):
        build_source(config, "test")


def test_bad_samples_are_dropped_or_raise_naming_shard_and_key(digits, shard_dir, tmp_path):
    train = build_source(data_config(shard_dir, tmp_path), "train")
    assert len(train) == 48  # 27 - 2 dropped in the first shard, 24 - 1 cut in the second
    assert dict(train.bad.counts) == {
        "empty_caption": 1,
        "missing_file": 1,
        "unreadable_record": 1,
    }
    assert train.classnames == NAMES and train.templates == digits_folder.TEMPLATES
    # Records keep shard order; ids are the keys: 0..26 less the two dropped, then 27..49.
    ids = [i for i in range(27) if i not in (NO_CAPTION, NO_IMAGE)] + list(range(27, 50))
    assert [int(i) for i in train.ids] == ids
    for index, i in enumerate(ids):
        if i in (CORRUPT, 27 + CORRUPT_2):
            name = "train-00000.tar" if i == CORRUPT else "train-00001.tar"
            with pytest.raises(BadRecordError, match=f"{name}: sample '{i:09d}': image: "):
                train[index]
            continue
        record, extension = train[index], "jpg" if i % 2 and i < 27 else "png"
        _, members = sample(digits, i, extension)
        assert record["caption"] == members["txt"].decode() and record["id"] == i
        np.testing.assert_array_equal(record["image"], decoded(members[extension]))
        assert record["label"] == digits.target[i]
    # The sample the truncation cuts (49 is the last complete one) and the dropped ones leave
    # their counts with the record after them, once each per pass.
    assert train.dropped_before(ids.index(NO_CAPTION + 1)) == 1
    assert train.dropped_before(ids.index(NO_IMAGE + 1)) == 1
    assert train.dropped_before(0) == 1  # the cut sample, after the last record (cyclically)
    assert sum(train.dropped_before(i) for i in range(len(train))) == 3
    zeroshot = build_source(data_config(shard_dir, tmp_path), "zeroshot")
    assert [zeroshot[i]["label"] for i in range(20)] == list(digits.target[200:220])
    assert len(build_source(data_config(shard_dir, tmp_path), "val")) == 16  # webp images


def test_cuts_between_samples_and_in_the_end_marker(digits, tmp_path):
    """No end-of-archive marker: the last sample may have lost members, so it is dropped; a
    cut inside the marker loses nothing. Captions from a .json key; bad labels raise."""
    path = make_tar(tmp_path / "00000.tar", [sample(digits, i) for i in range(3)])
    with tarfile.open(path) as tar:
        end = max(m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers())
    config = data_config(tmp_path, tmp_path / "idx", train_shards=str(path), caption_key="caption")
    os.truncate(path, end + 100)
    source = build_source(config, "train")
    assert len(source) == 3 and not source.bad.counts
    assert source[2]["caption"] == json.loads(sample(digits, 2)[1]["json"])["caption"]
    os.truncate(path, end)
    source = build_source(config, "train")
    assert len(source) == 2 and dict(source.bad.counts) == {"unreadable_record": 1}
    (tmp_path / "classnames.txt").write_text("zero\n")  # labelled now; label 1 is not a class
    source = build_source(config, "train")
    assert source[0]["label"] == digits.target[0] == 0 and digits.target[1] == 1
    with pytest.raises(BadRecordError, match=r"00000.tar: sample '000000001': label=1 is not"):
        source[1]


def test_the_index_is_cached_and_rebuilt_when_the_shard_changes(digits, tmp_path, monkeypatch):
    scans = []
    scan = webdataset_source.scan_shard
    monkeypatch.setattr(webdataset_source, "scan_shard", lambda p: scans.append(p) or scan(p))
    path = make_tar(tmp_path / "00000.tar", [sample(digits, i) for i in range(3)])
    config = data_config(tmp_path, tmp_path / "idx", train_shards=str(path))
    assert len(build_source(config, "train")) == 3 and len(scans) == 1
    assert json.loads((tmp_path / "00000.tar.idx.json").read_text())["size"] == path.stat().st_size
    assert len(build_source(config, "train")) == 3 and len(scans) == 1  # reused, not rescanned
    make_tar(path, [sample(digits, i) for i in range(4)])
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert len(build_source(config, "train")) == 4 and len(scans) == 2  # stale: rebuilt
    assert len(build_source(config, "train")) == 4 and len(scans) == 2
    # Beside the shard is not writable (a directory holds the index's name): the cache dir.
    other = make_tar(tmp_path / "00001.tar", [sample(digits, i) for i in range(2)])
    (tmp_path / "00001.tar.idx.json").mkdir()
    config.train_shards = str(other)
    assert len(build_source(config, "train")) == 2 and len(scans) == 3
    assert [p.name.split(".")[:2] for p in (tmp_path / "idx").iterdir()] == [["00001", "tar"]]
    assert len(build_source(config, "train")) == 2 and len(scans) == 3


def folder_with_digits(digits, root: Path) -> Path:
    """An image folder (see data/folder.py) of digits as PNG, JPEG and BMP files, with a row
    naming a missing file; zero-shot rows labelled; classnames.txt."""
    (root / "imgs").mkdir(parents=True)
    rows = {"train": [], "zeroshot": []}
    for i in range(10):
        image, label = digit(digits, i)
        extension = ("png", "jpg", "bmp")[i % 3]
        (root / "imgs" / f"{i}.{extension}").write_bytes(encode(image, extension))
        split = "train" if i < 6 else "zeroshot"
        row = {"image": f"imgs/{i}.{extension}", "caption": f"digit number {i}"}
        rows[split].append({**row, "label": label} if split == "zeroshot" else row)
    rows["train"].insert(2, {"image": "imgs/missing.png", "caption": "gone"})
    for split, split_rows in rows.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    (root / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    return root


def test_write_shards_folder_to_tars_gives_the_folder_records(digits, tmp_path, capsys):
    root, out = folder_with_digits(digits, tmp_path / "folder"), tmp_path / "tars"
    argv = ["--src", str(root), "--out", str(out), "--splits", "train,zeroshot"]
    write_shards.main([*argv, "--num_shards", "2", "--format", "webdataset"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"] == {"written": 6, "skipped": {"missing_file": 1}}
    assert meta["shards"]["train"] == str(out / "train-{00000..00001}.tar")
    with tarfile.open(out / "train-00000.tar") as tar:
        assert tar.getnames()[:3] == ["000000000.png", "000000000.txt", "000000000.json"]
    shards = {f"{split}_shards": pattern for split, pattern in meta["shards"].items()}
    config = data_config(out, tmp_path / "idx", **shards)
    folder_config = default_data_config("folder")
    folder_config.path = str(root)
    for split in ("train", "zeroshot"):
        folder = build_source(folder_config, split)
        tars = build_source(config, split)
        assert len(tars) == len(folder) and tars.classnames == folder.classnames
        for i in range(len(folder)):
            expected, record = folder[i], tars[i]
            assert record.keys() == expected.keys()
            np.testing.assert_array_equal(record.pop("image"), expected.pop("image"))
            assert record == expected
    # Writing again with fewer shards replaces the set and the stale shard's cached index.
    write_shards.main([*argv, "--num_shards", "1", "--format", "webdataset"])
    assert sorted(p.name for p in out.glob("train-*")) == ["train-00000.tar"]
    config.train_shards = json.loads((out / "meta.json").read_text())["shards"]["train"]
    assert len(build_source(config, "train")) == 6  # not the index of the earlier train-00000


def read_rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_trains_on_tars_counts_bad_records_exactly_and_resumes_exactly(shard_dir, tmp_path):
    from vlm_jax.train.trainer import train

    config = tiny_contrastive_config(**{"train.eval_every": "6"})  # evaluated once, at 6
    config.unlock()
    config.data = data_config(shard_dir, tmp_path / "idx")
    config.tokenizer.words = digits_folder.vocabulary()
    config.lock()
    full = tmp_path / "full"
    train(config, full)
    rows = read_rows(full)
    assert [r["step"] for r in rows] == [2, 4, 6]
    # 6 steps x 16 = 2 passes over the 48 records: each pass counts the 2 corrupt images it
    # steps over and the 3 samples dropped from the index (no caption, no image, cut).
    assert rows[-1]["data/bad_records"] == 10
    assert {"eval/zeroshot_top1", "eval/retrieval_i2t_r1"} <= set(rows[-1])

    stopped = tmp_path / "stopped"
    shutil.copytree(full, stopped)
    shutil.rmtree(stopped / "checkpoints" / "6")
    train(config, stopped)  # resumes from step 3 (the end of the first pass), redoes 4..6
    numeric = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
    resumed = [
        {k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_rows(stopped)
    ]
    assert resumed == numeric
