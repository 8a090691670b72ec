"""Import every task module so that TASKS knows them all."""

import vlm_jax.train.contrastive  # noqa: F401
import vlm_jax.train.vlm_task
