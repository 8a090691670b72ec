"""Image decoders by name (data/decode.py): same pixels as PIL, reduced-size JPEG decode, and
config.data.decoder reaching the sources of the pipeline."""

import io

import ml_collections
import numpy as np
import pytest
import skimage.data
from PIL import Image

from vlm_jax.config import ConfigError
from vlm_jax.data import decode, preprocess
from vlm_jax.data.array_record_source import pack_record, unpack_record
from vlm_jax.data.pipeline import build_pipeline, default_data_config
from vlm_jax.data.records import BadRecordError, decode_image
from vlm_jax.data.sources import build_source
from vlm_jax.data.tokenizers import ByteTokenizer

DECODERS = ("pil", "simplejpeg", "opencv")
MEAN_ABS_BOUND = 1.0  # uint8 levels: libjpeg builds may round IDCT/upsampling differently


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def resized(photo: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(photo).resize((width, height)))


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """Real photos as JPEG: colour of odd sizes, a large one, a grey one."""
    return {
        "coffee": jpeg(skimage.data.coffee()),  # 400 x 600
        "odd": jpeg(resized(skimage.data.chelsea(), 451, 301)),
        "large": jpeg(resized(skimage.data.astronaut(), 1001, 667)),
        "grey": jpeg(skimage.data.camera()),
    }


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize("name", DECODERS)
def test_every_decoder_gives_the_pixels_pil_gives(photos, name):
    for photo, data in photos.items():
        want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        got = decode.ImageDecoder(name)(data)
        assert got.shape == want.shape and got.dtype == np.uint8, photo
        assert mean_abs(got, want) <= MEAN_ABS_BOUND, photo


@pytest.mark.parametrize("name", DECODERS)
def test_reduced_decode_keeps_the_shorter_side_and_matches_a_full_decode(photos, name):
    """1001 x 667 at min_side 224: scale 1/2 (667 // 4 < 224), 501 x 334 (libjpeg rounds up);
    then the pipeline's resize + crop to 224 is close to that of a full decode."""
    full, reduced = decode.ImageDecoder(name), decode.ImageDecoder(name, min_side=224)
    assert reduced(photos["large"]).shape == (334, 501, 3)
    assert decode.ImageDecoder(name, min_side=100)(photos["large"]).shape == (167, 251, 3)
    for photo, data in photos.items():
        image = reduced(data)
        assert min(image.shape[:2]) >= 224, photo
        want = preprocess.fit_image(full(data), 224)
        got = preprocess.fit_image(image, 224)
        assert mean_abs(got, want) < 3.0, photo  # bicubic from a 1/2 IDCT scale vs full size
    assert reduced(photos["coffee"]).shape == (400, 600, 3)  # 400 // 2 < 224: full size


def test_every_decoder_reduces_by_the_same_scale(photos):
    """So a run's pixels do not depend on the package that decodes them."""
    sides = {name: decode.ImageDecoder(name, 100)(photos["large"]) for name in DECODERS}
    assert {image.shape for image in sides.values()} == {(167, 251, 3)}
    assert max(mean_abs(image, sides["pil"]) for image in sides.values()) <= MEAN_ABS_BOUND


@pytest.mark.parametrize("name", DECODERS)
def test_other_formats_and_broken_bytes_go_through_pil(photos, name):
    buffer = io.BytesIO()
    rgba = np.dstack([skimage.data.astronaut()[:64, :48], np.full((64, 48), 7, np.uint8)])
    Image.fromarray(rgba).save(buffer, format="PNG")
    decoder = decode.ImageDecoder(name, min_side=16)
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), decoder=decoder), rgba[..., :3])
    for broken in (b"not an image", photos["coffee"][:200]):
        with pytest.raises(BadRecordError, match="undecodable_image"):
            decode_image(broken, "x", decoder)


def test_auto_takes_the_fastest_installed_and_bad_names_say_what_is_valid(monkeypatch):
    assert decode.ImageDecoder("auto").name == decode.FASTEST_FIRST[0]
    with pytest.raises(ValueError, match="'turbo' is not one of: auto, opencv, pil, simplejpeg"):
        decode.ImageDecoder("turbo")
    real = decode.installed
    monkeypatch.setattr(decode, "installed", lambda name: name != "simplejpeg" and real(name))
    assert decode.ImageDecoder("auto").name == "opencv"
    with pytest.raises(ValueError, match="pip install simplejpeg.*installed decoders: opencv"):
        decode.ImageDecoder("simplejpeg")


def folder_config(root, **data) -> ml_collections.ConfigDict:
    config = default_data_config("folder")
    config.update(dict(path=str(root), image_size=32, **data))
    return ml_collections.ConfigDict({"data": config, "tokenizer": {"max_len": 16}})


@pytest.fixture()
def photo_folder(tmp_path, photos):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "large.jpg").write_bytes(photos["large"])
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text('{"image": "imgs/large.jpg", "caption": "a"}\n')
    return tmp_path


def test_the_config_key_reaches_the_source_and_the_pipeline(photo_folder):
    source = build_source(folder_config(photo_folder, decoder="opencv").data, "train")
    assert source.decoder == decode.ImageDecoder("opencv", 32)
    assert source[0]["image"].shape == (84, 126, 3)  # 667 // 8 >= 32: the 1/8 scale
    off = build_source(folder_config(photo_folder, reduced_decode=False).data, "train")
    assert off.decoder == decode.ImageDecoder(decode.FASTEST_FIRST[0], 0)
    assert off[0]["image"].shape == (667, 1001, 3)
    config = folder_config(photo_folder, decoder="pil")
    batch = next(iter(build_pipeline(config, ByteTokenizer(), "val", batch_size=1)))
    want = preprocess.to_float(preprocess.fit_image(off[0]["image"], 32))
    assert np.abs(batch["image"][0] - want).mean() < 0.05  # [-1, 1]: ~3 uint8 levels


def test_a_bad_decoder_fails_before_any_record_naming_the_valid_ones(photo_folder):
    config = folder_config(photo_folder, decoder="turbojpeg")
    with pytest.raises(ConfigError, match="decoder='turbojpeg' is not one of: auto, opencv, pil"):
        build_pipeline(config, ByteTokenizer(), "train", batch_size=1)


def test_shard_records_decode_with_the_sources_decoder(photos):
    record = pack_record(photos["large"], {"caption": "c", "id": 3})
    assert unpack_record(record)["image"].shape == (667, 1001, 3)  # PIL, full size by default
    reduced = unpack_record(record, decode.ImageDecoder("simplejpeg", 224))
    assert reduced["image"].shape == (334, 501, 3) and reduced["id"] == 3
