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

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vlm_jax import sharding
from vlm_jax.train.optim import build_optimizer
from vlm_jax.train.state import TrainState
from vlm_jax.train.tasks import Task
from vlm_jax.train.trainer import abstract_like, make_train_step


@dataclasses.dataclass
class Function:
    """One jitted function and the abstract arguments it is compiled for."""

    name: str
    jitted: Callable
    args: tuple
    params: Any  # the abstract params among `args` (their per-chip bytes are reported)


def abstract_batch(task: Task, batch_size: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The model inputs of a global batch, batch-sharded: {key: [batch_size, ...]}."""
    one = task.dummy_batch(1)  # one row: the global batch may not fit in host memory
    return {
        k: jax.ShapeDtypeStruct(
            (batch_size, *v.shape[1:]), v.dtype, sharding=sharding.batch_sharding(mesh, v.ndim)
        )
        for k, v in one.items()
    }


def param_layout(task: Task, config, mesh: Mesh) -> tuple[Any, Any]:
    """(abstract params, their shardings): `trainer.param_layout` without concrete inputs.

    The trainer's version makes a concrete key and closes over a dummy batch made with
    `jnp.asarray`; under a mesh of compile-only devices neither can exist (jax places them on
    the mesh). Here both are abstract.
    """
    batch = abstract_batch(task, sharding.data_parallel_size(mesh), mesh)
    init_fn = lambda rng, b: task.init(rng, b)["params"]
    rng = jax.eval_shape(
        lambda: jax.random.key(config.seed)
    )  # a concrete key would live on the mesh
    boxed = jax.eval_shape(init_fn, rng, batch)
    shardings = sharding.logical_shardings(boxed, mesh, config.sharding.rules)
    unboxed = jax.eval_shape(lambda r, b: nn.unbox(init_fn(r, b)), rng, batch)
    abstract = abstract_like(unboxed, shardings)
    sharding.check_divisible(abstract)
    return abstract, shardings


def state_layout(task: Task, config, mesh: Mesh):
    """(abstract TrainState, its shardings, optimizer, schedule), as `trainer.build_state`
    lays them out. A copy of its layout part until the trainer's own layout is abstract
    (then `trainer.state_layout` replaces this and `param_layout`)."""
    params, param_shardings = param_layout(task, config, mesh)
    tx, schedule = build_optimizer(config.optim, config.train.total_steps, params)
    replicated = sharding.replicated(mesh)
    opt_abstract = jax.eval_shape(tx.init, params)
    frozen = lambda x: isinstance(x, optax.MaskedNode)  # optim.freeze: no state
    with jax.set_mesh(None):  # tree_map_params runs tx.init on placeholders: concrete arrays
        opt_shardings = optax.tree_map_params(
            tx,
            lambda p, s: p if frozen(p) else s,
            opt_abstract,
            param_shardings,
            transform_non_params=lambda _: replicated,
            is_leaf=frozen,
        )
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))  # uint32[2]
    shardings = TrainState(
        step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated
    )
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params=params,
        opt_state=abstract_like(opt_abstract, opt_shardings),
        rng=jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated),
    )
    return abstract, shardings, tx, schedule


def train_step(task: Task, config, mesh: Mesh) -> Function:
    """The trainer's jitted step at the config's global batch."""
    state, state_shardings, tx, schedule = state_layout(task, config, mesh)
    batch = abstract_batch(task, config.train.batch_size, mesh)
    batch_shardings = {k: v.sharding for k, v in batch.items()}
    step = make_train_step(task, tx, schedule, state_shardings, batch_shardings, mesh)
    return Function("train_step", step, (state, batch), state.params)


def eval_steps(task: Task, config, mesh: Mesh) -> list[Function]:
    """The contrastive task's embedding functions at its evaluation chunk size (the zero-shot
    and retrieval evaluators run only these on the devices); none for other tasks."""
    embed_image = getattr(task, "_embed_image", None)
    if embed_image is None:
        return []
    params, _ = param_layout(task, config, mesh)
    chunk = sharding.eval_chunk_size(mesh, config.eval.batch_size)
    batch = abstract_batch(task, chunk, mesh)
    variables = {"params": params}
    return [
        Function("embed_image", embed_image, (variables, batch["image"]), params),
        Function("embed_text", task._embed_text, (variables, batch["tokens"]), params),
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
