"""Losses: contrastive image-text losses by name (LOSSES, `build_loss`), the generic tiled ring
they are chunked with, and the next-token loss of the language-model tasks.

contrastive.py: sigmoid (SigLIP) and softmax (CLIP), plain and chunked.
ring.py:        all-pairs row/column statistics by a tiled ring under shard_map (custom VJP).
next_token.py:  next-token cross-entropy and token accuracy.

LOSSES maps `config.loss.name` to a `ContrastiveLoss`; the registrations below are the one
place to add a line for a new one (or call `LOSSES.register(name)` from anywhere else).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from vlm_jax.losses.contrastive import (
    SIGMOID,
    SIGMOID_RULE,
    SOFTMAX,
    SOFTMAX_RULE,
    ContrastiveLoss,
    LossFn,
    chunked_loss,
    sigmoid_loss,
    softmax_loss,
)
from vlm_jax.losses.next_token import next_token_loss, next_token_sums
from vlm_jax.losses.ring import TileRule, pairwise_stats
from vlm_jax.registry import Registry
from vlm_jax.schema import Select, resolve

LOSSES = Registry("loss")
LOSS = Select(LOSSES)  # config.loss: `name` and the named loss's keys (ContrastiveLoss.SCHEMA)
LOSSES.register("sigmoid")(SIGMOID)
LOSSES.register("softmax")(SOFTMAX)


def _batch_axes(loss_config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[str, ...]:
    axes = tuple(loss_config.batch_axes)
    unknown = [a for a in axes if a not in mesh.shape]
    if unknown:
        raise ValueError(
            f"loss.batch_axes={axes}: {unknown} not among the mesh axes {tuple(mesh.shape)}"
        )
    return axes


def build_loss(loss_config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> LossFn:
    """loss_fn(image_emb[B,E], text_emb[B,E], logit_scale[], logit_bias[]) -> float32[].

    chunked=False: the plain form (GSPMD shards it under jit; b_local x B logits per device).
    chunked=True: the tiled ring of `chunked_loss`, wrapping its own shard_map over the mesh's
    `batch_axes` so it can be called inside a jitted step on globally sharded embeddings.
    """
    loss = LOSSES.get(loss_config.name)
    loss_config = resolve("loss", loss_config, LOSS)

    def cast(fn: LossFn) -> LossFn:
        def loss_fn(image_emb, text_emb, logit_scale, logit_bias):
            args = (image_emb, text_emb, logit_scale, logit_bias)
            return fn(*(jnp.asarray(x, jnp.float32) for x in args))

        return loss_fn

    if not loss_config.chunked:
        return cast(loss.plain)
    batch_axes = _batch_axes(loss_config, mesh) if mesh is not None else ()
    return cast(chunked_loss(loss, loss_config.tile_size, mesh, batch_axes))


__all__ = [
    "LOSS",
    "LOSSES",
    "SIGMOID_RULE",
    "SOFTMAX_RULE",
    "ContrastiveLoss",
    "LossFn",
    "TileRule",
    "build_loss",
    "chunked_loss",
    "next_token_loss",
    "next_token_sums",
    "pairwise_stats",
    "sigmoid_loss",
    "softmax_loss",
]
