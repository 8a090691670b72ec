"""A ViT's learned position embeddings resampled to another patch grid ("high-res fine-tuning").

A tower trained at one resolution initialises or runs at another: its `posemb` param
float[1, P + h*w, D] becomes float[1, P + H*W, D], the P prefix rows (the cls token's position)
kept as they are and the [h, w] grid resampled to [H, W] with a separable kernel. A tower with
`posemb="sincos2d"` has no such param: its table is recomputed for the grid it sees.

Methods (each reproduces a reference on the same embedding: tests/test_posemb.py):
  "bilinear", "bicubic": half-pixel centres, as torch's `F.interpolate(align_corners=False)`
      that open_clip's `resize_pos_embed` calls (bicubic + antialias is its default) and as
      `jax.image.resize` (big_vision's FlexiViT resamples with "linear"). With `antialias` the
      kernel widens by the shrink factor when the grid shrinks and each output's taps are
      normalised over the grid (PIL's rule; a=-0.5 cubic); without, the kernel keeps its width and
      taps past the edge read the edge row (torch's rule; a=-0.75 cubic).
  "bilinear_corners": the corner patches aligned, as big_vision ViT's `resample_posemb`
      (`scipy.ndimage.zoom(order=1)`); `antialias` does not apply.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RESAMPLE_METHODS = ("bicubic", "bilinear", "bilinear_corners")


@dataclasses.dataclass(frozen=True)
class Resample:
    """How a grid of position embeddings is resampled (config: init.posemb_resample/_antialias)."""

    method: str = "bicubic"
    antialias: bool = True

    def __post_init__(self):
        if self.method not in RESAMPLE_METHODS:
            raise ValueError(
                f"posemb resample method={self.method!r} is not one of: "
                + ", ".join(RESAMPLE_METHODS)
            )


def _linear(x: np.ndarray) -> np.ndarray:
    return np.maximum(1 - np.abs(x), 0)


def _cubic(a: float) -> Callable[[np.ndarray], np.ndarray]:
    """Keys' cubic convolution kernel with coefficient `a` (support |x| < 2)."""

    def kernel(x: np.ndarray) -> np.ndarray:
        x = np.abs(x)
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((x - 5) * x + 8) * x * a - 4 * a
        return np.where(x <= 1, near, np.where(x < 2, far, 0.0))

    return kernel


def resample_matrix(old: int, new: int, resample: Resample) -> np.ndarray:
    """float64[new, old]: row i holds the weights of the `old` inputs in output i (1-D)."""
    if resample.method == "bilinear_corners":
        centres = np.arange(new) * ((old - 1) / (new - 1) if new > 1 else 0.0)
        return _taps(centres, old, _linear, (0, 1))
    scale = old / new  # input patches per output patch
    centres = (np.arange(new) + 0.5) * scale - 0.5
    if resample.antialias:
        kernel = _linear if resample.method == "bilinear" else _cubic(-0.5)
        width = max(scale, 1.0)  # widened only when the grid shrinks
        weights = kernel((np.arange(old)[None, :] - centres[:, None]) / width)
        return weights / weights.sum(axis=1, keepdims=True)
    if resample.method == "bilinear":
        return _taps(centres, old, _linear, (0, 1))
    return _taps(centres, old, _cubic(-0.75), (-1, 0, 1, 2))


def _taps(centres: np.ndarray, old: int, kernel, offsets: Sequence[int]) -> np.ndarray:
    """Fixed-width kernel around each centre; a tap past an edge reads the edge (clamped)."""
    weights = np.zeros((len(centres), old))
    base = np.floor(centres).astype(int)
    rows = np.arange(len(centres))
    for offset in offsets:
        tap = base + offset
        np.add.at(weights, (rows, np.clip(tap, 0, old - 1)), kernel(tap - centres))
    return weights


def resample_grid(grid: jax.Array, new_hw: tuple[int, int], resample: Resample) -> jax.Array:
    """float[h, w, D] -> float[H, W, D] (the input itself when the grid is unchanged)."""
    (h, w), (new_h, new_w) = grid.shape[:2], new_hw
    if (h, w) == (new_h, new_w):
        return grid
    rows = jnp.asarray(resample_matrix(h, new_h, resample), jnp.float32)  # [H, h]
    cols = jnp.asarray(resample_matrix(w, new_w, resample), jnp.float32)  # [W, w]
    out = jnp.einsum("Hh,hwd,Ww->HWd", rows, grid.astype(jnp.float32), cols, precision="highest")
    return out.astype(grid.dtype)


def grid_split(old_tokens: int, new_tokens: int) -> tuple[int, int, int]:
    """(prefix, old side, new side) with old_tokens = prefix + old side^2 and likewise new: the
    fewest prefix rows (the cls position) that leave both a square grid."""
    for prefix in range(min(old_tokens, new_tokens)):
        old_side, new_side = math.isqrt(old_tokens - prefix), math.isqrt(new_tokens - prefix)
        if old_side**2 == old_tokens - prefix and new_side**2 == new_tokens - prefix:
            return prefix, old_side, new_side
    raise ValueError(
        f"cannot resample a posemb of {old_tokens} tokens to {new_tokens}: no count of prefix "
        "tokens leaves both a square grid"
    )


def resample_posemb(posemb: jax.Array, shape: Sequence[int], resample: Resample) -> jax.Array:
    """float[1, P + h*h, D] -> float[1, P + H*H, D] = `shape`: prefix rows kept, grid resampled.

    Raises ValueError naming both shapes when the width differs or no square grids fit.
    """
    shape = tuple(shape)
    if tuple(posemb.shape) == shape:
        return posemb
    if posemb.ndim != 3 or len(shape) != 3 or posemb.shape[::2] != shape[::2]:
        raise ValueError(
            f"cannot resample posemb of shape {tuple(posemb.shape)} to {shape}: expected "
            "[1, tokens, width] with the same width"
        )
    try:
        prefix, old_side, new_side = grid_split(posemb.shape[1], shape[1])
    except ValueError as error:
        raise ValueError(f"posemb {tuple(posemb.shape)} -> {shape}: {error}") from None
    logging.info(
        "resampling posemb %s -> %s (%dx%d grid -> %dx%d, %d prefix tokens, %s)",
        tuple(posemb.shape),
        shape,
        old_side,
        old_side,
        new_side,
        new_side,
        prefix,
        resample,
    )
    width = posemb.shape[2]
    grid = posemb[0, prefix:].reshape(old_side, old_side, width)
    grid = resample_grid(grid, (new_side, new_side), resample).reshape(1, -1, width)
    return jnp.concatenate([posemb[:, :prefix], grid], axis=1)


def _posemb_pairs(params: Any, target: Any, towers: Sequence[str]):
    """(tower, saved posemb, target posemb) of each ViT tower both trees hold."""
    for tower in towers:
        saved = params.get(tower, {}).get("posemb") if isinstance(params, dict) else None
        wanted = target.get(tower, {}).get("posemb") if isinstance(target, dict) else None
        if saved is not None and wanted is not None:
            yield tower, saved, wanted


def restore_layout(abstract: Any, saved: Any, towers: Sequence[str]) -> Any:
    """`abstract` (ShapeDtypeStructs with shardings) with each tower's posemb at the `saved`
    checkpoint's shape, so the checkpoint restores as saved; `resample_towers` then resizes it.
    The posemb's sharding splits only its width, so the target's fits the saved shape too."""
    out = dict(abstract)
    for tower, old, new in _posemb_pairs(saved, abstract, towers):
        if tuple(old.shape) != tuple(new.shape):
            layout = jax.ShapeDtypeStruct(tuple(old.shape), new.dtype, sharding=new.sharding)
            out[tower] = dict(out[tower], posemb=layout)
    return out


def resample_towers(params: Any, target: Any, towers: Sequence[str], resample: Resample) -> Any:
    """`params` with each of `towers`' posemb resampled to `target`'s shape and placed in its
    sharding (`target`: arrays or ShapeDtypeStructs); the identity when the shapes agree."""
    out = dict(params)
    for tower, old, new in _posemb_pairs(params, target, towers):
        if tuple(old.shape) != tuple(new.shape):
            fn = functools.partial(resample_posemb, shape=new.shape, resample=resample)
            sharding = getattr(new, "sharding", None)
            placed = {} if sharding is None else {"out_shardings": sharding}
            out[tower] = dict(out[tower], posemb=jax.jit(fn, **placed)(old))
    return out
