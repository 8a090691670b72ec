"""Flash attention in Pallas: tiled online-softmax forward and recomputing backward.

    out = flash_attention(q, k, v, mask)   # q[B, Tq, H, D], k/v[B, Tk, Hkv, D] -> [B, Tq, H, D]

Forward: one program per (query block, batch, head) streams key/value blocks through an
online softmax (FlashAttention-2) and saves only the log-sum-exp (base 2) per query row.
Backward (`jax.custom_vjp`): one kernel per key block accumulates dk, dv over query blocks
(and over the query heads that share the KV head, for GQA); one kernel per query block
accumulates dq. Both recompute the probabilities block by block from the saved lse.

Masks: the wrapper lowers an `AttentionMask` to at most two pairs of int32 vectors,
  * positions  (causal): key visible when `kv_pos <= q_pos`; prefix-LM keys (before
    prefix_lengths, or flagged by kv_prefix) get position INT32_MIN so every query sees
    them; default positions are not materialised.
  * segments:  key visible when `q_seg == kv_seg`; padding keys get INT32_MIN.
Each (query block, key block) pair is classified from the min/max of those vectors as
skipped (no visible entry: not computed), full (no mask applied) or partial (masked).
Odd lengths and head dims are padded inside the wrapper; padded keys are masked, padded
rows are sliced off, so results never change.

One kernel source: compiled through Triton on GPU (operands [B, T, H, D]), lowered
through Mosaic for TPU (operands transposed to [B, H, T, D]; exported for TPU in the CPU
tests, compiled by libtpu for real topologies in tests/test_compile_tpu.py), and run by the
Pallas interpreter on CPU. CPU tests also export for GPU, so the Triton lowering is checked
without a GPU. Under a mesh the
dispatcher entry `pallas_attention` runs the kernels per (batch, head) shard.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from vlm_jax.kernels import autotune
from vlm_jax.kernels.attention import ATTENTION_IMPLS
from vlm_jax.kernels.mask import AttentionMask

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: exp2(MASK - MASK) is no NaN
EMPTY_LSE = -MASK_VALUE  # lse of a row that sees no key: every recomputed p becomes 0
LOG2E = math.log2(math.e)
INT_MIN = int(np.iinfo(np.int32).min)
INT_MAX = int(np.iinfo(np.int32).max)
MIN_BLOCK = 16  # smallest matrix-unit tile (Triton dot, MXU sublanes)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two) and GPU launch parameters; tune per chip."""

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4  # GPU forward kernel
    num_warps_bwd: int = 4  # GPU backward kernels
    num_stages: int = 2  # GPU software-pipelining depth


TPU_BLOCKS = BlockSizes(128, 128, 128, 128)  # Mosaic: key tiles of the mask rows are 128-lane


def default_block_sizes(
    head_dim: int, mask: str = "causal", device_kind: str | None = None
) -> BlockSizes:
    """Tiles tuned for this GPU (tables/blocks/, by scripts/tune_flash_gpu.py) if measured,
    else ones tuned on an H100 (bf16, see benchmarks/RESULTS.md); smaller for wide heads."""
    tuned = autotune.tuned_blocks(device_kind, head_dim, mask) if device_kind else None
    if tuned is not None:
        fields = [f.name for f in dataclasses.fields(BlockSizes)]
        unknown = sorted(set(tuned) - set(fields))
        if unknown:
            raise ValueError(f"tuned blocks {unknown} are not BlockSizes fields: {fields}")
        return dataclasses.replace(_untuned_block_sizes(head_dim), **tuned)
    return _untuned_block_sizes(head_dim)


def _untuned_block_sizes(head_dim: int) -> BlockSizes:
    if head_dim <= 64:
        return BlockSizes(128, 64, 64, 64, num_warps=4, num_warps_bwd=4, num_stages=3)
    if head_dim <= 128:
        return BlockSizes(128, 128, 64, 64, num_warps=8, num_warps_bwd=4, num_stages=2)
    return BlockSizes(128, 64, 32, 32, num_warps=8, num_warps_bwd=4, num_stages=2)


class _Spec(NamedTuple):
    """Static description of one launch (hashable: a jit / custom_vjp static argument)."""

    scale: float
    causal: bool
    has_pos: bool
    has_seg: bool
    q_len: int  # true query length (rows beyond it are padding)
    kv_len: int  # true key length (keys beyond it are padding, always masked)
    q_pad: int
    kv_pad: int
    group: int  # query heads per KV head
    blocks: BlockSizes
    interpret: bool
    backend: str  # the platform the kernels are lowered for: "cpu" | "gpu" | "tpu"

    @property
    def heads_major(self) -> bool:
        """Kernel operands are [B, H, T, D] on TPU (Mosaic tiles the last two dims)."""
        return self.backend == "tpu" and not self.interpret


class _Tile(NamedTuple):
    """One block of rows: its first row, its size and its mask vectors (or None).

    Vectors are 2-D (Mosaic has no 1-D layouts): query tiles int32[size, 1], key tiles
    int32[1, size], so comparing them broadcasts to the [bq, bk] block.
    """

    start: jax.Array
    size: int
    is_query: bool
    pos: jax.Array | None
    seg: jax.Array | None


def _and(a, b):
    """Conjunction that stays a Python bool while both sides are static."""
    if a is True:
        return b
    if b is True:
        return a
    return jnp.logical_and(a, b)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """2-D matmul contracting a's dim contract[0] with b's contract[1]; f32 accumulation."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _load_tile(start, size: int, is_query: bool, pos_ref, seg_ref, whole: bool) -> _Tile:
    """Read a tile's mask vectors: `whole` refs hold the full sequence, else just the tile.

    Query-side refs are [T, 1] columns, key-side refs [1, T] rows.
    """

    def read(ref):
        if ref is None:
            return None
        if not whole:
            return ref[...]
        return ref[pl.ds(start, size), :] if is_query else ref[:, pl.ds(start, size)]

    return _Tile(start, size, is_query, read(pos_ref), read(seg_ref))


def _indices(tile: _Tile, spec: _Spec) -> jax.Array:
    """Row indices of a tile: int32[size, 1] (query) or int32[1, size] (key)."""
    shape = (tile.size, 1) if tile.is_query else (1, tile.size)
    if not spec.heads_major:  # Triton lowers only 1-D iota, Mosaic only 2-D
        return tile.start + jnp.arange(tile.size, dtype=jnp.int32).reshape(shape)
    return tile.start + lax.broadcasted_iota(jnp.int32, shape, 0 if tile.is_query else 1)


def _span(tile: _Tile, values: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(min, max) of a tile's positions; default positions are the row indices."""
    if values is None:
        return tile.start, tile.start + tile.size - 1
    return jnp.min(values), jnp.max(values)


def _classify(spec: _Spec, qt: _Tile, kt: _Tile):
    """(may_see, all_visible) for a block pair; Python bools where known statically."""
    may, full = True, True
    if spec.kv_len < spec.kv_pad:
        may = _and(may, kt.start < spec.kv_len)
        full = _and(full, kt.start + kt.size <= spec.kv_len)
    if spec.causal:
        q_lo, q_hi = _span(qt, qt.pos)
        k_lo, k_hi = _span(kt, kt.pos)
        may = _and(may, k_lo <= q_hi)
        full = _and(full, k_hi <= q_lo)
    if spec.has_seg:
        qs_lo, qs_hi = _span(qt, qt.seg)
        ks_lo, ks_hi = _span(kt, kt.seg)
        may = _and(may, (ks_lo <= qs_hi) & (qs_lo <= ks_hi))
        full = _and(full, (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo))
    return may, full


def _visible(spec: _Spec, qt: _Tile, kt: _Tile) -> jax.Array:
    """bool[bq, bk]: the mask rule of mask.py on one block pair (plus key padding)."""
    k_idx = _indices(kt, spec)  # [1, bk]
    vis = jnp.broadcast_to(k_idx < spec.kv_len, (qt.size, kt.size))
    if spec.causal:
        q_pos = _indices(qt, spec) if qt.pos is None else qt.pos  # [bq, 1]
        k_pos = k_idx if kt.pos is None else kt.pos
        vis = vis & (k_pos <= q_pos)
    if spec.has_seg:
        vis = vis & (qt.seg == kt.seg)
    return vis


def _visit(spans, load_tile, classify, body, carry):
    """Run `body` over block spans [(lo, hi, kind)] with kind "free" (no mask), "masked",
    or "dynamic" (per block: skip invisible blocks, mask only partial ones).

    Static spans keep the loops free of branches, which Triton needs to pipeline loads.
    """

    def step(kind, idx, carry):
        tile = load_tile(idx)
        if kind != "dynamic":
            return body(idx, tile, kind == "masked", carry)
        may, full = classify(tile)
        masked = functools.partial(body, idx, tile, True)
        unmasked = functools.partial(body, idx, tile, False)
        if full is True:
            inner = unmasked
        elif full is False:
            inner = masked
        else:
            inner = lambda c: lax.cond(full, unmasked, masked, c)
        if may is True:
            return inner(carry)
        return lax.cond(may, inner, lambda c: c, carry)

    for lo, hi, kind in spans:
        if not (isinstance(lo, int) and isinstance(hi, int) and lo >= hi):
            carry = lax.fori_loop(lo, hi, functools.partial(step, kind), carry)
    return carry


def _scores(spec: _Spec, q, k, qt: _Tile, kt: _Tile, masked: bool) -> jax.Array:
    """Base-2 logits float32[bq, bk] = q k^T * scale * log2(e), masked where invisible."""
    s = _dot(q, k, (1, 1)) * (spec.scale * LOG2E)
    if masked:
        s = jnp.where(_visible(spec, qt, kt), s, MASK_VALUE)
    return s


def _kv_spans(spec: _Spec, q_start, block_q: int, block_k: int) -> list:
    """Key-block spans for one query block: only those up to the diagonal when causal."""
    causal_default = spec.causal and not spec.has_pos
    hi = pl.cdiv(spec.kv_len, block_k)
    if causal_default:
        hi = jnp.minimum(hi, lax.div(q_start + block_q + block_k - 1, block_k))
    if spec.has_pos or spec.has_seg:
        return [(0, hi, "dynamic")]
    free = spec.kv_len // block_k  # blocks of real keys only
    if causal_default:  # blocks wholly at or below the diagonal
        free = jnp.minimum(free, lax.div(q_start + 1, block_k))
    return [(0, free, "free"), (free, hi, "masked")]


def _q_spans(spec: _Spec, k_start, block_q: int, block_k: int) -> list:
    """Query-block spans for one key block: only those from the diagonal on when causal."""
    causal_default = spec.causal and not spec.has_pos
    lo, hi = 0, pl.cdiv(spec.q_len, block_q)
    if causal_default:
        lo = lax.div(k_start, block_q)
    if spec.has_pos or spec.has_seg:
        return [(lo, hi, "dynamic")]
    free = lo
    if causal_default:  # first query block that sees the whole key block
        free = jnp.minimum(hi, lax.div(k_start + block_k + block_q - 2, block_q))
    if spec.kv_len % block_k:  # a key block holding padding is masked throughout
        partial = (k_start + block_k > spec.kv_len).astype(jnp.int32)
        free = jnp.maximum(free, hi * partial)
    return [(lo, free, "masked"), (free, hi, "free")]


def _split_refs(refs, spec: _Spec, n_in: int):
    """Inputs, (q_pos, kv_pos, q_seg, kv_seg) refs (None where absent), outputs."""
    inputs, rest = refs[:n_in], refs[n_in:]
    mask = [None] * 4
    if spec.has_pos:
        mask[0:2], rest = rest[:2], rest[2:]
    if spec.has_seg:
        mask[2:4], rest = rest[:2], rest[2:]
    return inputs, mask, rest


def _fwd_kernel(*refs, spec: _Spec):
    (q_ref, k_ref, v_ref), (qp, kp, qs, ks), (o_ref, lse_ref) = _split_refs(refs, spec, 3)
    bq, bk = spec.blocks.block_q, spec.blocks.block_k
    q_start = pl.program_id(0) * bq
    qt = _load_tile(q_start, bq, True, qp, qs, whole=False)
    q = q_ref[...]  # [bq, D]

    def body(j, kt, masked, carry):
        acc, m, denom = carry  # f32[bq, D], f32[bq, 1], f32[bq, 1]
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        s = _scores(spec, q, k, qt, kt, masked)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new)
        denom = alpha * denom + jnp.sum(p, axis=1, keepdims=True)
        acc = alpha * acc + _dot(p.astype(v.dtype), v, (1, 0))
        return acc, m_new, denom

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((bq, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
    )
    acc, m, denom = _visit(
        _kv_spans(spec, q_start, bq, bk),
        lambda j: _load_tile(j * bk, bk, False, kp, ks, whole=True),
        lambda kt: _classify(spec, qt, kt),
        body,
        init,
    )
    empty = m == MASK_VALUE  # the row saw no key
    denom = jnp.where(empty, 1.0, denom)
    o_ref[...] = jnp.where(empty, 0.0, acc / denom).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, EMPTY_LSE, m + jnp.log2(denom))


def _dkv_kernel(*refs, spec: _Spec):
    inputs, (qp, kp, qs, ks), (dk_ref, dv_ref) = _split_refs(refs, spec, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
    bq, bk = spec.blocks.block_q_bwd, spec.blocks.block_k_bwd
    k_start = pl.program_id(0) * bk
    kt = _load_tile(k_start, bk, False, kp, ks, whole=False)
    k, v = k_ref[...], v_ref[...]  # [bk, D]

    def head(g, carry):
        def body(i, qt, masked, carry):
            dk, dv = carry  # f32[bk, D]
            rows = pl.ds(i * bq, bq)
            pick = (lambda r: r[g, rows, :]) if spec.heads_major else (lambda r: r[rows, g, :])
            q, do = pick(q_ref), pick(do_ref)  # [bq, D]
            lse, delta = lse_ref[g, rows, :], delta_ref[g, rows, :]  # f32[bq, 1]
            p = jnp.exp2(_scores(spec, q, k, qt, kt, masked) - lse)
            dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
            ds = p * (_dot(do, v, (1, 1)) - delta)
            dk = dk + _dot(ds.astype(q.dtype), q, (0, 0))
            return dk, dv

        return _visit(
            _q_spans(spec, k_start, bq, bk),
            lambda i: _load_tile(i * bq, bq, True, qp, qs, whole=True),
            lambda qt: _classify(spec, qt, kt),
            body,
            carry,
        )

    zeros = jnp.zeros(k.shape, jnp.float32)
    if spec.group == 1:
        dk, dv = head(0, (zeros, zeros))
    else:
        dk, dv = lax.fori_loop(0, spec.group, head, (zeros, zeros))
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, spec: _Spec):
    inputs, (qp, kp, qs, ks), (dq_ref,) = _split_refs(refs, spec, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
    bq, bk = spec.blocks.block_q_bwd, spec.blocks.block_k_bwd
    q_start = pl.program_id(0) * bq
    qt = _load_tile(q_start, bq, True, qp, qs, whole=False)
    q, do = q_ref[...], do_ref[...]  # [bq, D]
    lse, delta = lse_ref[...], delta_ref[...]  # f32[bq, 1]

    def body(j, kt, masked, dq):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        p = jnp.exp2(_scores(spec, q, k, qt, kt, masked) - lse)
        ds = p * (_dot(do, v, (1, 1)) - delta)
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    dq = _visit(
        _kv_spans(spec, q_start, bq, bk),
        lambda j: _load_tile(j * bk, bk, False, kp, ks, whole=True),
        lambda kt: _classify(spec, qt, kt),
        body,
        jnp.zeros(q.shape, jnp.float32),
    )
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def _compiler_params(spec: _Spec, num_warps: int):
    """Triton launch parameters on GPU; the defaults elsewhere."""
    if spec.interpret or spec.backend != "gpu":
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=spec.blocks.num_stages)


# BlockSpecs. Grids are (row block t, batch b, head h). Operands are [B, T, H, D], or
# [B, H, T, D] when spec.heads_major; row statistics (lse, delta) are f32[B, H, Tq, 1];
# mask vectors are int32[B, Tq, 1] (query side) and int32[B, 1, Tk] (key side).


def _head_spec(spec: _Spec, rows: int, dim: int, head=lambda h: h, whole=False) -> pl.BlockSpec:
    """`rows` rows (the t-th tile, or all of them) of head `head(h)`: [rows, D]."""
    row = (lambda t: 0) if whole else (lambda t: t)
    if spec.heads_major:
        return pl.BlockSpec((None, None, rows, dim), lambda t, b, h: (b, head(h), row(t), 0))
    return pl.BlockSpec((None, rows, None, dim), lambda t, b, h: (b, row(t), head(h), 0))


def _group_spec(spec: _Spec, dim: int) -> pl.BlockSpec:
    """All query rows of the `group` query heads that share KV head h: [Tq, G, D] / [G, Tq, D]."""
    if spec.heads_major:
        return pl.BlockSpec((None, spec.group, spec.q_pad, dim), lambda t, b, h: (b, h, 0, 0))
    return pl.BlockSpec((None, spec.q_pad, spec.group, dim), lambda t, b, h: (b, 0, h, 0))


def _mask_specs(spec: _Spec, grid_over_q: bool, block: int) -> list[pl.BlockSpec]:
    """BlockSpecs of (q_pos, kv_pos) / (q_seg, kv_seg): the gridded side gets its tile."""
    if grid_over_q:
        q_side = pl.BlockSpec((None, block, 1), lambda t, b, h: (b, t, 0))
        kv_side = pl.BlockSpec((None, 1, spec.kv_pad), lambda t, b, h: (b, 0, 0))
    else:
        q_side = pl.BlockSpec((None, spec.q_pad, 1), lambda t, b, h: (b, 0, 0))
        kv_side = pl.BlockSpec((None, 1, block), lambda t, b, h: (b, 0, t))
    return [q_side, kv_side] * (int(spec.has_pos) + int(spec.has_seg))


def _call(kernel, spec: _Spec, grid, in_specs, out_specs, out_shape, args, name, num_warps):
    return pl.pallas_call(
        functools.partial(kernel, spec=spec),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(spec, num_warps),
        interpret=spec.interpret,
        name=name,
    )(*args)


def _forward(q, k, v, masks, spec: _Spec):
    """Padded inputs -> (out like q, lse f32[B, H, Tq', 1])."""
    batch, heads, dim = q.shape[0], spec.group * k.shape[2 - spec.heads_major], q.shape[-1]
    bq = spec.blocks.block_q
    q_block = _head_spec(spec, bq, dim)
    whole_kv = _head_spec(spec, spec.kv_pad, dim, lambda h: lax.div(h, spec.group), whole=True)
    return _call(
        _fwd_kernel,
        spec,
        grid=(spec.q_pad // bq, batch, heads),
        in_specs=[q_block, whole_kv, whole_kv, *_mask_specs(spec, True, bq)],
        out_specs=[q_block, pl.BlockSpec((None, None, bq, 1), lambda t, b, h: (b, h, t, 0))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, spec.q_pad, 1), jnp.float32),
        ],
        args=(q, k, v, *masks),
        name="flash_fwd",
        num_warps=spec.blocks.num_warps,
    )


def _backward(q, k, v, masks, out, lse, d_out, spec: _Spec):
    """(dq, dk, dv) from the saved lse: two kernels, no atomics."""
    kv_heads, dim = k.shape[2 - spec.heads_major], q.shape[-1]
    batch, heads, group = q.shape[0], spec.group * kv_heads, spec.group
    bq, bk = spec.blocks.block_q_bwd, spec.blocks.block_k_bwd
    to_bhtd = "bhqd" if spec.heads_major else "bqhd"
    delta = jnp.einsum(
        f"{to_bhtd},{to_bhtd}->bhq", out.astype(jnp.float32), d_out.astype(jnp.float32)
    )[..., None]  # f32[B, H, Tq', 1]

    rows_group = pl.BlockSpec((None, group, spec.q_pad, 1), lambda t, b, h: (b, h, 0, 0))
    kv_block = _head_spec(spec, bk, dim)
    dk, dv = _call(
        _dkv_kernel,
        spec,
        grid=(spec.kv_pad // bk, batch, kv_heads),
        in_specs=[
            _group_spec(spec, dim),
            kv_block,
            kv_block,
            _group_spec(spec, dim),
            rows_group,
            rows_group,
            *_mask_specs(spec, False, bk),
        ],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        args=(q, k, v, d_out, lse, delta, *masks),
        name="flash_bwd_dkv",
        num_warps=spec.blocks.num_warps_bwd,
    )

    q_block = _head_spec(spec, bq, dim)
    whole_kv = _head_spec(spec, spec.kv_pad, dim, lambda h: lax.div(h, group), whole=True)
    row_block = pl.BlockSpec((None, None, bq, 1), lambda t, b, h: (b, h, t, 0))
    dq = _call(
        _dq_kernel,
        spec,
        grid=(spec.q_pad // bq, batch, heads),
        in_specs=[
            q_block,
            whole_kv,
            whole_kv,
            q_block,
            row_block,
            row_block,
            *_mask_specs(spec, True, bq),
        ],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        args=(q, k, v, d_out, lse, delta, *masks),
        name="flash_bwd_dq",
        num_warps=spec.blocks.num_warps_bwd,
    )
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, masks, spec: _Spec):
    return _forward(q, k, v, masks, spec)[0]


def _flash_fwd(q, k, v, masks, spec: _Spec):
    out, lse = _forward(q, k, v, masks, spec)
    return out, (q, k, v, masks, out, lse)


def _flash_bwd(spec: _Spec, residuals, d_out):
    q, k, v, masks, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, masks, out, lse, d_out, spec)
    return dq, dk, dv, jax.tree.map(lambda _: None, masks)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _fit(block: int, length: int) -> int:
    """The configured block, shrunk (to a power of two >= MIN_BLOCK) for short sequences."""
    return max(MIN_BLOCK, min(block, pl.next_power_of_2(length)))


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _mask_vectors(mask: AttentionMask | None, batch, q_len, kv_len, q_pad, kv_pad):
    """AttentionMask -> (has_pos, has_seg, [q_pos, kv_pos][, q_seg, kv_seg]).

    Query-side vectors are int32[B, Tq', 1], key-side ones int32[B, 1, Tk'] (see _Tile).
    """
    if mask is None:
        return False, False, []
    vectors = []
    explicit = (mask.prefix_lengths, mask.kv_prefix, mask.q_positions, mask.kv_positions)
    has_pos = mask.causal and any(x is not None for x in explicit)
    if has_pos:
        q_pos, kv_pos = mask.positions(batch, q_len, kv_len)
        if mask.prefix_lengths is not None:  # prefix keys: visible from every query
            prefix = jnp.asarray(mask.prefix_lengths, jnp.int32)[:, None]
            kv_pos = jnp.where(kv_pos < prefix, INT_MIN, kv_pos)
        if mask.kv_prefix is not None:
            kv_pos = jnp.where(mask.kv_prefix.astype(bool), INT_MIN, kv_pos)
        vectors += [
            _pad_axis(q_pos.astype(jnp.int32), 1, q_pad, INT_MIN)[:, :, None],
            _pad_axis(kv_pos.astype(jnp.int32), 1, kv_pad, INT_MAX)[:, None, :],
        ]
    has_seg = mask.q_segment_ids is not None or mask.kv_valid is not None
    if has_seg:
        q_seg = jnp.zeros((batch, q_len), jnp.int32)
        kv_seg = jnp.zeros((batch, kv_len), jnp.int32)
        if mask.q_segment_ids is not None:
            q_seg = mask.q_segment_ids.astype(jnp.int32)
            kv_seg = mask.kv_segment_ids.astype(jnp.int32)
        if mask.kv_valid is not None:  # invalid keys join a segment no query is in
            kv_seg = jnp.where(mask.kv_valid.astype(bool), kv_seg, INT_MIN)
        vectors += [
            _pad_axis(q_seg, 1, q_pad, INT_MIN + 1)[:, :, None],
            _pad_axis(kv_seg, 1, kv_pad, INT_MIN)[:, None, :],
        ]
    return has_pos, has_seg, vectors


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: AttentionMask | None = None,
    *,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
) -> jax.Array:
    """Flash attention: q[B, Tq, H, D], k/v[B, Tk, Hkv, D] -> [B, Tq, H, D] (q's dtype).

    Differentiable in q, k, v. `backend` ("cpu" | "gpu" | "tpu") picks the lowering; by
    default it is the platform of the mesh in scope (`autotune.target_device`: a step traced
    under a mesh of TPU topology devices on a CPU host lowers through Mosaic), else jax's
    default backend. `interpret` defaults to True on CPU (the kernels then run through the
    Pallas interpreter, slowly but exactly).
    """
    batch, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    target = autotune.target_device()
    backend = backend or target.platform
    if backend not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"flash_attention backend={backend!r} is not one of: cpu, gpu, tpu")
    interpret = backend == "cpu" if interpret is None else interpret
    on_tpu = backend == "tpu" and not interpret
    compiled_gpu = backend == "gpu" and not interpret  # the only place tuned tiles apply
    device_kind = target.device_kind if compiled_gpu else None
    blocks = block_sizes or (
        TPU_BLOCKS if on_tpu else default_block_sizes(dim, autotune.mask_kind(mask), device_kind)
    )
    blocks = dataclasses.replace(
        blocks,
        block_q=_fit(blocks.block_q, q_len),
        block_k=_fit(blocks.block_k, kv_len),
        block_q_bwd=_fit(blocks.block_q_bwd, q_len),
        block_k_bwd=_fit(blocks.block_k_bwd, kv_len),
    )
    q_pad = pl.cdiv(q_len, max(blocks.block_q, blocks.block_q_bwd)) * max(
        blocks.block_q, blocks.block_q_bwd
    )
    kv_block = max(blocks.block_k, blocks.block_k_bwd)
    kv_pad = pl.cdiv(kv_len, kv_block) * kv_block
    dim_pad = max(MIN_BLOCK, pl.next_power_of_2(dim))
    has_pos, has_seg, vectors = _mask_vectors(mask, batch, q_len, kv_len, q_pad, kv_pad)
    spec = _Spec(
        scale=float(dim**-0.5 if scale is None else scale),
        causal=bool(mask is not None and mask.causal),
        has_pos=has_pos,
        has_seg=has_seg,
        q_len=q_len,
        kv_len=kv_len,
        q_pad=q_pad,
        kv_pad=kv_pad,
        group=heads // kv_heads,
        blocks=blocks,
        interpret=interpret,
        backend=backend,
    )
    layout = (lambda x: x.transpose(0, 2, 1, 3)) if spec.heads_major else (lambda x: x)
    pad = lambda x, length: layout(_pad_axis(_pad_axis(x, 1, length), 3, dim_pad))
    out = _flash(pad(q, q_pad), pad(k, kv_pad), pad(v, kv_pad), tuple(vectors), spec)
    return layout(out)[:, :q_len, :, :dim]


def _mesh_axes(logical: str, mesh, size: int) -> tuple[str, ...] | None:
    """Mesh axes an activation axis maps to under the logical rules, if they divide `size`."""
    axes = nn.logical_to_mesh_axes((logical,))[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.axis_names and a not in mesh.manual_axes)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes


@ATTENTION_IMPLS.register("pallas")
def pallas_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None, scale: float
) -> jax.Array:
    """The dispatcher's "pallas" implementation: flash_attention with default blocks.

    Under a mesh (`jax.set_mesh`) the kernels run per shard through `shard_map`, split
    over the mesh axes that the logical rules give "act_batch" and "act_heads": XLA
    cannot partition a Pallas call itself and would otherwise gather every input.
    """
    attend = lambda q, k, v, mask: flash_attention(q, k, v, mask, scale=scale)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return attend(q, k, v, mask)
    batch_axes = _mesh_axes("act_batch", mesh, q.shape[0])
    head_axes = _mesh_axes("act_heads", mesh, k.shape[2])  # q heads are a multiple
    if batch_axes is None and head_axes is None:
        return attend(q, k, v, mask)
    spec = P(batch_axes, None, head_axes, None)
    mask_spec = jax.tree.map(lambda x: P(batch_axes, *([None] * (x.ndim - 1))), mask)
    return jax.shard_map(
        attend, mesh=mesh, in_specs=(spec, spec, spec, mask_spec), out_specs=spec, check_vma=False
    )(q, k, v, mask)
