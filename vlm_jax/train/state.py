"""The train state: step, params, optimizer state and the base RNG key (raw uint32[2])."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32[]
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]: raw key data, so checkpoints hold plain arrays

    def step_rng(self) -> jax.Array:
        """A key unique to this step: fold the step into the base key (resume-exact)."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
