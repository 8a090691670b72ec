"""The generic tiled ring: per-row and per-column statistics of all B x B pair logits.

A loss over all pairs (contrastive: sigmoid, softmax) is split into per-row and per-column
statistics of the logits l_ij = scale <x_i, y_j> + bias plus what is local to each example; a
`TileRule` says how one tile of logits updates the statistics and what their gradient is.
`pairwise_stats` computes them without ever holding more than tile x tile logits per device:
under `shard_map` each device keeps its rows (image embeddings) and passes its columns (text
embeddings, and the column statistics that belong to them) round the batch axes with
`ppermute`; each b_local x b_local block is itself tiled by `lax.scan`. A custom VJP re-runs
the ring for the gradient, so no logits are kept as residuals either.

Losses whose pairs have roles beyond "matching or not" (duplicate-aware positives, weighted hard
negatives: losses/pairs.py) pass per-example `row_extra` / `col_extra` arrays (ids, mined indices)
and a `PairRoles` that turns one tile's extras into its positive mask and pair weights; the
extras of the columns travel round the ring with the text embeddings, so no B x B mask exists.
`ring_top_k` is the same ring, forward only, keeping each row's k best-scoring columns.
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

    Masked (padding) logits arrive as -inf, which both rules treat as "no pair". Rules that
    support pair weights (hard negatives) take an optional last argument `weight` float32[t, t]
    (a pair counted `weight` times); None (the default) means 1 for every pair.
    """

    init: float  # statistic of a row/column that has seen no pair yet
    # (logits[t, t], row[t], col[t][, weight[t, t]]) -> (row, col)
    update: Callable[..., tuple[Array, Array]]
    # (logits[t, t], row[t], row_ct[t], col[t], col_ct[t][, weight]) -> d(row, col)/d logits . ct
    dlogits: Callable[..., Array]


class PairRoles(NamedTuple):
    """The role of each pair of a tile, from the per-example extras of its rows and columns.

    roles(row_extra, col_extra) -> (positive bool[t, t], weight float32[t, t]): positive pairs'
    logits are summed per row and per column (and counted); weights go to the rule.
    """

    roles: Callable[[Any, Any], tuple[Array, Array]]


class Positives(NamedTuple):
    """Per-row (image) and per-column (text) sums of the positive pairs' logits, and counts."""

    row_sum: Array  # float32[B]: sum_j P_ij l_ij
    row_count: Array  # float32[B]: sum_j P_ij
    col_sum: Array  # float32[B]: sum_i P_ij l_ij
    col_count: Array  # float32[B]: sum_i P_ij


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
    """Logits of one tile and the similarities they came from; padding pairs are -inf.

    row, col: tuples (embeddings[t, E], ..., valid[t]).
    """
    image_tile, row_valid = row[0], row[-1]  # [t, E], [t]
    text_tile, col_valid = col[0], col[-1]
    dots = similarities(image_tile, text_tile)  # [t, t]
    valid = row_valid[:, None] & col_valid[None, :]
    return jnp.where(valid, scale * dots + bias, -jnp.inf), dots, valid


def _varying(tree, ring: Ring | None):
    """Mark values made on each device as per-device (varying over the ring's axes), as the
    loop carries they start are; shard_map's type check (check_vma) requires it."""
    if ring is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.pcast(x, ring[0], to="varying"), tree)


def _tiled(tile: int, ring: Ring | None, *per_example: Any) -> tuple[Any, ...]:
    """Tiles of per-example arrays (pytrees of [b, ...]) plus a validity mask [nt, t]."""
    size = jax.tree.leaves(per_example)[0].shape[0]
    valid = _varying(jnp.ones((size,), bool), ring)
    tiles = jax.tree.map(lambda x: _to_tiles(x, tile), per_example)
    return (*tiles, _to_tiles(valid, tile, False))


def _untiled(tree, size: int):
    return jax.tree.map(lambda x: _from_tiles(x, size), tree)


class _Stats(NamedTuple):
    """What the ring accumulates per row and per column, and its gradient w.r.t. the logits."""

    init: Any  # pytree of floats: the statistics of a row/column that has seen no pair yet
    # (logits[t, t], valid[t, t], row_extra, col_extra, row_acc, col_acc) -> (row_acc, col_acc)
    update: Callable[..., tuple[Any, Any]]
    # (logits, valid, row_extra, col_extra, row_acc, row_ct, col_acc, col_ct) -> float32[t, t]
    dlogits: Callable[..., Array]


def _rule_stats(rule: TileRule) -> _Stats:
    """The rule's statistics alone: every pair a negative, the diagonal handled by the loss."""

    def update(logits, valid, row_extra, col_extra, row, col):
        return rule.update(logits, row, col)

    def dlogits(logits, valid, row_extra, col_extra, row, row_ct, col, col_ct):
        return rule.dlogits(logits, row, row_ct, col, col_ct)

    return _Stats(rule.init, update, dlogits)


def _role_stats(rule: TileRule, roles: PairRoles) -> _Stats:
    """(rule statistic, sum of positive logits, positive count) per row and per column; the
    rule sees the pair weights."""

    def update(logits, valid, row_extra, col_extra, row_acc, col_acc):
        positive, weight = roles.roles(row_extra, col_extra)
        positive = positive & valid
        row, col = rule.update(logits, row_acc[0], col_acc[0], weight)
        positive_logits = jnp.where(positive, logits, 0.0)  # [t, t]
        row_acc = (row, row_acc[1] + positive_logits.sum(1), row_acc[2] + positive.sum(1))
        col_acc = (col, col_acc[1] + positive_logits.sum(0), col_acc[2] + positive.sum(0))
        return row_acc, col_acc

    def dlogits(logits, valid, row_extra, col_extra, row_acc, row_ct, col_acc, col_ct):
        positive, weight = roles.roles(row_extra, col_extra)
        ct = rule.dlogits(logits, row_acc[0], row_ct[0], col_acc[0], col_ct[0], weight)
        return ct + jnp.where(positive & valid, row_ct[1][:, None] + col_ct[1][None, :], 0.0)

    return _Stats((rule.init, 0.0, 0.0), update, dlogits)


def _device_stats(
    stats: _Stats, tile: int, ring, image_emb, text_emb, scale, bias, row_extra, col_extra
):
    """Per-row and per-column statistics of this device's rows/columns over all pairs."""
    size = image_emb.shape[0]
    rows = _tiled(min(tile, size), ring, image_emb, row_extra)  # (images, extra, valid[nt, t])
    cols = _tiled(min(tile, size), ring, text_emb, col_extra)
    init = jax.tree.map(lambda v: jnp.full(rows[-1].shape, v, jnp.float32), stats.init)
    init = _varying(init, ring)

    def tile_fn(row, col, row_acc, col_acc, shared):
        logits, _, valid = _masked_logits(row, col, scale, bias)
        row_acc, col_acc = stats.update(logits, valid, row[1], col[1], row_acc, col_acc)
        return row_acc, col_acc, shared

    row_acc, col_acc, _ = _ring_loop(tile_fn, rows, init, cols, init, (), ring)
    return _untiled(row_acc, size), _untiled(col_acc, size)


def _device_stats_grad(
    stats: _Stats, tile, ring, image_emb, text_emb, scale, bias, row_extra, col_extra, *acc_ct
):
    """VJP of `_device_stats`: a second ring pass that recomputes each tile's logits.

    acc_ct: (row_acc, col_acc, row_ct, col_ct), the statistics and their cotangents.
    """
    row, col, row_ct, col_ct = acc_ct
    size = image_emb.shape[0]
    rows = _tiled(min(tile, size), ring, image_emb, row_extra, row, row_ct)  # (..., valid)
    cols = _tiled(min(tile, size), ring, text_emb, col_extra, col, col_ct)

    def tile_fn(row_in, col_in, d_image, d_text, shared):
        image_tile, row_x, row_stat, row_ct, _ = row_in
        text_tile, col_x, col_stat, col_ct, _ = col_in
        logits, dots, valid = _masked_logits(row_in, col_in, scale, bias)
        ct = stats.dlogits(logits, valid, row_x, col_x, row_stat, row_ct, col_stat, col_ct)
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


def _ring(mesh: Mesh | None, batch_axes: tuple[str, ...]) -> Ring | None:
    if mesh is None:
        return None
    return tuple(batch_axes), math.prod(mesh.shape[a] for a in batch_axes)


def pairwise_stats(
    rule: TileRule,
    tile_size: int,
    mesh: Mesh | None = None,
    batch_axes: tuple[str, ...] = (),
    roles: PairRoles | None = None,
) -> Callable[..., tuple[Array, ...]]:
    """(image_emb[B,E], text_emb[B,E], scale[], bias[]) -> (row_stat[B], col_stat[B]).

    With a mesh, B is split over `batch_axes` (a ring over those axes) and the statistics come
    back split the same way; without one it is a single-device tile loop.

    With `roles`, the function takes two more arguments, row_extra and col_extra (pytrees of
    per-example arrays [B, ...]: the images' and the texts' inputs to roles.roles), and returns
    (row_stat[B], col_stat[B], Positives): the rule's statistics under the pair weights, and
    the positive pairs' logit sums and counts.
    """
    ring = _ring(mesh, batch_axes)
    stats_rule = _rule_stats(rule) if roles is None else _role_stats(rule, roles)
    forward = functools.partial(_device_stats, stats_rule, tile_size, ring)
    backward = functools.partial(_device_stats_grad, stats_rule, tile_size, ring)
    if mesh is not None:
        rows, scalar = P(tuple(batch_axes)), P()
        forward = jax.shard_map(
            forward,
            mesh=mesh,
            in_specs=(rows, rows, scalar, scalar, rows, rows),
            out_specs=(rows, rows),
        )
        backward = jax.shard_map(
            backward,
            mesh=mesh,
            in_specs=(rows, rows, scalar, scalar, rows, rows, rows, rows, rows, rows),
            out_specs=(rows, rows, scalar, scalar),
        )

    @jax.custom_vjp
    def stats(image_emb, text_emb, scale, bias, row_extra, col_extra):
        return forward(image_emb, text_emb, scale, bias, row_extra, col_extra)

    def stats_fwd(*args):
        out = forward(*args)
        return out, (*args, *out)

    def stats_bwd(residuals, cts):
        return (*backward(*residuals, *cts), None, None)  # no gradient for the extras

    stats.defvjp(stats_fwd, stats_bwd)
    if roles is None:
        return lambda image_emb, text_emb, scale, bias: stats(
            image_emb, text_emb, scale, bias, (), ()
        )

    def with_positives(image_emb, text_emb, scale, bias, row_extra, col_extra):
        row, col = stats(image_emb, text_emb, scale, bias, row_extra, col_extra)
        return row[0], col[0], Positives(row[1], row[2], col[1], col[2])

    return with_positives


# -- a running top-k over the ring: hard-negative mining -------------------------------------
def merge_top_k(values: Array, keys: Array, scores: Array, score_keys: Array):
    """The k best of a running top-k (values, keys [r, k]) and a block of candidates (scores
    [r, c] of the columns named score_keys [c]): (values [r, k] descending, keys [r, k])."""
    candidates = jnp.concatenate([values, scores], axis=1)  # [r, k + c]
    candidate_keys = jnp.concatenate([keys, jnp.broadcast_to(score_keys, scores.shape)], axis=1)
    values, where = jax.lax.top_k(candidates, values.shape[1])
    return values, jnp.take_along_axis(candidate_keys, where, axis=1)


def _device_top_k(score, k, tile, ring, image_emb, text_emb, row_extra, col_extra, col_keys):
    size = image_emb.shape[0]
    rows = _tiled(min(tile, size), ring, image_emb, row_extra)
    cols = _tiled(min(tile, size), ring, text_emb, col_extra, col_keys)
    best = (
        jnp.full((*rows[-1].shape, k), -jnp.inf, jnp.float32),  # [nt, t, k]
        jnp.full((*rows[-1].shape, k), -1, jnp.int32),
    )

    def tile_fn(row, col, best, col_acc, shared):
        dots = similarities(row[0], col[0])  # [t, t]
        valid = row[-1][:, None] & col[-1][None, :]
        scores = jnp.where(valid, score(dots, row[1], col[1]), -jnp.inf)
        return merge_top_k(*best, scores, col[2]), col_acc, shared

    (values, keys), _, _ = _ring_loop(tile_fn, rows, _varying(best, ring), cols, (), (), ring)
    values, keys = _untiled((values, keys), size)
    return values, jnp.where(values == -jnp.inf, -1, keys)


def ring_top_k(
    score: Callable[[Array, Any, Any], Array],
    k: int,
    tile_size: int,
    mesh: Mesh | None = None,
    batch_axes: tuple[str, ...] = (),
) -> Callable[..., tuple[Array, Array]]:
    """(image_emb[B,E], text_emb[B,E], row_extra, col_extra, col_keys int32[B]) -> each image's
    k best texts: (scores float32[B, k] descending, their col_keys int32[B, k]), found in one
    ring pass that keeps a running top-k per row as the text tiles go by (no gradient).

    score(dots[t, t], row_extra, col_extra) -> float32[t, t] ranks the pairs of a tile by their
    similarities; -inf excludes a pair. Fewer than k candidates leave keys -1 (score -inf).
    """
    ring = _ring(mesh, batch_axes)
    top_k = functools.partial(_device_top_k, score, k, tile_size, ring)
    if mesh is not None:
        rows = P(tuple(batch_axes))
        top_k = jax.shard_map(top_k, mesh=mesh, in_specs=(rows,) * 5, out_specs=(rows, rows))
    return lambda *args: top_k(*jax.lax.stop_gradient(args))
