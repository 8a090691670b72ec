"""Non-finite loss/gradient guard: detected inside the jitted step, handled on the host.

Why inside the step: with bf16 compute (or any overflow) one bad batch turns every parameter
into NaN through the optimizer update, and a NaN found a step later is already in the weights.
The guard checks the float32 loss and every gradient leaf in the same compiled step and, when
any is non-finite, keeps the previous params and optimizer state (the step counter still
advances, so the data stream and RNG stay aligned with an uninterrupted run).

The host then applies `config.train.on_nonfinite`:
  "skip": count the step (`train/nonfinite_skipped` in metrics, kept across resumes) and go on;
  "stop": save the (last good) state and raise `NonFiniteError` naming the step and the
          parameter tree paths whose gradients were non-finite.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.trees import leaf_paths

CHOICES = ("skip", "stop")
FLAG = "train/nonfinite"  # float32[]: 1.0 when this step's update was dropped
LEAVES = "numerics/nonfinite_grads"  # bool[n_leaves]: which gradient leaves were non-finite


class NonFiniteError(FloatingPointError):
    """Training stopped on a non-finite loss or gradient (train.on_nonfinite='stop')."""


def nonfinite_leaves(tree: Any) -> jax.Array:
    """bool[n_leaves]: True where a leaf of `tree` holds a NaN or Inf (flatten order)."""
    leaves = jax.tree.leaves(tree)
    return jnp.stack([~jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def guard(old_state: Any, new_state: Any, loss: jax.Array, grads: Any) -> tuple[Any, dict]:
    """Keep `old_state`'s params/opt_state when loss or grads are non-finite.

    Returns (state, outputs) with outputs {FLAG: float32[], LEAVES: bool[n_leaves]}; the step
    counter and everything else come from `new_state`.
    """
    bad_leaves = nonfinite_leaves(grads)  # bool[n_leaves]
    bad = jnp.logical_or(~jnp.isfinite(loss), jnp.any(bad_leaves))  # bool[]

    def pick(old, new):
        return jnp.where(bad, old, new)

    state = new_state.replace(
        params=jax.tree.map(pick, old_state.params, new_state.params),
        opt_state=jax.tree.map(pick, old_state.opt_state, new_state.opt_state),
    )
    return state, {FLAG: bad.astype(jnp.float32), LEAVES: bad_leaves}


class NonFiniteMonitor:
    """Host side of the guard: counts dropped steps, stops per policy.

    `check` reads the previous step's flag (one step late), so the host never waits on the
    step it just dispatched; the jitted guard already kept the bad update out of the state.
    """

    def __init__(self, policy: str, params: Any, skipped: int = 0):
        if policy not in CHOICES:
            raise ValueError(f"train.on_nonfinite={policy!r}; valid choices: {CHOICES}")
        self.policy = policy
        self.paths = leaf_paths(params)
        self.skipped = skipped
        self._pending: tuple[int, Any, Any] | None = None

    def push(self, step: int, outputs: dict) -> dict:
        """Take this step's guard outputs out of the metrics; check the previous step's."""
        flag, leaves = outputs.pop(FLAG), outputs.pop(LEAVES)
        event = self.flush()
        self._pending = (step, flag, leaves)
        return event

    def flush(self) -> dict:
        """Check the pending step -> {} or {'step', 'paths'} of a dropped update."""
        if self._pending is None:
            return {}
        step, flag, leaves = self._pending
        self._pending = None
        if not float(flag):
            return {}
        self.skipped += 1
        paths = [p for p, b in zip(self.paths, np.asarray(leaves), strict=True) if b]
        logging.warning(
            "step %d: non-finite loss or gradients (%d params: %s); update skipped (%d so far)",
            step,
            len(paths),
            ", ".join(paths[:8]) or "loss only",
            self.skipped,
        )
        return {"step": step, "paths": paths}

    def error(self, event: dict, saved_step: int) -> NonFiniteError:
        paths = event["paths"]
        return NonFiniteError(
            f"non-finite loss or gradients at step {event['step']} "
            f"(train.on_nonfinite='stop'); parameters with non-finite gradients: "
            f"{paths if paths else 'none (loss only)'}. The update was not applied; the last "
            f"good params are saved at checkpoint step {saved_step}. Set "
            f"train.on_nonfinite='skip' to skip such steps instead."
        )
