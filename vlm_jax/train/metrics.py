"""Run outputs: metric writers by name, a progress display, and perf numbers.

`train.metric_writers` names the writers (METRIC_WRITERS): "jsonl" (WORKDIR/metrics.jsonl),
"tensorboard" (WORKDIR/tensorboard/) and "wandb" (Weights & Biases, the `[wandb]` extra).
Only process 0 writes. metrics.jsonl holds one JSON object per logged step with keys `step`,
`train/...`, `eval/...`, `perf/...`. On resume, rows past the restored step are dropped first
so a resumed run's file equals an uninterrupted run's (no duplicated or missing rows).

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s of the devices used:
    mfu = train_flops_per_example * examples_per_second / (num_devices * peak_flops_per_device)
with train_flops_per_example = 3 x the analytic forward matmul FLOPs (forward + 2x backward;
rematerialisation is not counted, as is usual for MFU).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import sys
import time
from pathlib import Path

from vlm_jax.config import require_package, to_json
from vlm_jax.registry import Registry
from vlm_jax.schema import Key, Schema, resolve, resolve_keys

# Dense bf16 peak FLOP/s per device, by jax device_kind prefix (the first matching prefix
# wins: "TPU v5 lite" before "TPU v5", which is what jax calls a v5p chip).
PEAK_FLOPS = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # jax's device_kind of a v5p chip (after "TPU v5 lite": prefixes)
    "TPU v6 lite": 918e12,
}


def peak_flops_per_device(device_kind: str, override: float | None = None) -> float | None:
    if override:
        return float(override)
    for prefix, flops in PEAK_FLOPS.items():
        if device_kind.startswith(prefix):
            return flops
    return None


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only rows with step <= last_step (atomically replaces the file)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if json.loads(r)["step"] <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(r + "\n" for r in kept))
    tmp.replace(path)


# Metric writers by name (train.metric_writers). Each is built as
# `Writer(workdir, config, resume_step)` (resume_step: the last step whose row a resumed run
# keeps, None for a fresh run) and has `write(row)` and `close()`; a row is `metrics_row`'s.
# A writer that needs an optional package names it as `package = (module, install command)`:
# `require_packages` checks it up front, before anything compiles.
METRIC_WRITERS = Registry("train.metric_writers")
# The train section's key that picks them (the rest of train is the trainer's).
OUTPUTS = Schema(
    {
        "metric_writers": Key(
            tuple, ("jsonl", "tensorboard"), "where metrics go: METRIC_WRITERS names, in order"
        )
    }
)
WANDB_INSTALL = "pip install 'vlm_jax[wandb]'"
WANDB_MODES = ("", "online", "offline", "disabled")  # "": WANDB_MODE, else online
# config.wandb: the "wandb" writer's settings.
WANDB = Schema(
    {
        "project": Key(str, "vlm_jax", "the W&B project"),
        "entity": Key(str, "", 'the W&B entity ("": W&B\'s default)'),
        "name": Key(str, "", "the run's name (\"\": the workdir's name)"),
        "mode": Key(str, "", '"": WANDB_MODE, else online', choices=WANDB_MODES),
    }
)


def writer_names(config) -> tuple[str, ...]:
    """train.metric_writers (type-checked: a plain string is not a tuple of names)."""
    return tuple(resolve_keys("train", config.train, OUTPUTS).metric_writers)


def require_packages(names) -> None:
    """MissingPackage naming the writer and its install command if a package it needs is
    absent (at validation, not when the writer is built after the state's init)."""
    for name in names:
        package = getattr(METRIC_WRITERS.get(name), "package", None)
        if package is not None:
            require_package(package[0], f"train.metric_writers {name!r}", package[1])


def metrics_row(step: int, metrics: dict) -> dict:
    """{"step": step, key: value, ...} in key order; values as JSON numbers (non-finite: text)."""
    return {"step": int(step)} | {k: _jsonable(v) for k, v in sorted(metrics.items())}


def scalars(row: dict) -> dict[str, int | float]:
    """The row's numeric values, without `step` (non-finite values, text by now, are left out)."""
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}


class MetricWriter:
    """The writers `config.train.metric_writers` names, on process 0; no-op elsewhere."""

    def __init__(self, workdir: Path, config, *, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        names = writer_names(config) if enabled else ()
        self.writers = [METRIC_WRITERS.get(name)(workdir, config, resume_step) for name in names]

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.writers:
            return
        row = metrics_row(step, metrics)
        for writer in self.writers:
            writer.write(row)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


@METRIC_WRITERS.register("jsonl")
class JsonlWriter:
    """WORKDIR/metrics.jsonl, one JSON object a row. A fresh run starts the file anew; a
    resumed one first drops the rows past its resume step, which it then writes again."""

    def __init__(self, workdir: Path, config, resume_step: int | None):
        self.path = workdir / "metrics.jsonl"
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            truncate_jsonl(self.path, resume_step)

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        pass


@METRIC_WRITERS.register("tensorboard")
class TensorBoardWriter:
    """TensorBoard scalars in WORKDIR/tensorboard/ (a warning, and none, without tensorboardX)."""

    def __init__(self, workdir: Path, config, resume_step: int | None):
        self._tb = None
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            logging.warning("tensorboardX not installed: no TensorBoard events")

    def write(self, row: dict) -> None:
        if self._tb is None:
            return
        for key, value in scalars(row).items():
            self._tb.add_scalar(key, value, row["step"])
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


@METRIC_WRITERS.register("wandb")
class WandbWriter:
    """A Weights & Biases run (settings: config.wandb), its files under WORKDIR/wandb/.

    A resumed run logs on to the same W&B run (its id is kept in WORKDIR/wandb/run_id). W&B
    history only grows: the steps past the resume step that an earlier attempt logged keep
    those values (the same numbers, since a resume is exact; perf/ aside). An offline run
    uploads later with `wandb sync WORKDIR/wandb/offline-run-*`.
    """

    package = ("wandb", WANDB_INSTALL)

    def __init__(self, workdir: Path, config, resume_step: int | None):
        wandb = require_package(self.package[0], "train.metric_writers 'wandb'", self.package[1])
        settings = resolve("wandb", config.get("wandb"), WANDB)
        self._run = wandb.init(
            project=settings.project,
            entity=settings.entity or None,
            name=settings.name or workdir.resolve().name,
            mode=settings.mode or None,
            id=wandb_run_id(workdir, resume_step),
            resume="allow",
            dir=str(workdir),
            config=json.loads(to_json(config)),
        )

    def write(self, row: dict) -> None:
        self._run.log(scalars(row), step=row["step"], commit=True)

    def close(self) -> None:
        self._run.finish()


def wandb_run_id(workdir: Path, resume_step: int | None) -> str:
    """The W&B run id kept in WORKDIR/wandb/run_id when resuming; else a new one, kept there."""
    path = workdir / "wandb" / "run_id"
    if resume_step is not None and path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], a valid W&B run id
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def _jsonable(value):
    value = float(value) if hasattr(value, "__float__") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Progress:
    """A tqdm bar on a terminal; plain log lines (step, step/s, examples/s, ETA) otherwise."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int, enabled: bool):
        self.total = total_steps
        self.batch_size = batch_size
        self.enabled = enabled
        self.start_step = start_step
        self.start_time = time.monotonic()
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start_time
        rate = (step - self.start_step) / max(elapsed, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        loss = metrics.get("train/loss")
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(
                loss=f"{loss:.4f}" if loss is not None else "-",
                ex_s=f"{rate * self.batch_size:.0f}",
            )
            self._bar.refresh()
        else:
            logging.info(
                "step %d/%d  loss %s  %.2f step/s  %.0f examples/s  ETA %s",
                step,
                self.total,
                f"{loss:.4f}" if loss is not None else "-",
                rate,
                rate * self.batch_size,
                _format_eta(eta),
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
