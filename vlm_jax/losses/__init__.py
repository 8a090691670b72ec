"""Losses: contrastive image-text losses by name (LOSSES, `build_loss`), the generic tiled ring
they are chunked with, and the next-token loss of the language-model tasks.

contrastive.py: sigmoid (SigLIP) and softmax (CLIP), plain and chunked, and their
                duplicate-aware / hard-negative forms.
pairs.py:       which pairs are positives (loss.positives) and hard negatives; caption ids.
ring.py:        all-pairs row/column statistics by a tiled ring under shard_map (custom VJP),
                and a running top-k over the same ring (hard-negative mining).
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
    WHOLE_BATCH,
    ContrastiveLoss,
    LossFn,
    chunked_loss,
    hard_negative_miner,
    pair_loss,
    sigmoid_loss,
    softmax_loss,
)
from vlm_jax.losses.next_token import next_token_loss, next_token_sums
from vlm_jax.losses.pairs import POSITIVES, HardNegatives, batch_ids, caption_ids
from vlm_jax.losses.ring import Positives, TileRule, pairwise_stats
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


def hard_negatives(loss_config: ml_collections.ConfigDict) -> HardNegatives:
    """config.loss.hard_negatives (resolved) as a HardNegatives."""
    return HardNegatives(**resolve("loss", loss_config, LOSS).hard_negatives.to_dict())


def build_loss(loss_config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> LossFn:
    """loss_fn(image_emb[B,E], text_emb[B,E], logit_scale[], logit_bias[], **pair_ids) -> [].

    chunked=False: the plain form (GSPMD shards it under jit; b_local x B logits per device).
    chunked=True: the tiled ring of `chunked_loss`, wrapping its own shard_map over the mesh's
    `batch_axes` so it can be called inside a jitted step on globally sharded embeddings.
    pair_ids (`batch_ids(positives, hard_negatives, batch)`): positive_ids, caption_ids, read by
    the duplicate-aware / hard-negative form (`pair_loss`) that loss.positives != "diagonal" or
    loss.hard_negatives.k > 0 select; the diagonal form without hard negatives ignores them.
    """
    loss = LOSSES.get(loss_config.name)
    loss_config = resolve("loss", loss_config, LOSS)
    hard = hard_negatives(loss_config)
    diagonal = loss_config.positives == "diagonal" and hard.k == 0
    if not diagonal and loss.from_positives is None:
        raise ValueError(
            f"loss.positives={loss_config.positives!r}, loss.hard_negatives.k={hard.k}: "
            f"loss.name={loss_config.name!r} has no duplicate-aware form "
            "(ContrastiveLoss.from_positives); use positives='diagonal' and k=0"
        )

    def cast(fn: LossFn) -> LossFn:
        def loss_fn(image_emb, text_emb, logit_scale, logit_bias, **pair_ids):
            args = (image_emb, text_emb, logit_scale, logit_bias)
            ids = {} if diagonal else pair_ids
            return fn(*(jnp.asarray(x, jnp.float32) for x in args), **ids)

        return loss_fn

    batch_axes = ()
    if loss_config.chunked and mesh is not None:
        batch_axes = _batch_axes(loss_config, mesh)
    if diagonal and not loss_config.chunked:
        return cast(loss.plain)
    if diagonal:
        return cast(chunked_loss(loss, loss_config.tile_size, mesh, batch_axes))
    if not loss_config.chunked:
        return cast(pair_loss(loss, hard))
    return cast(pair_loss(loss, hard, loss_config.tile_size, mesh, batch_axes))


__all__ = [
    "LOSS",
    "LOSSES",
    "POSITIVES",
    "SIGMOID_RULE",
    "SOFTMAX_RULE",
    "WHOLE_BATCH",
    "ContrastiveLoss",
    "HardNegatives",
    "LossFn",
    "Positives",
    "TileRule",
    "batch_ids",
    "build_loss",
    "caption_ids",
    "chunked_loss",
    "hard_negative_miner",
    "hard_negatives",
    "next_token_loss",
    "next_token_sums",
    "pair_loss",
    "pairwise_stats",
    "sigmoid_loss",
    "softmax_loss",
]
