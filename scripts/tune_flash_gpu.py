"""Tuning sweep of our flash kernel's tiles and Triton launch parameters, per chip.

    python scripts/tune_flash_gpu.py [--dims 64,128,256] [--masks none,causal,prefix]
        [--seq 4096] [--budget-s 150] [--verify all|improving] [--iters 10] [--max-candidates N]
        [--out vlm_jax/kernels/tables/blocks/] [--dry-run] [--tiny]

For each (head dim, mask kind) it sweeps the forward (block_q, block_k, num_warps,
num_stages) with the default backward, then the backward (block_q_bwd, block_k_bwd,
num_warps_bwd) with the forward winner's tiles and num_stages (BlockSizes has one
num_stages for both). Candidates that cannot fit an H100-class SM (shared memory, registers
per thread; see `fits`) are pruned on the host; a candidate counts only if its forward and
gradients match XLA in float32 (rel. L2 <= 2e-5) and a float64 reference in bf16 (<= 2e-2)
at an odd length. Timing: bf16, 16k tokens per call (batch = 16384 // seq), median ms.
Today's defaults are tried first, so a winner is never slower than them on this run.

Writes the winners to the blocks table that `flash.default_block_sizes` reads for this
device kind (tables/blocks/<slug>.json; --out: a .json path or a directory) and prints one
JSON line per candidate. `--dry-run` only enumerates and prunes the grid; `--tiny` runs a
tiny sweep (head dim 16, length 64, two candidates per step), interpreted on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_attention as bench

from vlm_jax.kernels import attention, autotune
from vlm_jax.kernels.flash import (
    MIN_BLOCK,
    BlockSizes,
    default_block_sizes,
    flash_attention,
)

FWD_GRID = dict(block_q=(64, 128), block_k=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3))
BWD_GRID = dict(block_q_bwd=(32, 64, 128), block_k_bwd=(32, 64, 128), num_warps_bwd=(4, 8))
SMEM_BYTES = 227 * 1024  # per SM on an H100 / H200 (opt-in maximum)
MAX_F32_PER_THREAD = 192  # f32 accumulator + score registers per thread (of 255) before spills
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}
CHECK_LENGTHS = {"full": 200, "tiny": 37}  # odd lengths (padding inside the wrapper) of the check
MASKS = ("none", "causal", "prefix")  # bench_attention.make_mask's kinds
HEADS = {64: 32, 128: 16, 256: 8}  # timing heads per head dim, as bench_attention's cases


def fits(blocks: BlockSizes, head_dim: int) -> bool:
    """Whether a candidate can plausibly run on an H100-class SM (an estimate, not a proof).

    Shared memory: bf16 q/dout tiles plus `num_stages` buffered pairs of k/v (or q/dout) tiles.
    Registers: each kernel's f32 accumulators plus its score block, spread over its threads.
    """
    d, stages = head_dim, blocks.num_stages
    bq, bk, bqb, bkb = blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd
    smem = 2 * d * max(bq + stages * 2 * bk, 2 * bkb + stages * 2 * bqb, bqb + stages * 2 * bkb)
    fwd_regs = (bq * d + bq * bk) / (32 * blocks.num_warps)
    bwd_regs = max(2 * bkb * d + bqb * bkb, bqb * d + bqb * bkb) / (32 * blocks.num_warps_bwd)
    return smem <= SMEM_BYTES and max(fwd_regs, bwd_regs) <= MAX_F32_PER_THREAD


def candidates(base: BlockSizes, grid: dict, head_dim: int, limit: int = 0) -> list[BlockSizes]:
    """`base` first, then every grid point that `fits` (each a power of two >= MIN_BLOCK)."""
    out = [base]
    for values in itertools.product(*grid.values()):
        blocks = dataclasses.replace(base, **dict(zip(grid, values)))
        tiles = (blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd)
        if any(t < MIN_BLOCK or t & (t - 1) for t in tiles):
            raise ValueError(f"tiles {tiles} must be powers of two >= {MIN_BLOCK}")
        if blocks not in out and fits(blocks, head_dim):
            out.append(blocks)
    return out[:limit] if limit else out


def reference_f64(q, k, v, visible, d_out, scale):
    """float64 attention and its (dq, dk, dv) in numpy; visible: bool[B, 1, Tq, Tk] (MHA)."""
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    s = np.where(visible, np.einsum("bqhd,bkhd->bhqk", q, k) * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    dp = np.einsum("bqhd,bkhd->bhqk", d_out, v)
    ds = p * (dp - np.sum(dp * p, -1, keepdims=True)) * scale
    dq, dk = np.einsum("bhqk,bkhd->bqhd", ds, k), np.einsum("bhqk,bqhd->bkhd", ds, q)
    return out, dq, dk, np.einsum("bhqk,bqhd->bkhd", p, d_out)


def fwd_bwd(fn):
    """jit of (q, k, v, d_out) -> (out, (dq, dk, dv)) for an attention fn(q, k, v)."""

    def run(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(d_out)

    return jax.jit(run)


def rel_errors(got, want) -> list[float]:
    flat = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    return [float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(flat(got), flat(want))]


def check(blocks: BlockSizes, head_dim: int, mask_kind: str, seq: int) -> float:
    """Worst relative error of (out, dq, dk, dv) over both dtypes, each divided by its
    tolerance: <= 1 passes. float32 against XLA, bf16 against float64; one 2-head sequence
    of `seq` tokens. float32 matmuls at full precision (no TF32), as in the tests."""
    batch, heads = 1, 2
    case = bench.Case("check", batch, heads, seq, head_dim, mask_kind)
    mask = bench.make_mask(case)
    ours = fwd_bwd(lambda q, k, v: flash_attention(q, k, v, mask, block_sizes=blocks))
    keys = jax.random.split(jax.random.key(1), 4)
    f32 = [jax.random.normal(key, (batch, seq, heads, head_dim)) for key in keys]
    bf16 = [x.astype(jnp.bfloat16) for x in f32]
    with jax.default_matmul_precision("highest"):
        xla = fwd_bwd(lambda q, k, v: attention(q, k, v, mask, impl="xla"))(*f32)
        worst = max(rel_errors(ours(*f32), xla)) / TOLERANCE["float32"]
        out, grads = ours(*bf16)
    visible = np.ones((1, 1, 1, 1), bool) if mask is None else mask.dense(batch, seq, seq)
    want = reference_f64(*bf16[:3], np.asarray(visible), bf16[3], head_dim**-0.5)
    return max(worst, max(rel_errors((out, *grads), want)) / TOLERANCE["bfloat16"])


def timing_args(head_dim: int, seq: int, tiny: bool):
    """bf16 (q, k, v, d_out) [B, T, H, D] at 16k tokens (tiny: one 2-head sequence)."""
    batch, heads = (1, 2) if tiny else (max(1, 16384 // seq), HEADS.get(head_dim, 16))
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (batch, seq, heads, head_dim)
    return [jax.random.normal(key, shape, jnp.bfloat16) for key in keys]


def measure(blocks, mask, args, mode: str, iters: int) -> float:
    """Median ms of our kernel's forward or forward+backward with `blocks`."""
    fn = lambda q, k, v: flash_attention(q, k, v, mask, block_sizes=blocks)
    step = jax.jit(fn) if mode == "fwd" else fwd_bwd(fn)
    call_args = args[:3] if mode == "fwd" else args
    return 1e3 * bench.time_it(step.lower(*call_args).compile(), call_args, iters)


def try_candidate(options, blocks, mode: str, head_dim: int, mask_kind: str, timing, best_ms):
    """One JSON row: the candidate's check (error / tolerance, <= 1 passes) and median ms.

    --verify all checks before timing; --verify improving checks only a candidate faster
    than `best_ms`, the only kind that can win (fewer compiles under a tight budget).
    """
    row = dict(mode=mode, head_dim=head_dim, mask=mask_kind, **dataclasses.asdict(blocks))
    check_len = CHECK_LENGTHS["tiny" if options.tiny else "full"]
    try:
        if options.verify == "all":
            row["error_over_tol"] = round(check(blocks, head_dim, mask_kind, check_len), 3)
            if row["error_over_tol"] > 1:
                print(json.dumps(row), flush=True)
                return row
        row["ms"] = round(measure(blocks, *timing, mode, options.iters), 4)
        if options.verify == "improving" and row["ms"] < best_ms:
            row["error_over_tol"] = round(check(blocks, head_dim, mask_kind, check_len), 3)
    except Exception as err:  # does not compile / launch on this chip: record why
        row["failure"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    print(json.dumps(row), flush=True)
    return row


def sweep_step(options, mode: str, head_dim: int, mask_kind: str, pool, deadline) -> dict:
    """Try candidates in order until `deadline` (time.monotonic(); at least one is tried).
    Returns the fastest that passed its check, {blocks, ms}, and how many were tried / failed."""
    args = timing_args(head_dim, options.seq, options.tiny)
    mask = bench.make_mask(bench.Case("t", args[0].shape[0], 1, options.seq, head_dim, mask_kind))
    best, tried, failed = None, 0, 0
    for blocks in pool:
        if tried and time.monotonic() > deadline:
            break
        tried += 1
        best_ms = float("inf") if best is None else best["ms"]
        row = try_candidate(options, blocks, mode, head_dim, mask_kind, (mask, args), best_ms)
        error = row.get("error_over_tol")
        failed += "failure" in row or (error is not None and error > 1)
        if "ms" in row and error is not None and error <= 1 and row["ms"] < best_ms:
            best = dict(blocks=blocks, ms=row["ms"])
    return dict(best=best, tried=tried, failed=failed, of=len(pool))


def tune(options, head_dim: int, mask_kind: str, deadline_for) -> dict | None:
    """One (head dim, mask) entry of the blocks table: forward sweep, then backward sweep."""
    limit = options.max_candidates
    base = default_block_sizes(head_dim)
    fwd = sweep_step(
        options, "fwd", head_dim, mask_kind, candidates(base, FWD_GRID, head_dim, limit),
        deadline_for(),
    )  # fmt: skip
    if fwd["best"] is None:
        return None
    pool = candidates(fwd["best"]["blocks"], BWD_GRID, head_dim, limit)
    bwd = sweep_step(options, "fwd_bwd", head_dim, mask_kind, pool, deadline_for())
    if bwd["best"] is None:
        return None
    blocks = dataclasses.asdict(bwd["best"]["blocks"])
    return dict(
        head_dim=autotune.head_dim_bucket(head_dim),  # the key flash.default_block_sizes uses
        measured_head_dim=head_dim,
        mask=mask_kind,
        dtype="bfloat16",
        seq=options.seq,
        blocks=blocks,
        fwd_ms=fwd["best"]["ms"],
        fwd_bwd_ms=bwd["best"]["ms"],
        tried={"fwd": fwd["tried"], "fwd_bwd": bwd["tried"]},
        grid={"fwd": fwd["of"], "fwd_bwd": bwd["of"]},
        failed={"fwd": fwd["failed"], "fwd_bwd": bwd["failed"]},
    )


def dry_run(dims: list[int], masks: list[str]) -> dict:
    """Pruned grid sizes per head dim ("kept of all"; no kernel runs): what a sweep would try.
    Building the candidates validates them (powers of two >= MIN_BLOCK, BlockSizes fields)."""
    sizes = {}
    for dim in dims:
        base = default_block_sizes(dim)
        for mode, grid in (("fwd", FWD_GRID), ("fwd_bwd", BWD_GRID)):
            kept, total = len(candidates(base, grid, dim)), math.prod(map(len, grid.values()))
            sizes.setdefault(dim, {})[mode] = f"{kept} of {total}"
    summary = {"dry_run": True, "masks": masks, "candidates": sizes}
    print(json.dumps(summary))
    return summary


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="64,128,256")
    parser.add_argument("--masks", default="none,causal,prefix")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--budget-s", type=float, default=150.0, help="timing budget, whole sweep")
    parser.add_argument("--verify", default="all", choices=("all", "improving"))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=str(autotune.TABLES_DIR / "blocks") + "/")
    parser.add_argument("--max-candidates", type=int, default=0, help="per step; 0: all")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="head dim 16, length 64: CPU check")
    options = parser.parse_args(argv)
    masks = options.masks.split(",")
    bad = [m for m in masks if m not in MASKS]
    if bad:
        parser.error(f"--masks {','.join(bad)} is not one of: {', '.join(MASKS)}")
    if options.tiny:
        options.dims, options.seq = "16", 64
        options.max_candidates = options.max_candidates or 2
    return options, [int(d) for d in options.dims.split(",")], masks


def main(argv=None) -> dict:
    options, dims, masks = parse(argv)
    if options.dry_run:
        return dry_run(dims, masks)
    groups = [(dim, mask) for dim in dims for mask in masks]
    start, share = time.monotonic(), options.budget_s / (2 * len(groups))
    steps = itertools.count(1)
    deadline_for = lambda: start + share * next(steps)  # each sweep step gets an equal share
    kind = jax.devices()[0].device_kind
    table = {"device_kind": kind, "source": autotune.provenance(kind), "entries": []}
    out = autotune.output_path(options.out, kind)
    for dim, mask in groups:  # the table is rewritten per entry: a run cut short keeps them
        if entry := tune(options, dim, mask, deadline_for):
            table["entries"].append(entry)
            autotune.write_table(out, table)
    print(json.dumps({"wrote": str(out), "entries": len(table["entries"])}))
    return table


if __name__ == "__main__":
    main()
