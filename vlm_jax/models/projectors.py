"""Connectors that map vision features to language-model tokens: linear, mlp, pool.

Every connector is a linen module called as

    visual_tokens = connector(image_features, text_embeds=None, text_valid=None)
    image_features: float[B, N, Dv] (patch tokens)  ->  visual_tokens: float[B, M, out_dim]

and reports its token count without parameters: `connector.output_tokens(N) -> M`. The
token-per-patch connectors (`linear`, `mlp`) keep M = N; `pool` shrinks the grid by k x k;
the resamplers in resamplers.py emit a fixed M whatever N is. Connectors are looked up by
`config.model.connector.name` in CONNECTORS: the three above are registered here, and a
connector in its own file registers itself and adds its module name to CONNECTORS' `modules`
(imported on the first lookup), as resamplers.py (perceiver, qformer) does. Each registers with
the schema of its keys (the section holds `name` and only those).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models.layers import Dtype, logical_dense
from vlm_jax.registry import Registry
from vlm_jax.schema import Key, Schema, Select, positive, resolve

CONNECTORS = Registry("connector", modules=("vlm_jax.models.resamplers",))
CONNECTOR = Select(CONNECTORS)  # model.connector: `name` and the named connector's keys


class LinearProjector(nn.Module):
    """One dense layer per patch (LLaVA-1.0): float[B, N, Dv] -> float[B, N, out_dim]."""

    out_dim: int
    dtype: Dtype = jnp.float32

    def output_tokens(self, num_patches: int) -> int:
        return num_patches

    @nn.compact
    def __call__(self, image_features: jax.Array, **unused_text) -> jax.Array:
        return logical_dense(self.out_dim, (None, "embed"), dtype=self.dtype, name="proj")(
            image_features
        )


class MlpProjector(nn.Module):
    """Two dense layers with a GELU between (LLaVA-1.5): float[B, N, Dv] -> float[B, N, out]."""

    out_dim: int
    dtype: Dtype = jnp.float32

    def output_tokens(self, num_patches: int) -> int:
        return num_patches

    @nn.compact
    def __call__(self, image_features: jax.Array, **unused_text) -> jax.Array:
        h = logical_dense(self.out_dim, (None, "mlp"), dtype=self.dtype, name="fc1")(image_features)
        h = nn.gelu(h, approximate=False)
        return logical_dense(self.out_dim, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


def _grid_side(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"pool connector needs a square patch grid, got {num_patches} patches")
    return side


def _avg(windows: jax.Array) -> jax.Array:
    """float[B, M, k*k, Dv] -> float[B, M, Dv]"""
    return windows.mean(axis=2)


def _merge(windows: jax.Array) -> jax.Array:
    """float[B, M, k*k, Dv] -> float[B, M, k*k*Dv]"""
    return windows.reshape(*windows.shape[:2], -1)


POOL_MODES = {"avg": _avg, "merge": _merge}


class PoolProjector(nn.Module):
    """Shrink the patch grid k x k, then the MLP projector.

    `mode="avg"` averages each k x k window (channels stay Dv); `mode="merge"` concatenates
    the window's k*k patches on the channel axis (Qwen2-VL / InternVL patch merge), so no
    information is averaged away before the MLP. float[B, N, Dv] -> float[B, N / k^2, out].
    """

    out_dim: int
    pool_size: int = 2
    mode: str = "avg"
    dtype: Dtype = jnp.float32

    def output_tokens(self, num_patches: int) -> int:
        side = _grid_side(num_patches)
        if side % self.pool_size:
            raise ValueError(
                f"pool_size={self.pool_size} does not divide the {side}x{side} patch grid"
            )
        return (side // self.pool_size) ** 2

    @nn.compact
    def __call__(self, image_features: jax.Array, **unused_text) -> jax.Array:
        batch, num_patches, dim = image_features.shape
        k = self.pool_size
        out_side = math.isqrt(self.output_tokens(num_patches))
        # windows: float[B, out_side, k, out_side, k, Dv] -> [B, out_side^2, k*k, Dv]
        windows = image_features.reshape(batch, out_side, k, out_side, k, dim)
        windows = windows.transpose(0, 1, 3, 2, 4, 5).reshape(batch, out_side**2, k * k, dim)
        pooled = POOL_MODES[self.mode](windows)
        return MlpProjector(self.out_dim, dtype=self.dtype, name="mlp")(pooled)


@CONNECTORS.register("linear")
def _linear(cfg: ml_collections.ConfigDict, out_dim: int, dtype: Dtype, attention_impl: str):
    return LinearProjector(out_dim, dtype=dtype)


@CONNECTORS.register("mlp")
def _mlp(cfg: ml_collections.ConfigDict, out_dim: int, dtype: Dtype, attention_impl: str):
    return MlpProjector(out_dim, dtype=dtype)


POOL = Schema(
    {
        "pool_size": Key(
            int,
            2,
            "k: each k x k window of patches becomes one token",
            valid=positive,
            expect="a positive int",
        ),
        "pool_mode": Key(
            str,
            "avg",
            "avg: mean of the window; merge: its patches concatenated",
            choices=tuple(POOL_MODES),
        ),
    }
)


@CONNECTORS.register("pool", schema=POOL)
def _pool(cfg: ml_collections.ConfigDict, out_dim: int, dtype: Dtype, attention_impl: str):
    return PoolProjector(out_dim, pool_size=cfg.pool_size, mode=cfg.pool_mode, dtype=dtype)


def build_connector(
    cfg: ml_collections.ConfigDict, out_dim: int, *, dtype: Dtype, attention_impl: str = "auto"
) -> nn.Module:
    """The connector named by `cfg.name`, emitting `out_dim`-wide tokens; `cfg` is resolved
    against that connector's schema (its registration's `schema=`), which holds its defaults."""
    builder = CONNECTORS.get(cfg.name)
    return builder(resolve("model.connector", cfg, CONNECTOR), out_dim, dtype, attention_impl)
