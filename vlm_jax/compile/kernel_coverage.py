"""Compile the Pallas flash kernel, forward and backward, for a TPU generation on a CPU host.

    python -m vlm_jax.compile.kernel_coverage --topology v5e:2x2 [--head_dims 64,128,256]

For every mask kind the kernel supports (full, causal, prefix-LM, segment ids) and head dim,
one program (`jax.value_and_grad` of the attention in q, k and v: the forward kernel and both
backward kernels) is compiled by libtpu for one chip of the topology. Prints one JSON object
per program: {"topology", "device_kind", "mask", "head_dim", "kernels": {name: count},
"compiled", "compile_s", "error"}. Exits 1 if any program fails to compile or lacks one of
the three Mosaic kernels, 2 on a bad flag or topology.

Shapes: batch 1, 4 query heads sharing 2 KV heads (GQA), 320 tokens (not a multiple of the
128-row tiles, so the padding path is compiled too), bf16.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence

KERNELS = ("flash_fwd", "flash_bwd_dkv", "flash_bwd_dq")
MASKS = ("full", "causal", "prefix_lm", "segments")
HEAD_DIMS = (64, 128, 256)
SEQ, HEADS, KV_HEADS = 320, 4, 2


def masks(seq: int) -> Iterator[tuple[str, object]]:
    """(name, AttentionMask or None) for every mask kind, batch 1."""
    import jax.numpy as jnp

    from vlm_jax.kernels.mask import AttentionMask

    yield "full", None
    yield "causal", AttentionMask(causal=True)
    yield "prefix_lm", AttentionMask(causal=True, prefix_lengths=jnp.full((1,), 100, jnp.int32))
    segments = (jnp.arange(seq)[None, :] >= 150).astype(jnp.int32)  # two packed sequences
    yield "segments", AttentionMask(q_segment_ids=segments, kv_segment_ids=segments)


def compile_one(device, mask_name: str, head_dim: int) -> dict:
    """Compile forward + backward for `device`; {"kernels", "compiled", "compile_s", "error"}."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from vlm_jax.compile import hlo
    from vlm_jax.kernels import flash

    mesh = Mesh([device], ("x",))
    one_chip = NamedSharding(mesh, PartitionSpec())
    q = jax.ShapeDtypeStruct((1, SEQ, HEADS, head_dim), jnp.bfloat16, sharding=one_chip)
    kv = jax.ShapeDtypeStruct((1, SEQ, KV_HEADS, head_dim), jnp.bfloat16, sharding=one_chip)

    def loss(q, k, v):
        mask = dict(masks(SEQ))[mask_name]
        return flash.flash_attention(q, k, v, mask).astype(jnp.float32).sum()

    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):  # the kernel lowers for the mesh's platform: Mosaic
            compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(q, kv, kv).compile()
    except Exception as e:  # Mosaic's rejection of a block shape, say: report it
        return {"kernels": {}, "compiled": False, "compile_s": None, "error": str(e)[:500]}
    kernels = hlo.tpu_kernels(compiled.as_text())
    missing = [k for k in KERNELS if k not in kernels]
    return {
        "kernels": kernels,
        "compiled": not missing,
        "compile_s": round(time.perf_counter() - start, 2),
        "error": f"no {', '.join(missing)} kernel in the compiled HLO" if missing else None,
    }


def coverage(topology, head_dims: Sequence[int] = HEAD_DIMS) -> list[dict]:
    """One row per (mask kind, head dim) compiled for the first chip of `topology`."""
    from vlm_jax.compile.topology import topology_devices

    device = topology_devices(topology)[0]
    context = {"topology": topology.name, "device_kind": device.device_kind}
    return [
        context | {"mask": name, "head_dim": dim} | compile_one(device, name, dim)
        for dim in head_dims
        for name, _ in masks(SEQ)
    ]


def main(argv: Sequence[str] | None = None) -> None:
    from vlm_jax.compile.__main__ import host_cpu_only
    from vlm_jax.compile.topology import compile_only_environment, parse_topology, require_libtpu
    from vlm_jax.config import exit_on_help, exit_on_user_error, parse_int, split_flags

    argv = sys.argv[1:] if argv is None else argv
    exit_on_help(argv, "usage: " + __doc__.splitlines()[2].strip(), __doc__)
    host_cpu_only()
    with exit_on_user_error(also=(ValueError,)):
        flags = dict(split_flags(argv))
        unknown = sorted(set(flags) - {"topology", "head_dims"})
        if unknown or "topology" not in flags:
            problem = f"unknown flag(s) {unknown}" if unknown else "missing --topology NAME"
            raise ValueError(f"{problem}; flags: --topology NAME [--head_dims 64,128,256]")
        topology = parse_topology(flags["topology"])
        dims = flags.get("head_dims", ",".join(map(str, HEAD_DIMS))).split(",")
        head_dims = [parse_int("--head_dims", d) for d in dims]
        require_libtpu()
        compile_only_environment(topology)
        rows = coverage(topology, head_dims)
    for row in rows:
        print(json.dumps(row), flush=True)
    if not all(r["compiled"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
