"""Run outputs: metrics.jsonl, TensorBoard events, a progress display, and perf numbers.

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
import sys
import time
from pathlib import Path

# Dense bf16 peak FLOP/s per device, by jax device_kind prefix.
PEAK_FLOPS = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
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


class MetricWriter:
    """metrics.jsonl + TensorBoard on process 0; no-op elsewhere."""

    def __init__(self, workdir: Path, *, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            truncate_jsonl(self.path, resume_step)
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            logging.warning("tensorboardX not installed: no TensorBoard events")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)} | {k: _jsonable(v) for k, v in sorted(metrics.items())}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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
