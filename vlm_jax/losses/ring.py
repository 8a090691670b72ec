"""The generic tiled ring: per-row and per-column statistics of all B x B pair logits.

A loss over all pairs (contrastive: sigmoid, softmax) is split into per-row and per-column
statistics of the logits l_ij = scale <x_i, y_j> + bias plus what is local to each example; a
`TileRule` says how one tile of logits updates the statistics and what their gradient is.
`pairwise_stats` computes them without ever holding more than tile x tile logits per device:
under `shard_map` each device keeps its rows (image embeddings) and passes its columns (text
embeddings, and the column statistics that belong to them) round the batch axes with
`ppermute`; each b_local x b_local block is itself tiled by `lax.scan`. A custom VJP re-runs
the ring for the gradient, so no logits are kept as residuals either.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

Array = jax.Array
Ring = tuple[tuple[str, ...], int]  # (batch mesh axes, number of devices on them)


def similarities(image_emb: Array, text_emb: Array) -> Array:
    """float32[Bi, Bt]: <x_i, y_j>."""
    return jnp.einsum("ie,te->it", image_emb, text_emb)


class TileRule(NamedTuple):
    """A loss's all-pairs part as per-row and per-column statistics of the logits.

    Masked (padding) logits arrive as -inf, which both rules treat as "no pair".
    """

    init: float  # statistic of a row/column that has seen no pair yet
    # (logits[t, t], row[t], col[t]) -> (row, col)
    update: Callable[[Array, Array, Array], tuple[Array, Array]]
    # (logits[t, t], row[t], row_ct[t], col[t], col_ct[t]) -> d(row, col)/d logits . ct: [t, t]
    dlogits: Callable[[Array, Array, Array, Array, Array], Array]


def _to_tiles(x: Array, tile: int, fill: Any = 0) -> Array:
    """[b, ...] -> [ceil(b / tile), tile, ...], padding the last tile with `fill`."""
    num_tiles = -(-x.shape[0] // tile)
    pad = [(0, num_tiles * tile - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad, constant_values=fill).reshape(num_tiles, tile, *x.shape[1:])


def _from_tiles(x: Array, size: int) -> Array:
    return x.reshape(-1, *x.shape[2:])[:size]


def _tile_loop(tile_fn, rows, row_acc, cols, col_acc, shared):
    """Visit every (row tile r, column tile c) pair once, updating row_acc[r] and col_acc[c].

    rows/row_acc and cols/col_acc are pytrees with a leading tile axis; `shared` is a carry
    that every tile updates. tile_fn(row, col, row_acc, col_acc, shared) returns the
    updated (row_acc, col_acc, shared) of one tile.
    """

    def over_rows(carry, row_in):
        col_acc, shared = carry
        row, row_a = row_in

        def over_cols(carry, col_in):
            row_a, shared = carry
            col, col_a = col_in
            row_a, col_a, shared = tile_fn(row, col, row_a, col_a, shared)
            return (row_a, shared), col_a

        (row_a, shared), col_acc = jax.lax.scan(over_cols, (row_a, shared), (cols, col_acc))
        return (col_acc, shared), row_a

    (col_acc, shared), row_acc = jax.lax.scan(over_rows, (col_acc, shared), (rows, row_acc))
    return row_acc, col_acc, shared


def _ring_loop(tile_fn, rows, row_acc, cols, col_acc, shared, ring: Ring | None):
    """Run the tile loop against every device's columns; columns travel, rows stay.

    After `n` shifts round the ring the travelling columns and their accumulators are back on
    the device that owns them.
    """
    if ring is None:
        return _tile_loop(tile_fn, rows, row_acc, cols, col_acc, shared)
    axes, n = ring
    shift = [(i, (i + 1) % n) for i in range(n)]

    def step(_, carry):
        row_acc, cols, col_acc, shared = carry
        row_acc, col_acc, shared = _tile_loop(tile_fn, rows, row_acc, cols, col_acc, shared)
        cols, col_acc = jax.lax.ppermute((cols, col_acc), axes, shift)
        return row_acc, cols, col_acc, shared

    row_acc, _, col_acc, shared = jax.lax.fori_loop(0, n, step, (row_acc, cols, col_acc, shared))
    return row_acc, col_acc, shared


def _masked_logits(row, col, scale, bias):
    """Logits of one tile and the similarities they came from; padding pairs are -inf."""
    image_tile, row_valid = row[0], row[1]  # [t, E], [t]
    text_tile, col_valid = col[0], col[1]
    dots = similarities(image_tile, text_tile)  # [t, t]
    valid = row_valid[:, None] & col_valid[None, :]
    return jnp.where(valid, scale * dots + bias, -jnp.inf), dots, valid


def _varying(tree, ring: Ring | None):
    """Mark values made on each device as per-device (varying over the ring's axes), as the
    loop carries they start are; shard_map's type check (check_vma) requires it."""
    if ring is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.pcast(x, ring[0], to="varying"), tree)


def _tiled(tile: int, ring: Ring | None, *per_example: Array) -> tuple[Array, ...]:
    """Tiles of per-example arrays plus a validity mask [nt, t] for the padding."""
    valid = _varying(jnp.ones((per_example[0].shape[0],), bool), ring)
    return (*(_to_tiles(x, tile) for x in per_example), _to_tiles(valid, tile, False))


def _device_stats(rule: TileRule, tile: int, ring, image_emb, text_emb, scale, bias):
    """Per-row and per-column statistics of this device's rows/columns over all pairs."""
    size = image_emb.shape[0]
    rows = _tiled(min(tile, size), ring, image_emb)  # (images[nt, t, E], valid[nt, t])
    cols = _tiled(min(tile, size), ring, text_emb)
    init = _varying(jnp.full(rows[-1].shape, rule.init, jnp.float32), ring)

    def tile_fn(row, col, row_stat, col_stat, shared):
        logits, _, _ = _masked_logits(row, col, scale, bias)
        row_stat, col_stat = rule.update(logits, row_stat, col_stat)
        return row_stat, col_stat, shared

    row_stat, col_stat, _ = _ring_loop(tile_fn, rows, init, cols, init, (), ring)
    return _from_tiles(row_stat, size), _from_tiles(col_stat, size)


def _device_stats_grad(
    rule: TileRule, tile, ring, image_emb, text_emb, scale, bias, row, col, row_ct, col_ct
):
    """VJP of `_device_stats`: a second ring pass that recomputes each tile's logits."""
    size = image_emb.shape[0]
    rows = _tiled(min(tile, size), ring, image_emb, row, row_ct)  # (..., valid)
    cols = _tiled(min(tile, size), ring, text_emb, col, col_ct)

    def tile_fn(row_in, col_in, d_image, d_text, shared):
        image_tile, row_stat, row_ct, row_valid = row_in
        text_tile, col_stat, col_ct, col_valid = col_in
        logits, dots, valid = _masked_logits(
            (image_tile, row_valid), (text_tile, col_valid), scale, bias
        )
        ct = rule.dlogits(logits, row_stat, row_ct, col_stat, col_ct)
        ct = jnp.where(valid, ct, 0.0)  # [t, t]: d loss / d logits
        d_scale, d_bias = shared
        d_image = d_image + scale * (ct @ text_tile)
        d_text = d_text + scale * (ct.T @ image_tile)
        return d_image, d_text, (d_scale + jnp.sum(ct * dots), d_bias + jnp.sum(ct))

    zeros = _varying(jnp.zeros(rows[0].shape, jnp.float32), ring)  # [nt, t, E]
    scalar = _varying(jnp.zeros((), jnp.float32), ring)
    d_image, d_text, (d_scale, d_bias) = _ring_loop(
        tile_fn, rows, zeros, cols, zeros, (scalar, scalar), ring
    )
    if ring is not None:
        d_scale, d_bias = jax.lax.psum((d_scale, d_bias), ring[0])
    return _from_tiles(d_image, size), _from_tiles(d_text, size), d_scale, d_bias


def pairwise_stats(
    rule: TileRule, tile_size: int, mesh: Mesh | None = None, batch_axes: tuple[str, ...] = ()
) -> Callable[[Array, Array, Array, Array], tuple[Array, Array]]:
    """(image_emb[B,E], text_emb[B,E], scale[], bias[]) -> (row_stat[B], col_stat[B]).

    With a mesh, B is split over `batch_axes` (a ring over those axes) and the statistics come
    back split the same way; without one it is a single-device tile loop.
    """
    ring = None
    if mesh is not None:
        ring = (tuple(batch_axes), math.prod(mesh.shape[a] for a in batch_axes))
    forward = functools.partial(_device_stats, rule, tile_size, ring)
    backward = functools.partial(_device_stats_grad, rule, tile_size, ring)
    if mesh is not None:
        rows, scalar = P(tuple(batch_axes)), P()
        forward = jax.shard_map(
            forward,
            mesh=mesh,
            in_specs=(rows, rows, scalar, scalar),
            out_specs=(rows, rows),
        )
        backward = jax.shard_map(
            backward,
            mesh=mesh,
            in_specs=(rows, rows, scalar, scalar, rows, rows, rows, rows),
            out_specs=(rows, rows, scalar, scalar),
        )

    @jax.custom_vjp
    def stats(image_emb, text_emb, scale, bias):
        return forward(image_emb, text_emb, scale, bias)

    def stats_fwd(image_emb, text_emb, scale, bias):
        out = forward(image_emb, text_emb, scale, bias)
        return out, (image_emb, text_emb, scale, bias, *out)

    def stats_bwd(residuals, cts):
        return backward(*residuals, *cts)

    stats.defvjp(stats_fwd, stats_bwd)
    return stats
