"""Import every task module so that TASKS knows them all."""

from vlm_jax.train import contrastive, vlm_task

TASK_MODULES = (contrastive, vlm_task)
