"""One compiled function's report: per-chip HBM against the chip's capacity, the largest
buffers, collectives, attention, analytic FLOPs, compile time; the table the CLI prints and the
advice when it does not fit.

FLOPs are the models' own analytic matmul count (`vlm_jax.models.flops`: 3 x forward for a
train step, forward for the others; null where the model has none), per call and per chip
(divided evenly over the chips). `mfu_at_step_time` is an ESTIMATE, not a measurement: the MFU
a call would reach if it took `--step_time_s` seconds (flops_per_chip / (step_time_s x the
chip's dense bf16 peak, vlm_jax.train.metrics.PEAK_FLOPS)); null without that flag.
"""

from __future__ import annotations

import collections
import math
import re

import jax

from vlm_jax.compile import hlo

MEMORY_FIELDS = ("arguments", "temporaries", "outputs", "generated_code")
GIB = 2**30


def memory_per_chip(compiled) -> dict[str, int]:
    """Bytes per chip from `compiled.memory_analysis()`; "total" counts donated (aliased)
    outputs once, since they reuse their arguments' buffers."""
    stats = compiled.memory_analysis()
    memory = {
        "arguments": stats.argument_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "generated_code": stats.generated_code_size_in_bytes,
    }
    memory["total"] = sum(memory[k] for k in MEMORY_FIELDS) - memory["aliased"]
    return memory


def shard_bytes(abstract_tree) -> int:
    """Logical bytes of one chip's shards of a tree of sharded ShapeDtypeStructs (what the
    mesh split predicts, before the compiler's tile padding)."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(abstract_tree)
    )


def attention_kind(impls: list[str], kernels: dict[str, int]) -> str | None:
    """What attention a program holds: the implementations its attention calls dispatched
    to (traced), "pallas" shown as "mosaic" when the HLO holds the flash kernels (else
    "pallas-interpret": lowered to plain HLO, not for the TPU); "+"-joined; None for none."""
    mosaic = any(k.startswith("flash_") for k in kernels)
    names = {("mosaic" if mosaic else "pallas-interpret") if n == "pallas" else n for n in impls}
    return "+".join(sorted(names)) or None


def flops_report(fn, chips: int, peak: float | None, step_time_s: float | None) -> dict:
    """Analytic FLOPs per call and per chip, the chip's peak, and the MFU estimate."""
    per_chip = None if fn.flops is None else fn.flops / chips
    mfu = None
    if per_chip is not None and peak and step_time_s:
        mfu = per_chip / (step_time_s * peak)
    return {
        "flops": fn.flops,
        "flops_per_chip": per_chip,
        "peak_flops_per_chip": peak,
        "step_time_s": step_time_s,
        "mfu_at_step_time": mfu,
    }


# How "collectives" counts loops (reports without this field counted every loop body once).
COLLECTIVE_COUNTING = "per step: loop bodies x trip counts (annotated or inferred)"


def function_report(fn, compiled, compile_s: float, hbm_bytes: int, impls: list[str]) -> dict:
    """The JSON object for one `steps.Function` (merged with the run's context and
    `flops_report` by the caller); `impls`: its traced attention calls' implementations."""
    text = compiled.as_text()
    memory = memory_per_chip(compiled)
    kernels = hlo.tpu_kernels(text)
    moved, loops_counted_once = hlo.collective_report(text)
    return {
        "function": fn.name,
        "memory_per_chip": memory,
        "params_per_chip": shard_bytes(fn.params),
        "hbm_per_chip": hbm_bytes,
        "fits": memory["total"] <= hbm_bytes,
        "largest_buffers": hlo.largest_buffers(text),
        "collectives": moved,  # per step: loop bodies x their trip counts
        "collective_counting": COLLECTIVE_COUNTING,
        "loops_without_trip_count": loops_counted_once,
        "attention": attention_kind(impls, kernels),
        "attention_calls": dict(collections.Counter(impls)),
        "tpu_kernels": kernels,
        "tpu_custom_calls": hlo.tpu_custom_calls(text),
        "compile_s": round(compile_s, 2),
    }


# libtpu refuses to compile a program that cannot fit: "RESOURCE_EXHAUSTED: Ran out of memory
# on HBM, the total memory required for HLO temporaries (127.30G) exceeds available HBM (15.75G)"
_OOM_NEED = re.compile(r"(?:required for[^(]*\(|Used )(?P<size>[\d.]+)(?P<unit>[KMGT]?)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory_report(fn, error: Exception, compile_s: float, hbm_bytes: int) -> dict | None:
    """The report of a function the compiler rejected for want of HBM (None for any other
    error): the need is the compiler's own figure, at least the part it names."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    match = _OOM_NEED.search(text)
    need = None
    if match:
        need = int(float(match["size"]) * _UNITS[match["unit"]])
    return {
        "function": fn.name,
        "memory_per_chip": {"total": need},
        "params_per_chip": shard_bytes(fn.params),
        "hbm_per_chip": hbm_bytes,
        "fits": False,
        "compiler_error": text.strip().splitlines()[0][:500],
        "largest_buffers": [],
        "collectives": {},
        "attention": None,
        "attention_calls": {},
        "tpu_kernels": {},
        "tpu_custom_calls": None,
        "compile_s": round(compile_s, 2),
    }


def _gib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.2f}" if n >= GIB / 100 else f"{n / 2**20:.1f}M"


def _tflops(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e12:.3g}"


def _mfu(r: dict) -> str:
    return "-" if r.get("mfu_at_step_time") is None else f"{100 * r['mfu_at_step_time']:.1f}%"


def _largest(r: dict) -> str:
    top = r["largest_buffers"][:1]
    return "-" if not top else f"{top[0]['shape']} {top[0]['op']} {_gib(top[0]['bytes'])}"


def table(rows: list[dict]) -> str:
    """A fixed-width table: one line per function; memory in GiB (M: MiB), collective bytes
    in MiB per chip as the program text holds them, analytic TFLOP per chip, the MFU estimate
    at --step_time_s, and the largest buffer (shape, op, GiB)."""
    head = (
        f"{'function':<12} {'args':>7} {'temp':>7} {'out':>7} {'code':>7} {'total':>7} "
        f"{'/ HBM':>6} {'fits':>4} {'attention':>10} {'AR/AG/RS/A2A/CP MiB':>26} "
        f"{'TFLOP/chip':>10} {'MFU@t':>6} {'compile':>8}  largest buffer"
    )
    lines = [head]
    for r in rows:
        m = r["memory_per_chip"]
        moved = "/".join(f"{c['bytes'] / 2**20:.1f}" for c in r["collectives"].values()) or "-"
        sizes = " ".join(f"{_gib(m.get(k)):>7}" for k in (*MEMORY_FIELDS, "total"))
        lines.append(
            f"{r['function']:<12} {sizes} {r['hbm_per_chip'] // GIB:>5}G "
            f"{'yes' if r['fits'] else 'NO':>4} {r['attention'] or '-':>10} {moved:>26} "
            f"{_tflops(r.get('flops_per_chip')):>10} {_mfu(r):>6} {r['compile_s']:>7.1f}s  "
            f"{_largest(r)}"
        )
    return "\n".join(lines)


def not_fit_message(row: dict, config, device_kind: str) -> str:
    """Names the function, the per-chip need, the capacity and the knobs that reduce it."""
    mesh = row["mesh"]
    knobs = [
        f"mesh.shape fsdp size (now {mesh['fsdp']}; params and optimizer state split over it)",
        f"model.remat (now {config.model.get('remat')})",
        f"train.grad_cache_chunks (now {config.train.get('grad_cache_chunks', 1)})",
        f"train.batch_size (now {config.train.batch_size})",
    ]
    if "chunked" in config.get("loss", {}):
        knobs.insert(3, f"loss.chunked (now {config.loss.chunked})")
    need = row["memory_per_chip"]["total"]
    need = "more than the HBM" if need is None else f"{need / GIB:.2f} GiB per chip"
    return (
        f"{row['function']} does not fit: it needs {need} on {row['topology']} ({device_kind}, "
        f"{row['hbm_per_chip'] / GIB:.0f} GiB HBM per chip); knobs that reduce it: "
        f"{'; '.join(knobs)}"
    )
