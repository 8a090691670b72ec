"""The functions the trainer and its evaluators run for a config, with abstract inputs only.

Everything here is `jax.eval_shape` and `jax.ShapeDtypeStruct`s with shardings, so it works
under a mesh of compile-only TPU devices, where no array can exist. The model, optimizer and
step come from the trainer's own functions (`make_train_step`, `build_optimizer`, the task),
and generation from the model's own `prefill` / `decode_step` (what `vlm_jax.generate` loops
over), so what is compiled is what runs.

    train_step    every task: the jitted step at train.batch_size
    embed_image,  contrastive: the zero-shot / retrieval evaluators' embedding functions at
    embed_text    the evaluation chunk (eval.batch_size rounded to the data-parallel size)
    prefill,      vlm, lm: KV-cached generation at the evaluation chunk: the image + prompt
    decode_step   (tokenizer.max_len) into a cache with room for the answer, then one token

Each carries its analytic model FLOPs (`vlm_jax.models.flops`): the task's own count for the
train step where it has one (contrastive), else 3 x the forward count of the decoder LM and the
VLM's vision tower (connector and cross-attention blocks not counted; frozen parts counted at
3 x, an upper bound); the forward count for the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vlm_jax import sharding
from vlm_jax.models import flops
from vlm_jax.models.decoder import DecoderLM
from vlm_jax.models.vlm import VisionLanguageModel
from vlm_jax.train.tasks import Task
from vlm_jax.train.trainer import make_train_step, param_layout, state_layout


@dataclasses.dataclass
class Function:
    """One jitted function, the abstract arguments it is compiled for, the rows (examples) of
    one call, and its analytic model FLOPs per call (None where the model has no count)."""

    name: str
    jitted: Callable
    args: tuple
    params: Any  # the abstract params among `args` (their per-chip bytes are reported)
    batch_size: int
    flops: float | None = None


def batch_sharded(tree: Any, mesh: Mesh) -> Any:
    """ShapeDtypeStructs (or None) with their leading (batch) dim split over the data axes."""
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=sharding.batch_sharding(mesh, len(s.shape))
        ),
        tree,
    )


def abstract_batch(task: Task, batch_size: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The task's batch contract at `batch_size`, batch-sharded: {key: [batch_size, ...]}."""
    return batch_sharded(task.batch_spec(batch_size), mesh)


def _times(per_example: float | None, examples: int) -> float | None:
    return None if per_example is None else per_example * examples


def lm_positions(task: Task, config, params) -> int:
    """Positions the decoder LM runs over per example: the text (tokenizer.max_len), with
    each `<image>` replaced by its M visual tokens under early fusion."""
    length = config.tokenizer.max_len
    model = task.model
    if not isinstance(model, VisionLanguageModel) or model.fusion != "early":
        return length
    spec = task.batch_spec(1)
    visual = jax.eval_shape(  # float[1, K, M, D]
        lambda p: model.apply(
            {"params": p},
            *(jnp.zeros(spec[k].shape, spec[k].dtype) for k in ("image", "tokens", "prefix_len")),
            method="encode_images",
        ),
        params,
    )
    return length + visual.shape[1] * (visual.shape[2] - 1)


def decoder_forward_flops(
    task: Task, config, tokens: int, context: int | None = None, images: bool = True
) -> float:
    """Forward FLOPs of one example through a decoder-based model (vlm, lm): with `images`,
    the VLM's vision tower over its images (when its fusion reads them); the LM over `tokens`
    new tokens attending to `context` keys."""
    from vlm_jax.models.decoder import LM
    from vlm_jax.schema import resolve

    count = flops.decoder_flops(resolve("model.lm", config.model.lm, LM), tokens, context)
    model = task.model
    if images and isinstance(model, VisionLanguageModel) and model.vision is not None:
        images = task.batch_spec(1)["image"].shape[1]
        count += images * flops.vision_flops(config.model)
    return count


def train_flops_per_example(task: Task, config, params) -> float | None:
    """The task's count, else 3 x the decoder-based forward count, else None."""
    count = task.train_flops_per_example()
    if count is None and isinstance(task.model, VisionLanguageModel | DecoderLM):
        count = 3 * decoder_forward_flops(task, config, lm_positions(task, config, params))
    return count


def train_step(task: Task, config, mesh: Mesh) -> Function:
    """The trainer's jitted step at the config's global batch."""
    state, state_shardings, tx, schedule = state_layout(task, config, mesh)  # the trainer's
    batch = abstract_batch(task, config.train.batch_size, mesh)
    batch_shardings = {k: v.sharding for k, v in batch.items()}
    step = make_train_step(task, tx, schedule, state_shardings, batch_shardings, mesh)
    per_example = train_flops_per_example(task, config, state.params)
    count = _times(per_example, config.train.batch_size)
    return Function(
        "train_step", step, (state, batch), state.params, config.train.batch_size, count
    )


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
    text_len = config.tokenizer.max_len
    return [
        Function(
            "embed_image",
            embed_image,
            (variables, batch["image"]),
            params,
            chunk,
            flops.image_flops(config.model) * chunk,
        ),
        Function(
            "embed_text",
            task.embed_text,
            (variables, batch["tokens"]),
            params,
            chunk,
            flops.text_flops(config.model, text_len) * chunk,
        ),
    ]


def generation_settings(task: Task, config, mesh: Mesh) -> tuple[int, int]:
    """(rows, new tokens) of the evaluators' generation: the "vqa" evaluator's batch and
    eval.max_new_tokens for a VLM; eval.batch_size and the generate CLI's default for an LM
    (whose evaluator only scores). Rows are rounded to the data-parallel size."""
    from vlm_jax.evaluate import EVAL
    from vlm_jax.evaluate.vqa import ANSWERS
    from vlm_jax.generate import FLAGS
    from vlm_jax.schema import resolve_keys

    if isinstance(task.model, VisionLanguageModel):
        settings = resolve_keys("eval", config.eval, EVAL | ANSWERS)
        rows = min(settings.batch_size, settings.num_examples)
        return sharding.eval_chunk_size(mesh, rows), settings.max_new_tokens
    settings = resolve_keys("eval", config.eval, EVAL)
    return sharding.eval_chunk_size(mesh, settings.batch_size), FLAGS["max_new_tokens"][1]


def _generation(model: VisionLanguageModel | DecoderLM, new_tokens: int):
    """(prefill, decode_step) exactly as `vlm_jax.generate.generate` calls them (a VLM's, or a
    text-only LM's causal prefill over the prompt)."""

    def prefill(variables, images, prompt, prompt_lengths):
        return model.apply(variables, images, prompt, prompt_lengths, new_tokens, method="prefill")

    def decode_step(variables, token, cache, media):
        return model.apply(variables, token, cache, media, method="decode_step")

    return prefill, decode_step


def generation_steps(task: Task, config, mesh: Mesh) -> list[Function]:
    """prefill and one decode_step for tasks whose model generates (vlm, lm); none else."""
    model = getattr(task, "model", None)
    if not isinstance(model, VisionLanguageModel | DecoderLM):
        return []
    rows, new_tokens = generation_settings(task, config, mesh)
    _, params, _ = param_layout(task, config, mesh)
    variables = {"params": params}
    batch = abstract_batch(task, rows, mesh)
    prefill, decode_step = _generation(model, new_tokens)
    if isinstance(model, VisionLanguageModel):
        inputs = (batch["image"], batch["tokens"], batch["prefix_len"])
    else:  # the generate CLI's inputs of a text-only run: no image, whole prompts
        no_image = jax.ShapeDtypeStruct((rows, 0), jnp.float32)
        lengths = jax.ShapeDtypeStruct((rows,), jnp.int32)
        no_image, lengths = batch_sharded((no_image, lengths), mesh)
        inputs = (no_image, batch["tokens"], lengths)
    # shapes of what prefill hands to the loop (a fresh callable: jit's trace cache stays cold)
    _, cache, media = jax.eval_shape(lambda *a: prefill(*a), variables, *inputs)
    token = jax.ShapeDtypeStruct((rows, 1), jnp.int32)
    step_args = (variables, *batch_sharded((token, cache, media), mesh))
    cache_len = cache.max_len  # the prompt's LM positions + new_tokens
    prefill_flops = decoder_forward_flops(task, config, cache_len - new_tokens, cache_len)
    decode_flops = decoder_forward_flops(task, config, 1, cache_len, images=False)
    return [
        Function(
            "prefill", jax.jit(prefill), (variables, *inputs), params, rows, prefill_flops * rows
        ),
        Function("decode_step", jax.jit(decode_step), step_args, params, rows, decode_flops * rows),
    ]


def functions(task: Task, config, mesh: Mesh, names: list[str] | tuple = ()) -> list[Function]:
    """The config's functions, all of them or those in `names` (an unknown name fails,
    naming the valid ones)."""
    found = [
        train_step(task, config, mesh),
        *eval_steps(task, config, mesh),
        *generation_steps(task, config, mesh),
    ]
    valid = [f.name for f in found]
    unknown = sorted(set(names) - set(valid))
    if unknown:
        raise ValueError(f"--functions {unknown} are not among this config's: {', '.join(valid)}")
    return [f for f in found if not names or f.name in names]
