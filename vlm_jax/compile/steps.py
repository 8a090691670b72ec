"""The functions the trainer runs for a config, with abstract inputs only.

Everything here is `jax.eval_shape` and `jax.ShapeDtypeStruct`s with shardings, so it works
under a mesh of compile-only TPU devices, where no array can exist. The model, optimizer and
step come from the trainer's own functions (`make_train_step`, `build_optimizer`, the task),
so what is compiled is what the trainer runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from vlm_jax import sharding
from vlm_jax.train.tasks import Task
from vlm_jax.train.trainer import make_train_step, param_layout, state_layout


@dataclasses.dataclass
class Function:
    """One jitted function and the abstract arguments it is compiled for."""

    name: str
    jitted: Callable
    args: tuple
    params: Any  # the abstract params among `args` (their per-chip bytes are reported)


def abstract_batch(task: Task, batch_size: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The task's batch contract at `batch_size`, batch-sharded: {key: [batch_size, ...]}."""
    return {
        k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding.batch_sharding(mesh, s.ndim))
        for k, s in task.batch_spec(batch_size).items()
    }


def train_step(task: Task, config, mesh: Mesh) -> Function:
    """The trainer's jitted step at the config's global batch."""
    state, state_shardings, tx, schedule = state_layout(task, config, mesh)  # the trainer's
    batch = abstract_batch(task, config.train.batch_size, mesh)
    batch_shardings = {k: v.sharding for k, v in batch.items()}
    step = make_train_step(task, tx, schedule, state_shardings, batch_shardings, mesh)
    return Function("train_step", step, (state, batch), state.params)


def eval_steps(task: Task, config, mesh: Mesh) -> list[Function]:
    """The contrastive task's embedding functions at its evaluation chunk size (the zero-shot
    and retrieval evaluators run only these on the devices); none for other tasks."""
    embed_image = getattr(task, "embed_image", None)
    if embed_image is None:
        return []
    _, params, _ = param_layout(task, config, mesh)
    chunk = sharding.eval_chunk_size(mesh, config.eval.batch_size)
    batch = abstract_batch(task, chunk, mesh)
    variables = {"params": params}
    return [
        Function("embed_image", embed_image, (variables, batch["image"]), params),
        Function("embed_text", task.embed_text, (variables, batch["tokens"]), params),
    ]


def functions(task: Task, config, mesh: Mesh, names: list[str] | tuple = ()) -> list[Function]:
    """The config's functions, all of them or those in `names` (an unknown name fails,
    naming the valid ones)."""
    found = [train_step(task, config, mesh), *eval_steps(task, config, mesh)]
    valid = [f.name for f in found]
    unknown = sorted(set(names) - set(valid))
    if unknown:
        raise ValueError(f"--functions {unknown} are not among this config's: {', '.join(valid)}")
    return [f for f in found if not names or f.name in names]
