"""Measured per-device tables behind `impl="auto"` and the flash kernel's default tiles.

Two kinds of JSON file live in `vlm_jax/kernels/tables/`, one per jax device kind
(`device_slug("NVIDIA H100 80GB HBM3")` -> "nvidia_h100_80gb_hbm3"):

  * auto/<slug>.json    milliseconds per attention impl, per (mask kind, head dim, dtype,
                        sequence length), written by `scripts/bench_attention.py --write-table`;
  * blocks/<slug>.json  the flash kernel's fastest valid tiles per (head dim, mask kind),
                        written by `scripts/tune_flash_gpu.py`.

A device kind with no file, or a call with no matching row, falls back to a fixed rule
(see `fallback_impl`, `attention.py` and `flash.default_block_sizes`), so an unmeasured chip
behaves exactly as before the tables existed.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax

from vlm_jax.kernels.mask import AttentionMask

TABLES_DIR = Path(__file__).parent / "tables"
MASK_KINDS = ("none", "causal", "prefix", "segments", "positions")
MODES = ("fwd_bwd", "fwd")  # the times `auto` ranks by, in order of preference
log = logging.getLogger(__name__)


class AttentionCall(NamedTuple):
    """What `auto` keys its choice on; all static at trace time (hashable)."""

    backend: str  # jax platform: "cpu" | "gpu" | "tpu"
    device_kind: str  # jax's device_kind, e.g. "NVIDIA H100 80GB HBM3"
    mask: str  # one of MASK_KINDS
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str  # numpy dtype name, e.g. "bfloat16"

    @property
    def seq(self) -> int:
        """The length matched against the table's buckets (keys streamed per query)."""
        return max(self.q_len, self.kv_len)


class TargetDevice(NamedTuple):
    """The devices a traced function is being compiled for."""

    platform: str  # "cpu" | "gpu" | "tpu"
    device_kind: str  # e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3", "cpu"


def target_device() -> TargetDevice:
    """Platform and kind of the devices of the mesh in scope (`jax.set_mesh`), else jax's
    default devices.

    Why not `jax.default_backend()`: a step compiled on a CPU host for a TPU topology (see
    vlm_jax/compile.py) runs under a mesh of TPU devices, and kernels must be lowered for
    those (Mosaic), not for the host (the Pallas interpreter). The abstract mesh carries the
    kind of its devices and is visible at trace time, also inside `shard_map`. Without a mesh
    (or one without device information) this is the default backend, as before.
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    if device is None:
        return TargetDevice(jax.default_backend(), jax.devices()[0].device_kind)
    return TargetDevice(device.platform, device.device_kind)


def mask_kind(mask: AttentionMask | None) -> str:
    """The mask's kind in MASK_KINDS; explicit positions or segments dominate causal."""
    if mask is None or mask.is_full:
        return "none"
    if mask.q_segment_ids is not None or mask.kv_valid is not None:
        return "segments"
    if mask.q_positions is not None or mask.kv_positions is not None or mask.window is not None:
        return "positions"  # causal here: is_full caught the rest
    prefix = mask.prefix_lengths is not None or mask.kv_prefix is not None
    return "prefix" if prefix else "causal"


def device_slug(device_kind: str) -> str:
    """File-name form of a device kind: lower case, runs of other characters -> "_"."""
    return re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_")


def table_path(kind: str, device_kind: str, tables_dir: Path | None = None) -> Path:
    """tables/<kind>/<slug>.json with kind "auto" (impl times) or "blocks" (tiles)."""
    if kind not in ("auto", "blocks"):
        raise ValueError(f"table kind={kind!r} is not one of: auto, blocks")
    return Path(tables_dir or TABLES_DIR) / kind / f"{device_slug(device_kind)}.json"


@functools.cache
def _read(path: Path) -> dict | None:
    """A table file's contents, read once per process; None when there is none."""
    return json.loads(path.read_text()) if path.is_file() else None


def load_table(kind: str, device_kind: str, tables_dir: Path | None = None) -> dict | None:
    return _read(table_path(kind, device_kind, tables_dir))


def fallback_impl(backend: str, registered: list[str]) -> str:
    """The rule for unmeasured devices and shapes: our kernel on GPU/TPU, XLA elsewhere."""
    return "pallas" if backend in ("gpu", "tpu") and "pallas" in registered else "xla"


def nearest(entries: list[dict], seq: int) -> dict | None:
    """The entry whose "seq" is nearest to `seq` on a log scale (ties: the shorter)."""
    if not entries:
        return None
    return min(entries, key=lambda e: (abs(math.log2(e["seq"] / seq)), e["seq"]))


def measured_times(table: dict | None, call: AttentionCall) -> dict[str, float]:
    """{impl: ms} of the nearest-length row for the call's (mask, head dim, dtype); {} if none.

    Forward+backward times when the row has them (training is the common caller), else forward.
    """
    rows = [
        e
        for e in (table or {}).get("entries", [])
        if (e["mask"], e["head_dim"], e["dtype"]) == (call.mask, call.head_dim, call.dtype)
    ]
    row = nearest(rows, call.seq)
    if row is None:
        return {}
    return next((row["ms"][m] for m in MODES if row["ms"].get(m)), {})


def choose_impl(call: AttentionCall, supported: list[str], tables_dir: Path | None = None) -> str:
    """The fastest measured impl among `supported`, else `fallback_impl`; logged once per call.

    CPU never consults a table: `auto` stays XLA there, so CPU results never change.
    """
    times = {}
    if call.backend != "cpu":
        measured = measured_times(load_table("auto", call.device_kind, tables_dir), call)
        times = {impl: ms for impl, ms in measured.items() if impl in supported}
    if times:
        impl = min(times, key=times.get)
        reason = f"fastest measured ({', '.join(f'{k} {v} ms' for k, v in times.items())})"
    else:
        impl, reason = fallback_impl(call.backend, supported), "no measurement: fallback rule"
    _log_choice(call, impl, reason)
    return impl


@functools.cache
def _log_choice(call: AttentionCall, impl: str, reason: str) -> None:
    """Log each distinct choice once (the cache makes repeated traces silent)."""
    log.info("attention auto: %s for %s: %s", impl, call._asdict(), reason)


def auto_table(rows: list[dict], device_kind: str, source: str) -> dict:
    """An auto table from benchmark rows {case, mask, head_dim, dtype, seq, mode, impl, ms}.

    Rows of one (mask, head_dim, dtype, seq) merge into one entry; later rows win.
    """
    entries: dict[tuple, dict] = {}
    for r in rows:
        key = (r["mask"], r["head_dim"], r["dtype"], r["seq"])
        entry = entries.setdefault(key, dict(zip(("mask", "head_dim", "dtype", "seq"), key)))
        entry["case"] = r["case"]
        entry.setdefault("ms", {}).setdefault(r["mode"], {})[r["impl"]] = r["ms"]
    return {"device_kind": device_kind, "source": source, "entries": list(entries.values())}


def output_path(path: str, device_kind: str) -> Path:
    """`path` itself (a .json file), or <path>/<slug>.json when it is a directory or ends in /."""
    if Path(path).is_dir() or path.endswith("/"):
        return Path(path) / f"{device_slug(device_kind)}.json"
    return Path(path)


def provenance(device_kind: str) -> str:
    """A table's "source": the command that measured it, where, with which jax, when."""
    return (
        f"python {' '.join(sys.argv)} on {device_kind}, jax {jax.__version__}, "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}"
    )


def write_table(path: Path, table: dict) -> Path:
    """Write a table as indented JSON (directories created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")
    _read.cache_clear()
    return path


def head_dim_bucket(head_dim: int) -> int:
    """The tuned head dims (64, 128, 256) a head dim takes its tiles from."""
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def tuned_blocks(
    device_kind: str, head_dim: int, mask: str, tables_dir: Path | None = None
) -> dict | None:
    """BlockSizes fields tuned for (device, head-dim bucket, mask kind), or None if unmeasured."""
    table = load_table("blocks", device_kind, tables_dir) or {}
    bucket = head_dim_bucket(head_dim)
    for entry in table.get("entries", []):
        if (entry["head_dim"], entry["mask"]) == (bucket, mask):
            return dict(entry["blocks"])
    return None
