"""Image and record preprocessing in NumPy/PIL (runs in Grain workers, which never touch jax).

Augmentations must keep captions true: a horizontal flip also swaps "left" and "right" in the
caption and mirrors the structured scene metadata, so the flipped record is again a correct
description of its image. A crop that can cut objects out ("inception") is refused for sources
whose captions name everything in the scene (the shapes world; sources.SHAPES's check).

Training crops (`config.data.crop`, `TrainCrop`): "resize_crop" resizes the shorter side to
image_size and takes a random square; "inception" is the Inception / RandomResizedCrop crop of
torchvision, open_clip's training transform and big_vision's inception_crop: a box of random
area (a fraction in `crop_scale` of the image's) and aspect ratio (width / height, log-uniform
in `crop_ratio`) at a random place, resized (bicubic) to image_size x image_size.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from vlm_jax.data import shapes

_MIRROR_WORDS = {"left": "right", "right": "left"}
_MIRROR_RELATION = np.asarray(
    [
        shapes.RELATIONS.index(shapes.INVERSE_RELATION[r]) if "left" in r or "right" in r else i
        for i, r in enumerate(shapes.RELATIONS)
    ],
    np.int32,
)


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3] in [0, 255] -> float32[H, W, 3] in [-1, 1]."""
    return image.astype(np.float32) / 127.5 - 1.0


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
    """Resize (anti-aliased bicubic) so the shorter side is `size`, keeping the aspect ratio."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(new_size, Image.Resampling.BICUBIC))


def crop(image: np.ndarray, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A size x size crop: random with `rng`, central without."""
    height, width = image.shape[:2]
    if rng is None:
        top, left = (height - size) // 2, (width - size) // 2
    else:
        top, left = int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))
    return image[top : top + size, left : left + size]


def fit_image(image: np.ndarray, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8[H, W, 3] -> uint8[size, size, 3]: shorter side to `size`, then crop."""
    if image.shape[:2] == (size, size):
        return image
    return crop(resize_shorter(image, size), size, rng)


CROPS = ("resize_crop", "inception")  # config.data.crop
OPEN_CLIP_SCALE = (0.9, 1.0)  # open_clip's AugmentationCfg.scale (torchvision's is (0.08, 1))
INCEPTION_RATIO = (3 / 4, 4 / 3)  # torchvision's / open_clip's RandomResizedCrop ratio
INCEPTION_ATTEMPTS = 10  # boxes drawn before the central fallback (as torchvision)


def inception_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, box_height, box_width) of an Inception crop of a height x width image.

    Draws an area fraction uniform in `scale` and an aspect ratio (width / height) log-uniform
    in `ratio`, rounds the sides and keeps the first box that fits (placed uniformly at random);
    after INCEPTION_ATTEMPTS misses, the largest central box whose aspect ratio is clamped to
    `ratio` (the whole image if its own lies in `ratio`).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(INCEPTION_ATTEMPTS):
        box_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        box_w, box_h = round(math.sqrt(box_area * aspect)), round(math.sqrt(box_area / aspect))
        if 0 < box_w <= width and 0 < box_h <= height:
            top, left = int(rng.integers(height - box_h + 1)), int(rng.integers(width - box_w + 1))
            return top, left, box_h, box_w
    aspect = min(max(width / height, ratio[0]), ratio[1])
    box_w, box_h = min(width, round(height * aspect)), min(height, round(width / aspect))
    return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def inception_crop(
    image: np.ndarray,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """uint8[H, W, 3] -> uint8[size, size, 3]: an `inception_box` cut out, then resized
    (anti-aliased bicubic, as open_clip's)."""
    top, left, box_h, box_w = inception_box(*image.shape[:2], scale, ratio, rng)
    box = Image.fromarray(image[top : top + box_h, left : left + box_w])
    return np.asarray(box.resize((size, size), Image.Resampling.BICUBIC))


@dataclasses.dataclass(frozen=True)
class TrainCrop:
    """The crop of train records (`config.data.crop`, module docstring) and the decode size it
    needs. `scale` and `ratio` are the Inception crop's (unused by "resize_crop")."""

    size: int
    kind: str = "resize_crop"
    scale: tuple[float, float] = OPEN_CLIP_SCALE
    ratio: tuple[float, float] = INCEPTION_RATIO

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8[H, W, 3] -> uint8[size, size, 3]."""
        if self.kind == "inception":
            return inception_crop(image, self.size, self.scale, self.ratio, rng)
        return fit_image(image, self.size, rng)

    def shorter_side_fraction(self) -> float:
        """A lower bound on (a crop's shorter side) / (the image's shorter side S), before
        rounding. A drawn box of area fraction s >= scale_min of an image of area >= S^2 and
        aspect r in [ratio_min, ratio_max] has sides sqrt(s * area * r) and sqrt(s * area / r),
        so its shorter side is >= S * sqrt(scale_min * min(ratio_min, 1 / ratio_max)); the
        fallback box's is >= S * min(1, ratio_max, 1 / ratio_min). "resize_crop": 1."""
        if self.kind != "inception":
            return 1.0
        (scale_min, _), (ratio_min, ratio_max) = self.scale, self.ratio
        drawn = math.sqrt(scale_min * min(ratio_min, 1 / ratio_max))
        return min(drawn, 1.0, ratio_max, 1 / ratio_min)

    def min_source_side(self) -> int:
        """The least shorter side of a decoded image whose every crop has a shorter side >=
        size, so no crop is upsampled: what reduced decode must keep (decode.image_decoder)."""
        return math.ceil(self.size / self.shorter_side_fraction())


def train_crop(data) -> TrainCrop:
    """The TrainCrop of a resolved `config.data` (crop, crop_scale, crop_ratio, image_size)."""
    return TrainCrop(
        data.image_size,
        data.crop,
        tuple(float(x) for x in data.crop_scale),
        tuple(float(x) for x in data.crop_ratio),
    )


def mirror_caption(caption: str) -> str:
    """Swap the words "left" and "right" (the only words a horizontal flip makes false)."""
    return " ".join(_MIRROR_WORDS.get(word, word) for word in caption.split(" "))


def hflip_record(record: dict) -> dict:
    """Horizontally flipped image with a caption (and shapes metadata, if any) still true."""
    flipped = dict(
        record, image=record["image"][:, ::-1], caption=mirror_caption(record["caption"])
    )
    if "shape_center" in record:
        width = record["image"].shape[1]
        centers = record["shape_center"].copy()
        present = record["shape_colour"] >= 0
        centers[present, 0] = width - centers[present, 0]
        flipped["shape_center"] = centers
    if "relation" in record and record["relation"] >= 0:
        flipped["relation"] = _MIRROR_RELATION[record["relation"]]
    return flipped
