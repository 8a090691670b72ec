"""Image and record preprocessing in NumPy/PIL (runs in Grain workers, which never touch jax).

Augmentations must keep captions true: a horizontal flip also swaps "left" and "right" in the
caption and mirrors the structured scene metadata, so the flipped record is again a correct
description of its image.
"""

from __future__ import annotations

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
