"""Cost of one training step of any experiment config: XLA's FLOP count, memory, step time.

    python scripts/bench_train_step.py --config configs/vlm_shapes.py:stage1
    python scripts/bench_train_step.py --config configs/siglip_shapes.py --steps 20 \\
        --config.train.batch_size=128

Builds the trainer's own jitted step (same task, sharded state, optimizer, freezing and
numerics guard as `python -m vlm_jax.train`) on the trainer's mesh and feeds it one real
batch from the config's training pipeline. Reports, as one JSON line:
  * xla_gflops: FLOPs of the compiled step on one device, as XLA counts them, and
    model_gflops: the analytic training FLOPs of the device's share of the batch (global
    batch / devices): the task's count, else 3 x the forward count of a decoder-based model
    (the TPU compile report's, vlm_jax.compile.steps);
  * temp_mib / argument_mib: the compiled step's temporary and argument memory per device;
  * step_ms: median wall time of --steps calls after --warmup calls (block_until_ready);
  * trained / frozen parameter counts (config optim.freeze).
Use it to compare recipes (stage1 vs full), attention impls, remat or batch sizes.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence

USAGE = (
    "usage: python scripts/bench_train_step.py --config configs/NAME.py[:arg] "
    "[--steps N] [--warmup N] [--config.key=value ...]"
)


def parse(argv: Sequence[str]):
    from vlm_jax.config import parse_cli, parse_int
    from vlm_jax.train.validate import CONFIG

    try:
        config, options = parse_cli(argv, CONFIG)
        unknown = sorted(set(options) - {"config", "steps", "warmup"})
        if unknown:
            raise ValueError(f"unknown flag(s) {unknown}; flags: config, steps, warmup")
        steps = parse_int("--steps", options.get("steps", "10"))
        warmup = parse_int("--warmup", options.get("warmup", "2"))
        if steps < 1 or warmup < 0:
            raise ValueError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0")
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2) from None
    return config, options["config"], steps, warmup


def param_counts(params, freeze: Sequence[str]) -> tuple[int, int]:
    """(trained, frozen) parameter counts under the optim.freeze regexes."""
    import jax

    from vlm_jax.train.optim import regex_mask

    sizes = jax.tree.leaves(jax.tree.map(lambda p: p.size, params))
    frozen = jax.tree.leaves(regex_mask(params, freeze))
    n_frozen = sum(s for s, f in zip(sizes, frozen) if f)
    return sum(sizes) - n_frozen, n_frozen


def measure(config, steps: int, warmup: int) -> dict:
    import flax.linen as nn
    import jax

    from vlm_jax import sharding
    from vlm_jax.compile.steps import train_flops_per_example
    from vlm_jax.train.distributed import train_iterator
    from vlm_jax.train.tasks import TASKS
    from vlm_jax.train.trainer import batch_contract, build_state, make_train_step
    from vlm_jax.train.validate import validate_config

    validate_config(config)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.train.worker_count = 0  # one batch is fed again and again: no workers needed
    mesh = sharding.build_mesh(config.mesh.shape)
    task = TASKS.get(config.task)(config, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(config.sharding.rules)):
        data_iter = train_iterator(task, config, mesh)
        state, state_shardings, tx, schedule = build_state(task, config, mesh)
        contract = batch_contract(task, config, mesh)
        step = make_train_step(task, tx, schedule, state_shardings, contract.shardings(mesh), mesh)
        host = next(data_iter)
        contract.check(host)
        batch = sharding.global_batch(contract.model_batch(host), mesh, config.train.batch_size)
        compiled = step.lower(state, batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        memory = compiled.memory_analysis()
        trained, frozen = param_counts(state.params, config.optim.freeze)
        model_flops = train_flops_per_example(task, config, state.params)
        for _ in range(warmup):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics if warmup else state)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)  # no re-trace in the timed calls
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    return {
        "batch_size": config.train.batch_size,
        "devices": mesh.size,
        "backend": jax.default_backend(),
        "xla_gflops": round(cost.get("flops", float("nan")) / 1e9, 3),
        "model_gflops": None
        if model_flops is None
        else round(model_flops * config.train.batch_size / mesh.size / 1e9, 3),
        "temp_mib": round(memory.temp_size_in_bytes / 2**20, 1),
        "argument_mib": round(memory.argument_size_in_bytes / 2**20, 1),
        "step_ms": round(1e3 * statistics.median(times), 2),
        "step_ms_min": round(1e3 * min(times), 2),
        "trained_params": trained,
        "frozen_params": frozen,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    config, name, steps, warmup = parse(sys.argv[1:] if argv is None else argv)
    row = {"config": name} | measure(config, steps, warmup)
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
