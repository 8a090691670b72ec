"""Attention benchmark: our Pallas flash kernel vs XLA, cuDNN and jax's Pallas GPU op.

    python scripts/bench_attention.py [--cases vit,decoder] [--impls ours,xla,cudnn,jax_pallas]
        [--modes fwd,fwd_bwd] [--dtype bfloat16] [--iters 20] [--only CASE,...] [--check]
        [--ours-blocks "bq,bk,bq_bwd,bk_bwd,warps,warps_bwd,stages;..."] [--write-table PATH]

Prints one JSON line per (case, impl, mode) and a table. FLOPs count only visible
(query, key) pairs (a causal mask halves them), 4*Tq*Tk*D per head forward and 2.5x that
backward (the FlashAttention convention). `--check` adds the relative errors of the
outputs and gradients against XLA on float32 inputs. Peak memory is the compiled program's
temporary buffers (`memory_analysis().temp_size_in_bytes`): what attention needs beyond
its inputs and outputs, which shows whether it grows with Tk or Tq*Tk.

`--write-table PATH` (a .json file, or a directory such as vlm_jax/kernels/tables/auto/ to
write <device-kind slug>.json in it) writes the dispatcher impls' times as the table that
`impl="auto"` reads, rewritten after every row so that a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.kernels import AttentionMask, BlockSizes, attention, autotune, flash_attention


class Case(NamedTuple):
    name: str
    batch: int
    heads: int
    seq: int
    dim: int
    mask: str  # "none" | "causal" | "prefix"
    kv_heads: int = 0  # 0: as many as query heads; fewer: grouped-query attention


def cases(groups: list[str]) -> list[Case]:
    """ViT shapes (bidirectional) and decoder shapes (causal / prefix-LM) at 16k tokens."""
    out = []
    if "vit" in groups:
        out += [
            Case("vit_b16_224", 256, 12, 197, 64, "none"),
            Case("vit_l14_336", 64, 16, 577, 64, "none"),
        ]
    if "decoder" in groups:
        for seq in (1024, 2048, 4096, 8192):
            out.append(Case(f"dec_causal_{seq}_d128", 16384 // seq, 16, seq, 128, "causal"))
        for seq in (1024, 4096):
            out.append(Case(f"dec_causal_{seq}_d64", 16384 // seq, 32, seq, 64, "causal"))
        for seq in (2048, 8192):
            out.append(Case(f"dec_prefix_{seq}_d128", 16384 // seq, 16, seq, 128, "prefix"))
        out.append(Case("dec_bidir_4096_d128", 4, 16, 4096, 128, "none"))
        out.append(Case("dec_gqa4_4096_d128", 4, 16, 4096, 128, "causal", kv_heads=4))
        out.append(Case("dec_causal_2048_d256", 8, 8, 2048, 256, "causal"))
    return out


def make_mask(case: Case) -> AttentionMask | None:
    if case.mask == "causal":
        return AttentionMask(causal=True)
    if case.mask == "prefix":  # half the sequence is a bidirectional prefix (image + prompt)
        return AttentionMask(causal=True, prefix_lengths=jnp.full((case.batch,), case.seq // 2))
    return None


def visible_fraction(case: Case) -> float:
    """Fraction of (query, key) pairs the mask lets through."""
    t = case.seq
    if case.mask == "causal":
        return (t + 1) / (2 * t)
    if case.mask == "prefix":  # prefix queries see the p prefix keys; query i >= p sees i + 1
        p = t // 2
        return (p * p + (t - p) * (t + p + 1) / 2) / (t * t)
    return 1.0


def jax_pallas_op(q, k, v, mask, case: Case):
    """jax.experimental.pallas.ops.gpu.attention.mha (no prefix-LM support)."""
    from jax.experimental.pallas.ops.gpu import attention as jax_attention

    if case.mask == "prefix":
        raise NotImplementedError("jax's Pallas op has no prefix-LM mask")
    if case.kv_heads and case.kv_heads != case.heads:  # it would run, but read wrong heads
        raise NotImplementedError("jax's Pallas op has no grouped-query attention")
    blocks = jax_attention.BlockSizes(
        block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64
    )
    return jax_attention.mha(
        q,
        k,
        v,
        None,
        sm_scale=1.0 / math.sqrt(case.dim),
        causal=case.mask == "causal",
        block_sizes=blocks,
    )


IMPLS: dict[str, Callable] = {
    "ours": lambda q, k, v, mask, case: flash_attention(q, k, v, mask),
    "xla": lambda q, k, v, mask, case: attention(q, k, v, mask, impl="xla"),
    "cudnn": lambda q, k, v, mask, case: attention(q, k, v, mask, impl="cudnn"),
    "jax_pallas": jax_pallas_op,
}


def ours_with_blocks(spec: str) -> Callable:
    """Our kernel with explicit tiles: "bq,bk,bq_bwd,bk_bwd,warps,warps_bwd,stages"."""
    bq, bk, bqb, bkb, warps, warps_bwd, stages = (int(x) for x in spec.split(","))
    blocks = BlockSizes(bq, bk, bqb, bkb, warps, warps_bwd, stages)
    return lambda q, k, v, mask, case: flash_attention(q, k, v, mask, block_sizes=blocks)


def build(impl: str, mode: str, case: Case, mask):
    fn = functools.partial(IMPLS[impl], mask=mask, case=case)
    if mode == "fwd":
        return jax.jit(fn)

    def fwd_bwd(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(d_out)

    return jax.jit(fwd_bwd)


def time_it(compiled, args, iters: int) -> float:
    """Median seconds of one call, after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def rel_errors(got, q, k, v, d_out, mask) -> dict:
    """Relative L2 errors of (out, dq, dk, dv) against XLA attention on float32 inputs."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    want = jax.jit(build("xla", "fwd_bwd", None, mask))(*f32)
    got_flat, want_flat = jax.tree.leaves(got), jax.tree.leaves(want)
    errs = [
        float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
        for a, b in zip(got_flat, want_flat)
    ]
    return {f"err_{n}": float(f"{e:.2e}") for n, e in zip(("out", "dq", "dk", "dv"), errs)}


def run_one(case: Case, impl: str, mode: str, dtype, iters: int, check: bool) -> dict:
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (case.batch, case.seq, case.heads, case.dim)
    kv_shape = (case.batch, case.seq, case.kv_heads or case.heads, case.dim)
    q, d_out = (jax.random.normal(key, shape, dtype) for key in keys[:2])
    k, v = (jax.random.normal(key, kv_shape, dtype) for key in keys[2:])
    args = (q, k, v) if mode == "fwd" else (q, k, v, d_out)
    mask = make_mask(case)
    row = dict(case=case.name, impl=impl, mode=mode, dtype=jnp.dtype(dtype).name, **case._asdict())
    row.pop("name")
    try:
        compiled = build(impl, mode, case, mask).lower(*args).compile()
    except Exception as err:  # an impl that does not support the case: record why
        return {**row, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    seconds = time_it(compiled, args, iters)
    flops = 4 * case.batch * case.heads * case.seq**2 * case.dim * visible_fraction(case)
    flops *= 1.0 if mode == "fwd" else 3.5
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
    row = {
        **row,
        "ms": round(seconds * 1e3, 3),
        "tflops": round(flops / seconds / 1e12, 1),
        "temp_mib": None if temp is None else round(temp / 2**20, 1),
    }
    if check and mode == "fwd_bwd":
        row.update(rel_errors(compiled(*args), q, k, v, d_out, mask))
    return row


def table(rows: list[dict]) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    head = f"{'case':24} {'mode':8} " + " ".join(f"{i[-22:]:>22}" for i in impls)
    lines = [head, "-" * len(head)]
    keyed = {(r["case"], r["mode"], r["impl"]): r for r in rows}
    for case, mode in dict.fromkeys((r["case"], r["mode"]) for r in rows):
        cells = []
        for impl in impls:
            r = keyed.get((case, mode, impl))
            if r is None or "error" in r:
                cells.append(f"{'-' if r is None else 'n/a':>22}")
            else:
                mib = r["temp_mib"] or 0
                cells.append(f"{r['tflops']:6.1f} {r['ms']:8.2f} {mib:6.0f}")
        lines.append(f"{case:24} {mode:8} " + " ".join(cells))
    return "\n".join(lines)


# Benchmark impl -> dispatcher impl name, for the auto table ("ours" runs default tiles).
DISPATCH_NAMES = {"ours": "pallas", "xla": "xla", "cudnn": "cudnn"}


def table_rows(rows: list[dict]) -> list[dict]:
    """Measured rows of dispatcher impls, as autotune.auto_table takes them.

    Grouped-query cases are left out: the table's key has no head-grouping field, so they
    would overwrite the multi-head case of the same (mask, head dim, length).
    """
    return [
        {**{k: r[k] for k in ("case", "mask", "dtype", "seq", "mode", "ms")}, "head_dim": r["dim"]}
        | {"impl": DISPATCH_NAMES[r["impl"]]}
        for r in rows
        if "error" not in r and r["impl"] in DISPATCH_NAMES and r["kv_heads"] in (0, r["heads"])
    ]


def write_auto_table(path: str, rows: list[dict]) -> Path:
    """Write the auto table of `rows` to `path` (or to <path>/<slug>.json for a directory)."""
    kind = jax.devices()[0].device_kind
    table = autotune.auto_table(table_rows(rows), kind, autotune.provenance(kind) + " (median ms)")
    return autotune.write_table(autotune.output_path(path, kind), table)


CASE_GROUPS = ("vit", "decoder")
MODES = ("fwd", "fwd_bwd")


def check_choices(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 naming a mistyped case group, impl, mode or case name (not a silent n/a)."""
    known_cases = [c.name for c in cases(list(CASE_GROUPS))]
    for flag, given, valid in [
        ("--cases", args.cases, CASE_GROUPS),
        ("--impls", args.impls, tuple(IMPLS)),
        ("--modes", args.modes, MODES),
        ("--only", args.only, known_cases),
    ]:
        bad = [name for name in filter(None, given.split(",")) if name not in valid]
        if bad:
            parser.error(f"{flag} {','.join(bad)} is not one of: {', '.join(valid)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="vit,decoder")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--modes", default="fwd,fwd_bwd")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated case names to keep")
    parser.add_argument("--check", action="store_true", help="errors vs float32 XLA")
    parser.add_argument(
        "--ours-blocks",
        default="",
        help='extra "ours" variants: "bq,bk,bq_bwd,bk_bwd,warps,warps_bwd,stages;..."',
    )
    parser.add_argument("--write-table", default="", help="auto table: a .json path or a dir")
    args = parser.parse_args()
    check_choices(parser, args)
    impls = args.impls.split(",")
    for spec in filter(None, args.ours_blocks.split(";")):
        IMPLS[f"ours@{spec}"] = ours_with_blocks(spec)
        impls.append(f"ours@{spec}")
    selected = cases(args.cases.split(","))
    if args.only:
        selected = [c for c in selected if c.name in args.only.split(",")]
    rows = []
    for case in selected:
        for mode in args.modes.split(","):
            for impl in impls:
                row = run_one(case, impl, mode, jnp.dtype(args.dtype), args.iters, args.check)
                print(json.dumps(row), flush=True)
                rows.append(row)
                if args.write_table:
                    write_auto_table(args.write_table, rows)
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.dtype}")
    print("# cells: TFLOP/s, median ms, compiled temp MiB")
    print(table(rows))


if __name__ == "__main__":
    main()
