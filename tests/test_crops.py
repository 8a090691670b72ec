"""Training crops (data.crop): the Inception crop's sampling ranges and determinism, the decode
size it needs (reduced decode never upsamples a crop), exact resume, the default crop unchanged,
and the errors of bad crop keys."""

import hashlib
import io
import json
import math
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import skimage.data
from PIL import Image

from vlm_jax.config import ConfigError
from vlm_jax.data import decode, preprocess
from vlm_jax.data.pipeline import build_pipeline, default_data_config
from vlm_jax.data.sources import build_source
from vlm_jax.data.tokenizers import ByteTokenizer
from vlm_jax.data.write_shards import write_shards

WIDE = ((0.08, 1.0), (3 / 4, 4 / 3))  # torchvision's RandomResizedCrop defaults
OPEN_CLIP = (preprocess.OPEN_CLIP_SCALE, preprocess.INCEPTION_RATIO)  # data.crop_* defaults

PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")


def photo_folder(root: Path, image_format: str = "PNG", shorter: int = 60) -> Path:
    """An image folder of 8 scikit-image photos (shorter sides `shorter`, +17 px each), its
    train and val splits the same records."""
    (root / "imgs").mkdir(parents=True)
    rows = []
    for i, name in enumerate(PHOTOS * 2):
        photo = Image.fromarray(getattr(skimage.data, name)())
        scale = (shorter + 17 * i) / min(photo.size)
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)))
        buffer = io.BytesIO()
        photo.save(buffer, format=image_format)
        path = f"imgs/{i}.{image_format.lower()}"
        (root / path).write_bytes(buffer.getvalue())
        rows.append({"image": path, "caption": f"the {name}"})
    for split in ("train", "val"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def folder_config(root: Path, **data) -> ml_collections.ConfigDict:
    config = default_data_config("folder")
    config.update(dict(path=str(root), image_size=32, decoder="pil", flip=True, **data))
    return ml_collections.ConfigDict({"data": config, "tokenizer": {"max_len": 16}})


def stream_digest(config: ml_collections.ConfigDict, batches: int = 4) -> str:
    """sha256 of the first train batches' images and ids (seed 3, batches of 4)."""
    iterator = iter(build_pipeline(config, ByteTokenizer(), "train", batch_size=4, seed=3))
    digest = hashlib.sha256()
    for _ in range(batches):
        batch = next(iterator)
        digest.update(batch["image"].tobytes() + batch["id"].tobytes())
    return digest.hexdigest()


# Computed at commit ec1c861 (before data.crop): the default crop's stream must not change. A
# Pillow release that changes its bicubic filter would change it too (PNGs: no JPEG decoder).
DEFAULT_DIGEST = "1182c18092c256ee022c3d54599161714dec43745c14643a869a0b66be080a5a"


def draw_boxes(height: int, width: int, scale, ratio, draws: int = 3000, seed: int = 0):
    rng = np.random.default_rng(seed)
    boxes = np.asarray(
        [preprocess.inception_box(height, width, scale, ratio, rng) for _ in range(draws)]
    )
    return boxes  # int[draws, 4]: top, left, box_height, box_width


@pytest.mark.parametrize(
    "scale, ratio, shape, aspect_bins",
    [
        (*WIDE, (360, 400), 5),
        (*WIDE, (400, 360), 5),
        # Large boxes fit only near the image's own aspect (1.11): aspects reach [1, 1.23].
        (*OPEN_CLIP, (360, 400), 2),
    ],
)
def test_inception_boxes_fall_in_and_cover_the_configured_ranges(scale, ratio, shape, aspect_bins):
    height, width = shape
    top, left, box_h, box_w = draw_boxes(height, width, scale, ratio).T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + box_h <= height).all() and (left + box_w <= width).all()
    # Rounding each side to a pixel moves area and aspect by at most its half pixel.
    area = box_h * box_w / (height * width)
    slack = (box_h + box_w) / (height * width)
    assert (area >= scale[0] - slack).all() and (area <= scale[1] + slack).all()
    aspect = box_w / box_h
    assert (aspect >= ratio[0] * (1 - 0.5 / box_w) / (1 + 0.5 / box_h)).all()
    assert (aspect <= ratio[1] * (1 + 0.5 / box_w) / (1 - 0.5 / box_h)).all()
    for values, (low, high), bins in ((area, scale, 5), (aspect, ratio, aspect_bins)):
        counts, _ = np.histogram(values, bins=5, range=(low, high))
        assert np.sum(counts > 0.05 * len(values)) >= bins, counts  # not always the same box
    assert len(np.unique(top)) > 20 and len(np.unique(left)) > 20


def test_a_box_that_never_fits_falls_back_to_the_central_box_of_clamped_aspect():
    """As torchvision's. With open_clip's scale (0.9, 1) an image more elongated than 4/3 / 0.9
    (a 451 x 300 photo) never fits a drawn box: every crop is this central one."""
    rng = np.random.default_rng(0)
    assert (draw_boxes(300, 451, *OPEN_CLIP, draws=50) == (0, 25, 300, 400)).all()
    wide = preprocess.inception_box(100, 400, (0.9, 1.0), (3 / 4, 4 / 3), rng)
    assert wide == (0, (400 - 133) // 2, 100, 133)  # whole height, width at ratio_max
    tall = preprocess.inception_box(400, 100, (0.9, 1.0), (3 / 4, 4 / 3), rng)
    assert tall == ((400 - 133) // 2, 0, 133, 100)
    assert preprocess.inception_box(50, 60, (1.0, 1.0), (0.5, 0.5), rng) == (0, 17, 50, 25)


def test_inception_crops_are_image_size_squares_and_the_same_rng_gives_the_same_crop():
    photo = skimage.data.chelsea()  # 300 x 451
    crop = preprocess.TrainCrop(48, "inception", *WIDE)
    first = crop(photo, np.random.default_rng(5))
    assert first.shape == (48, 48, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(crop(photo, np.random.default_rng(5)), first)
    others = [crop(photo, np.random.default_rng(seed)) for seed in range(6, 10)]
    assert all(not np.array_equal(other, first) for other in others)
    rng = np.random.default_rng(5)
    top, left, box_h, box_w = preprocess.inception_box(300, 451, *WIDE, rng)
    box = Image.fromarray(photo[top : top + box_h, left : left + box_w])
    np.testing.assert_array_equal(first, np.asarray(box.resize((48, 48), Image.BICUBIC)))


@pytest.mark.parametrize(
    "scale, ratio",
    [OPEN_CLIP, WIDE, ((0.3, 0.5), (1.2, 2.0))],
)
def test_reduced_decode_keeps_every_crop_at_least_image_size(scale, ratio):
    """Decoded at the scale min_source_side allows, even the smallest crops keep image_size
    pixels on their shorter side; decoded for image_size alone (as resize_crop is), the wide
    ranges' crops would be upsampled."""
    size = 96
    crop = preprocess.TrainCrop(size, "inception", scale, ratio)
    min_side = crop.min_source_side()
    photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((1001, 667)))
    for name in [name for name in ("pil", "simplejpeg", "opencv") if decode.installed(name)]:
        image = decode.ImageDecoder(name, min_side)(jpeg(photo))
        assert min(image.shape[:2]) >= min_side
        _, _, box_h, box_w = draw_boxes(*image.shape[:2], scale, ratio, draws=500).T
        assert min(box_h.min(), box_w.min()) >= size
        naive = decode.ImageDecoder(name, size)(jpeg(photo))  # 1/4 scale: 167 x 251
        _, _, box_h, box_w = draw_boxes(*naive.shape[:2], scale, ratio, draws=500).T
        assert (min(box_h.min(), box_w.min()) < size) == (min(naive.shape[:2]) < min_side)
    # The least such side: the smallest box of a square image one pixel smaller is too small.
    assert (
        smallest_box_side(min_side - 1, scale, ratio)
        < size
        <= smallest_box_side(min_side, scale, ratio)
    )


def smallest_box_side(side: int, scale, ratio) -> float:
    """The shorter side (before rounding) of the smallest box of a side x side image: area
    scale_min * side^2 at the aspect ratio (ratio_min or ratio_max) that makes a side shortest."""
    area = scale[0] * side * side
    return min(min(math.sqrt(area * r), math.sqrt(area / r)) for r in ratio)


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_every_encoded_source_decodes_train_for_the_crop_and_other_splits_for_image_size(tmp_path):
    folder = photo_folder(tmp_path / "folder", "JPEG")
    write_shards(folder, tmp_path / "records", ["train", "val"], 1, "fail", "array_record")
    tars = write_shards(folder, tmp_path / "tars", ["train", "val"], 1, "fail", "webdataset")
    keys = {
        "folder": {"path": str(folder)},
        "array_record": {"path": str(tmp_path / "records")},
        "webdataset": {f"{s}_shards": tars["shards"][s] for s in ("train", "val")},
    }
    for crop, train_side in (("resize_crop", 32), ("inception", 39)):  # ceil(32 / sqrt(.9 * .75))
        for source, source_keys in keys.items():
            data = default_data_config(source)
            data.update(dict(source_keys, image_size=32, crop=crop))
            assert build_source(data, "train").decoder.min_side == train_side, (source, crop)
            assert build_source(data, "val").decoder.min_side == 32, (source, crop)
    data.reduced_decode = False
    assert build_source(data, "train").decoder.min_side == 0


def test_the_default_crop_gives_the_stream_it_gave_before_the_crop_key(tmp_path):
    root = photo_folder(tmp_path)
    assert stream_digest(folder_config(root)) == DEFAULT_DIGEST
    assert stream_digest(folder_config(root, crop="resize_crop")) == DEFAULT_DIGEST


def test_an_inception_stream_resumes_exactly(tmp_path):
    """Crops are drawn from the (seed, position) generators Grain gives each record, so a
    restored iterator yields the very crops the interrupted one would have."""
    root = photo_folder(tmp_path, "JPEG", shorter=90)
    config = folder_config(root, crop="inception", crop_scale=(0.08, 1.0))

    def loader():
        return build_pipeline(config, ByteTokenizer(), "train", batch_size=4, seed=7)

    iterator = iter(loader())
    [next(iterator) for _ in range(2)]
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    restored = iter(loader())
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert expected[0]["image"].shape == (4, 32, 32, 3)
    resized = build_pipeline(folder_config(root), ByteTokenizer(), "train", batch_size=4, seed=7)
    first, first_resized = next(iter(loader())), next(iter(resized))
    np.testing.assert_array_equal(first["id"], first_resized["id"])  # the same records,
    assert not np.array_equal(first["image"], first_resized["image"])  # other crops


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("crop", "random_resized", "crop='random_resized' is not one of: resize_crop, inception"),
        (
            "crop_scale",
            (0.0, 1.0),
            r"crop_scale=\(0.0, 1.0\): expected \(min, max\) area fractions with 0 < min <= max"
            " <= 1",
        ),
        ("crop_scale", (0.5, 0.2), r"crop_scale=\(0.5, 0.2\): expected .* 0 < min <= max <= 1"),
        ("crop_scale", (0.5, 1.5), r"crop_scale=\(0.5, 1.5\): expected .* 0 < min <= max <= 1"),
        ("crop_scale", (0.5,), r"crop_scale=\(0.5,\): expected \(min, max\)"),
        ("crop_scale", ("a", 1), r"crop_scale=\('a', 1\): expected \(min, max\)"),
        (
            "crop_ratio",
            (0, 1),
            r"crop_ratio=\(0, 1\): expected \(min, max\) aspect ratios \(width / height\) with "
            "0 < min <= max",
        ),
        ("crop_ratio", (2.0, 1.0), r"crop_ratio=\(2.0, 1.0\): expected .* 0 < min <= max"),
    ],
)
def test_bad_crop_keys_fail_before_any_record_naming_the_value_and_the_valid_range(
    tmp_path, key, value, message
):
    config = folder_config(photo_folder(tmp_path), **{key: value})
    with pytest.raises(ConfigError, match=message):
        build_pipeline(config, ByteTokenizer(), "train", batch_size=4)


@pytest.mark.parametrize("source", ["shapes", "shapes_vqa"])
def test_inception_is_refused_where_captions_name_the_whole_scene(source):
    data = default_data_config(source)
    data.crop = "inception"
    with pytest.raises(
        ConfigError,
        match=f"crop='inception' is refused for data.source='{source}': its captions name every",
    ):
        build_source(data, "train")
    data.crop = "resize_crop"
    assert len(build_source(data, "train"))
