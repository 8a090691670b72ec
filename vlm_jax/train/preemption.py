"""Stopping cleanly on preemption: finish the current step, checkpoint, exit 0.

One process: SIGTERM (a scheduler's preemption notice) or SIGINT (Ctrl-C) sets a flag that the
loop reads after every step. Several processes must all save at the same step, so:
- SIGTERM is left to JAX's preemption service (on by default once `jax.distributed` is
  initialised: TPU pods, SLURM, localhost). It catches the notice in C++ on whichever host gets
  it, and `multihost_utils.reached_preemption_sync_point(step)` then turns True on every process
  at the same step. (A Python SIGTERM handler would replace the service's, so none is set.)
- SIGINT on any process is shared by an all-gather of the flag.
"""

from __future__ import annotations

import logging
import signal

import jax
from jax.experimental import multihost_utils

from vlm_jax.sharding import any_process


def jax_preemption_service() -> bool:
    """True when JAX's preemption service watches SIGTERM (a multi-process run with it on)."""
    return jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)


class StopRequest:
    """Context manager: `should_stop(step)` after each step says whether to save and stop."""

    def __init__(self):
        self.requested = False
        self.jax_preemption = jax_preemption_service()
        self._previous = {}

    def __enter__(self):
        signals = [signal.SIGINT] if self.jax_preemption else [signal.SIGTERM, signal.SIGINT]
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logging.warning("signal %d: stopping after this step and saving a checkpoint", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, step: int) -> bool:
        """Every process gets the same answer for the same step (called once per step)."""
        if jax.process_count() == 1:
            return self.requested
        preempted = self.jax_preemption and multihost_utils.reached_preemption_sync_point(step)
        if preempted:
            logging.warning("step %d: preemption sync point reached on all processes", step)
        return any_process(self.requested) or preempted
