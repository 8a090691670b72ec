"""Per-device memory and step time of the naive vs chunked contrastive losses (loss + grad).

For each global batch B the loss and its gradient w.r.t. (image_emb, text_emb, scale, bias)
are compiled from `jax.ShapeDtypeStruct` inputs sharded over all devices, so the compile-only
figures need no real memory even at B = 1M. `memory_analysis()` gives per-device bytes.
Steps are timed only where the per-device footprint is below --time_max_mib and B is at
most --time_max_batch.

    python scripts/bench_contrastive_memory.py --devices 8            # CPU, 8 simulated devices
    python scripts/bench_contrastive_memory.py --batches 1024,65536 --losses sigmoid

Prints one JSON line per (loss, impl, batch) and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices (CPU only)")
    parser.add_argument("--batches", default="1024,4096,16384,65536,262144,1048576")
    parser.add_argument("--losses", default="sigmoid,softmax")
    parser.add_argument("--dim", type=int, default=256, help="embedding width E")
    parser.add_argument("--tile_size", type=int, default=1024)
    parser.add_argument("--time_max_mib", type=float, default=2048.0)
    parser.add_argument("--time_max_batch", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        )
    import jax  # after XLA_FLAGS

    from vlm_jax import sharding

    mesh = sharding.build_mesh((-1, 1, 1))
    rows = []
    for name in args.losses.split(","):
        for batch in map(int, args.batches.split(",")):
            for impl in ("naive", "chunked"):
                row = measure(jax, mesh, name, impl, batch, args)
                print(json.dumps(row), flush=True)
                rows.append(row)
    print_table(rows)


def measure(jax, mesh, name: str, impl: str, batch: int, args) -> dict:
    """Compile (and where it fits, time) one loss + grad step."""
    import jax.numpy as jnp
    import ml_collections
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from vlm_jax.losses import build_loss

    config = ml_collections.ConfigDict(
        dict(name=name, chunked=impl == "chunked", tile_size=args.tile_size)
    )
    loss_fn = build_loss(config, mesh)
    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))
    emb_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    emb = jax.ShapeDtypeStruct((batch, args.dim), jnp.float32, sharding=emb_sharding)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    start = time.perf_counter()
    compiled = step.lower(emb, emb, scalar, scalar).compile()
    memory = compiled.memory_analysis()
    mib = 2.0**-20
    row = dict(
        loss=name,
        impl=impl,
        global_batch=batch,
        devices=mesh.size,
        platform=jax.devices()[0].platform,
        dim=args.dim,
        tile_size=args.tile_size,
        temp_mib_per_device=memory.temp_size_in_bytes * mib,
        args_mib_per_device=memory.argument_size_in_bytes * mib,
        output_mib_per_device=memory.output_size_in_bytes * mib,
        compile_s=time.perf_counter() - start,
        step_ms=None,
    )
    footprint = row["temp_mib_per_device"] + row["args_mib_per_device"]
    if batch <= args.time_max_batch and footprint <= args.time_max_mib:
        row["step_ms"] = time_step(jax, compiled, batch, args, emb_sharding)
    return row


def time_step(jax, compiled, batch: int, args, emb_sharding) -> float:
    """Median wall time (ms) of the compiled step on random unit embeddings."""
    import jax.numpy as jnp
    import numpy as np

    keys = jax.random.split(jax.random.key(0), 2)

    def unit(key):
        x = jax.random.normal(key, (batch, args.dim))
        return jax.device_put(x / jnp.linalg.norm(x, axis=-1, keepdims=True), emb_sharding)

    inputs = (unit(keys[0]), unit(keys[1]), jnp.float32(10.0), jnp.float32(-10.0))
    jax.block_until_ready(compiled(*inputs))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def print_table(rows: list[dict]) -> None:
    header = f"{'loss':8} {'impl':8} {'B':>8} {'temp MiB/dev':>13} {'step ms':>9}"
    print(header, file=sys.stdout)
    print("-" * len(header))
    for r in rows:
        step = f"{r['step_ms']:.1f}" if r["step_ms"] is not None else "-"
        print(
            f"{r['loss']:8} {r['impl']:8} {r['global_batch']:>8} "
            f"{r['temp_mib_per_device']:>13.1f} {step:>9}"
        )


if __name__ == "__main__":
    main()
