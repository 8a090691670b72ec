r"""CLI: compile a config's functions for a TPU topology; exit 1 naming what does not fit.

    python -m vlm_jax.compile --config configs/siglip_b16.py --topology v5p-64 \
        [--num_slices 2] [--functions train_step,prefill] [--step_time_s 1.5] \
        [--out report.jsonl] [--config.train.batch_size=32768]

--step_time_s T: report the MFU each function would reach if one call took T seconds (an
estimate from the analytic FLOP count, not a measurement; without it the field is null).

Exit status: 0 all fit, 1 a function does not fit in the chips' HBM, 2 a user error (bad
flag, topology, mesh, config, or libtpu missing).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

USAGE = (
    "usage: python -m vlm_jax.compile --config configs/NAME.py[:arg] --topology NAME "
    "[--num_slices N] [--functions train_step,embed_image,prefill,...] [--step_time_s T] "
    "[--out FILE.jsonl] [--config.key=value ...]"
)
FLAGS = ("config", "topology", "num_slices", "functions", "step_time_s", "out")


def parse_args(argv: Sequence[str]):
    """-> (config, options) or exit(2) naming the bad flag and the valid ones."""
    from vlm_jax.config import UserError, exit_on_help, parse_cli
    from vlm_jax.train.validate import CONFIG

    exit_on_help(argv, USAGE, __doc__)
    try:
        config, options = parse_cli(argv, CONFIG)
    except (UserError, ValueError, FileNotFoundError, TypeError) as e:
        _usage_error(str(e))
    unknown = sorted(set(options) - set(FLAGS))
    if unknown or "topology" not in options:
        _usage_error(f"unknown flag(s) {unknown}" if unknown else "missing --topology NAME")
    return config, options


def _usage_error(problem: str):
    print(f"error: {problem}; flags: {', '.join(FLAGS)}\n{USAGE}", file=sys.stderr)
    raise SystemExit(2)


def host_cpu_only() -> None:
    """This host only compiles: keep jax off any local accelerator (libtpu would otherwise
    probe for TPU chips here), unless the user chose JAX_PLATFORMS."""
    if "JAX_PLATFORMS" not in os.environ:
        import jax

        jax.config.update("jax_platforms", "cpu")


def check_mesh_matches(shape, topology, slices: int) -> None:
    """config.mesh.shape must cover the topology's chips exactly; the error names both."""
    from vlm_jax import sharding
    from vlm_jax.config import UserError

    chips = topology.chips * slices
    try:
        sharding.resolve_mesh_shape(shape, chips)
    except ValueError as e:
        raise UserError(
            f"config mesh.shape={tuple(shape)} does not fit --topology={topology.name} "
            f"({topology.libtpu_name} x {slices} slice(s) = {chips} chips): {e}"
        ) from None


def compile_functions(
    config, topology, slices: int, names: Sequence[str] = (), step_time_s: float | None = None
) -> list[dict]:
    """Compile the config's functions (`names`, default all) for the topology; one report
    per function (`step_time_s`: the call time its MFU estimate assumes)."""
    import flax.linen as nn
    import jax

    from vlm_jax import sharding
    from vlm_jax.compile import report, steps
    from vlm_jax.compile.topology import topology_devices
    from vlm_jax.train.metrics import peak_flops_per_device
    from vlm_jax.train.tasks import TASKS
    from vlm_jax.train.validate import validate_config

    validate_config(config)
    devices = topology_devices(topology, slices)
    mesh = sharding.build_mesh(config.mesh.shape, devices)
    task = TASKS.get(config.task)(config, mesh)
    context = {
        "topology": topology.name,
        "libtpu_topology": topology.libtpu_name,
        "num_slices": slices,
        "chips": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "attention_impl": config.model.get("attention_impl"),
    }
    peak = peak_flops_per_device(context["device_kind"])
    rows = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(config.sharding.rules)):
        for fn in steps.functions(task, config, mesh, names):
            row = compile_one(fn, topology.hbm_bytes)
            counts = report.flops_report(fn, len(devices), peak, step_time_s)
            rows.append(context | {"batch_size": fn.batch_size} | row | counts)
    return rows


def compile_one(fn, hbm_bytes: int) -> dict:
    """Compile one function; its report, also when the compiler rejects it for want of HBM."""
    from vlm_jax.compile import report
    from vlm_jax.kernels.attention import record_impls

    start = time.perf_counter()
    try:
        with record_impls() as impls:  # tracing happens in lower()
            lowered = fn.jitted.lower(*fn.args)
        compiled = lowered.compile()
    except Exception as e:  # libtpu: JaxRuntimeError RESOURCE_EXHAUSTED when it cannot fit
        row = report.out_of_memory_report(fn, e, time.perf_counter() - start, hbm_bytes)
        if row is None:
            raise
        return row
    return report.function_report(fn, compiled, time.perf_counter() - start, hbm_bytes, impls)


def main(argv: Sequence[str] | None = None) -> None:
    host_cpu_only()  # before anything initialises a jax backend
    from vlm_jax.compile import report
    from vlm_jax.compile.topology import compile_only_environment, parse_topology, require_libtpu
    from vlm_jax.config import exit_on_user_error, parse_float, parse_int

    config, options = parse_args(sys.argv[1:] if argv is None else argv)
    with exit_on_user_error(also=(ValueError,)):
        topology = parse_topology(options["topology"])
        slices = parse_int("--num_slices", options.get("num_slices", "1"))
        if slices < 1:
            raise ValueError(f"--num_slices={slices} must be >= 1")
        step_time_s = None
        if "step_time_s" in options:
            step_time_s = parse_float("--step_time_s", options["step_time_s"])
            if not step_time_s > 0:
                raise ValueError(f"--step_time_s={step_time_s} must be > 0 (seconds per call)")
        check_mesh_matches(config.mesh.shape, topology, slices)
        require_libtpu()
        compile_only_environment(topology)  # before libtpu loads: no TPU-VM warnings
        names = [n for n in options.get("functions", "").split(",") if n]
        rows = compile_functions(config, topology, slices, names, step_time_s)
    for row in rows:
        row["config"] = options["config"]
    print(report.table(rows))
    if options.get("out"):
        Path(options["out"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    too_big = [r for r in rows if not r["fits"]]
    for row in too_big:
        print(f"error: {report.not_fit_message(row, config, row['device_kind'])}", file=sys.stderr)
    if too_big:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
