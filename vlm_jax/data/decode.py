"""Image decoders by name (`config.data.decoder`), decoding JPEGs at reduced size when allowed.

Decoding is most of the input pipeline's CPU time (scripts/bench_input.py; benchmarks/RESULTS.md
"Input pipeline throughput"). Measured on one core for a ~500 px web JPEG, decode alone:
simplejpeg ~0.50 ms, OpenCV ~0.53 ms, PIL ~0.7 ms, so "auto" takes the first installed of
FASTEST_FIRST. All three wrap libjpeg-turbo with its default IDCT and chroma upsampling and
give the same pixels here (the tests bound the difference, as builds may differ).

`min_side` > 0 decodes a JPEG at the largest libjpeg IDCT scale (1/2, 1/4, 1/8) whose shorter
side stays >= min_side, several times cheaper than a full decode and resize. The pipeline
passes `data.image_size` (`data.reduced_decode`): its crops resize the shorter side to
image_size anyway, so only the resampling filter differs (tests bound it). With
`data.crop="inception"` the train split passes more, the least shorter side whose smallest
crop (`data.crop_scale`'s min area at `data.crop_ratio`'s extremes) still has image_size pixels
on its shorter side (`image_decoder`), so reduced decode never makes a crop be upsampled.
Every decoder takes the same scale, so they agree on sizes too. Bytes that are not a YCbCr or
grey JPEG (PNG, WebP, CMYK JPEGs) go to PIL whatever the decoder, as do JPEGs a fast decoder
refuses (PIL then decides whether they are undecodable). OpenCV ignores EXIF orientation here,
as PIL does, but decodes what a truncated JPEG holds where PIL and simplejpeg refuse it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
from collections.abc import Callable

import ml_collections
import numpy as np
from PIL import Image

from vlm_jax.data import preprocess
from vlm_jax.registry import Registry

DECODERS = Registry("data.decoder")
FASTEST_FIRST = ("simplejpeg", "opencv", "pil")  # by measurement (module docstring); "auto"
# decoder -> (module it imports, how to install it)
PACKAGES = {
    "pil": ("PIL", "pip install pillow"),
    "simplejpeg": ("simplejpeg", "pip install simplejpeg"),
    "opencv": ("cv2", "pip install opencv-python-headless"),
}
SCALES = (8, 4, 2)  # libjpeg's IDCT reductions, largest first
_JPEG_MAGIC = b"\xff\xd8\xff"
_CV2_REDUCED = {1: 0, 2: 16, 4: 32, 8: 64}  # cv2.IMREAD_REDUCED_GRAYSCALE_{2,4,8}


def installed(name: str) -> bool:
    """Whether the package decoder `name` needs is importable (False for unknown names)."""
    return name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is not None


def decoder_choices() -> tuple[str, ...]:
    return ("auto", *DECODERS.names())


def available(name: str) -> bool:
    """data.decoder's validity test: "auto", or a decoder whose package is installed."""
    return name == "auto" or installed(name)


def resolve_decoder(name: str) -> str:
    """ "auto" -> the fastest installed decoder; a named one -> itself, if known and installed;
    else ValueError naming the valid choices or the package to install."""
    if name == "auto":
        return next(n for n in FASTEST_FIRST if installed(n))
    if name not in DECODERS:
        raise ValueError(f"data.decoder={name!r} is not one of: {', '.join(decoder_choices())}")
    if not installed(name):
        found = [n for n in FASTEST_FIRST if installed(n)]
        raise ValueError(
            f"data.decoder={name!r} needs the {PACKAGES[name][0]!r} package ({PACKAGES[name][1]}); "
            f"installed decoders: {', '.join(found)} (or 'auto')"
        )
    return name


def reduction(height: int, width: int, min_side: int) -> int:
    """The largest IDCT reduction (8, 4, 2, else 1) keeping the shorter side >= min_side
    (libjpeg rounds scaled sides up, so floor division is the safe test); 1 for min_side=0."""
    shorter = min(height, width)
    return next((f for f in SCALES if min_side and shorter // f >= min_side), 1)


def is_jpeg(data: bytes) -> bool:
    return data[:3] == _JPEG_MAGIC


@DECODERS.register("pil")
def decode_pil(data: bytes, min_side: int = 0) -> np.ndarray:
    """uint8[H, W, 3] of any format PIL reads; JPEGs reduced through `Image.draft`."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        factor = reduction(height, width, min_side) if image.format == "JPEG" else 1
        if factor > 1:  # draft picks the largest scale <= min(w // (w//f), h // (h//f)) == f
            image.draft(image.mode, (width // factor, height // factor))
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


@DECODERS.register("simplejpeg")
def decode_simplejpeg(data: bytes, min_side: int = 0) -> np.ndarray:
    import simplejpeg

    if not is_jpeg(data):
        return decode_pil(data, min_side)
    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
        if colourspace not in ("YCbCr", "Gray"):
            return decode_pil(data, min_side)
        factor = reduction(height, width, min_side)  # its scale: the smallest >= these sides
        sides = {"min_height": -(-height // factor), "min_width": -(-width // factor)}
        return simplejpeg.decode_jpeg(data, "RGB", **(sides if factor > 1 else {}))
    except ValueError:  # refused (libjpeg error or warning): PIL decodes it or says why not
        return decode_pil(data, min_side)


@DECODERS.register("opencv")
def decode_opencv(data: bytes, min_side: int = 0) -> np.ndarray:
    import cv2

    if not is_jpeg(data):
        return decode_pil(data, min_side)
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the markers only
            (width, height), mode = header.size, header.mode
    except Exception:
        return decode_pil(data, min_side)
    if mode not in ("RGB", "L"):
        return decode_pil(data, min_side)
    flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
    flags |= _CV2_REDUCED[reduction(height, width, min_side)]
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    return decode_pil(data, min_side) if image is None else image


@dataclasses.dataclass(frozen=True)
class ImageDecoder:
    """Encoded bytes -> uint8[H, W, 3] RGB by the decoder `name` ("auto" resolved when made,
    so Grain worker processes use the one the main process chose); `min_side` > 0: JPEGs at
    reduced size (module docstring). Raises whatever the decoder raises on bad bytes."""

    name: str = "pil"
    min_side: int = 0

    def __post_init__(self):
        object.__setattr__(self, "name", resolve_decoder(self.name))

    @property
    def decode(self) -> Callable[[bytes, int], np.ndarray]:
        return DECODERS.get(self.name)

    def __call__(self, data: bytes) -> np.ndarray:
        return self.decode(data, self.min_side)


def image_decoder(data: ml_collections.ConfigDict, split: str) -> ImageDecoder:
    """The decoder of `split` a resolved `config.data` asks for: data.decoder, with
    data.reduced_decode reducing JPEGs only while every crop of the split still has a shorter
    side >= data.image_size (the train crop's `min_source_side`: image_size for crop=
    "resize_crop", more for "inception"; other splits are centre-cropped: image_size). The one
    rule of the sources of encoded images (folder, array_record, webdataset)."""
    if not data.reduced_decode:
        return ImageDecoder(data.decoder, 0)
    crop = (
        preprocess.train_crop(data) if split == "train" else preprocess.TrainCrop(data.image_size)
    )
    return ImageDecoder(data.decoder, crop.min_source_side())
