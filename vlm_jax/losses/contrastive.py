"""Contrastive image-text losses: softmax (CLIP) and sigmoid (SigLIP), plain and chunked.

Every form returns the same number, a mean per example over the global batch B:

    sigmoid: sum over all B x B pairs of -log sigmoid(z_ij * (t <x_i, y_j> + b)), z_ij = +1 on
             the diagonal and -1 elsewhere, divided by B (SigLIP's normalisation).
    softmax: (mean_i CE(image i -> texts) + mean_j CE(text j -> images)) / 2 over logits
             t <x_i, y_j> (CLIP). The bias is ignored: softmax is shift invariant, so its
             gradient is exactly zero.

The plain forms build the B x B logits. Under `jit` with batch-sharded embeddings, GSPMD
gathers the text side and each device holds b_local x B logits, which is what limits the
contrastive batch. The chunked forms (`chunked=True`) never hold more than tile x tile
logits per device: each loss is split into per-row and per-column statistics over all pairs
(sigmoid: sum_j softplus(l_ij); softmax: log-sum-exp of every row and every column) plus the
positive (diagonal) logits, which are local; ring.py computes the statistics (a ring under
`shard_map`, tiled by `lax.scan`, with a custom VJP that re-runs the ring for the gradient).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vlm_jax.losses.ring import Array, TileRule, pairwise_stats, similarities
from vlm_jax.schema import Key, Schema, positive

LossFn = Callable[[Array, Array, Array, Array], Array]


# -- plain (single-device / GSPMD) forms ------------------------------------------------------
def _positive_dots(image_emb: Array, text_emb: Array) -> Array:
    """float32[B]: <x_i, y_i>, the matching pairs, local to each example."""
    return jnp.sum(image_emb * text_emb, axis=-1)


def sigmoid_loss(image_emb: Array, text_emb: Array, logit_scale: Array, logit_bias: Array) -> Array:
    """SigLIP: binary log-loss over all pairs, summed and divided by B."""
    logits = logit_scale * similarities(image_emb, text_emb) + logit_bias  # [B, B]
    labels = 2.0 * jnp.eye(logits.shape[0]) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


def softmax_loss(image_emb: Array, text_emb: Array, logit_scale: Array, logit_bias: Array) -> Array:
    """CLIP symmetric InfoNCE: mean of the image->text and text->image cross-entropies."""
    del logit_bias  # shift invariant
    logits = logit_scale * similarities(image_emb, text_emb)  # [B, B]
    positive = jnp.diagonal(logits)
    image_to_text = jax.nn.logsumexp(logits, axis=1) - positive
    text_to_image = jax.nn.logsumexp(logits, axis=0) - positive
    return (jnp.mean(image_to_text) + jnp.mean(text_to_image)) / 2


# -- tile rules: how one tile of logits updates the row/column statistics ----------------------
def _sigmoid_update(logits: Array, row: Array, col: Array) -> tuple[Array, Array]:
    # Every pair counted as a negative: softplus(l) = -log sigmoid(-l); positives fixed later.
    return row + jnp.sum(jax.nn.softplus(logits), axis=1), col


def _sigmoid_dlogits(logits, row, row_ct, col, col_ct) -> Array:
    del row, col, col_ct
    return jax.nn.sigmoid(logits) * row_ct[:, None]


def _softmax_update(logits: Array, row: Array, col: Array) -> tuple[Array, Array]:
    # Online log-sum-exp in both directions.
    row = jnp.logaddexp(row, jax.nn.logsumexp(logits, axis=1))
    col = jnp.logaddexp(col, jax.nn.logsumexp(logits, axis=0))
    return row, col


def _softmax_dlogits(logits, row, row_ct, col, col_ct) -> Array:
    row_probs = jnp.exp(logits - row[:, None])  # softmax over texts
    col_probs = jnp.exp(logits - col[None, :])  # softmax over images
    return row_probs * row_ct[:, None] + col_probs * col_ct[None, :]


SIGMOID_RULE = TileRule(init=0.0, update=_sigmoid_update, dlogits=_sigmoid_dlogits)
SOFTMAX_RULE = TileRule(init=-jnp.inf, update=_softmax_update, dlogits=_softmax_dlogits)


# -- the losses, plain and chunked -----------------------------------------------------------------
def _sigmoid_from_stats(row: Array, col: Array, positive: Array) -> Array:
    """All pairs as negatives (row sums of softplus) corrected on the diagonal, / B.

    -log sigmoid(l) = softplus(l) - l, so each positive pair subtracts its logit.
    """
    del col
    return (jnp.sum(row) - jnp.sum(positive)) / row.shape[0]


def _softmax_from_stats(row: Array, col: Array, positive: Array) -> Array:
    """Mean of the two cross-entropies from the row and column log-sum-exps."""
    return (jnp.sum(row) + jnp.sum(col) - 2 * jnp.sum(positive)) / (2 * row.shape[0])


@dataclasses.dataclass(frozen=True)
class ContrastiveLoss:
    """One loss in both forms: `plain` on full logits, `rule` + `from_stats` for the chunked."""

    plain: LossFn
    rule: TileRule
    from_stats: Callable[[Array, Array, Array], Array]  # (row[B], col[B], positive[B]) -> []
    uses_bias: bool
    SCHEMA = Schema(
        {
            "chunked": Key(bool, False, "the tiled ring (chunked_loss) instead of full logits"),
            "tile_size": Key(
                int,
                1024,
                "chunked: examples per tile",
                valid=positive,
                expect="a positive number of examples",
            ),
            "batch_axes": Key(tuple, ("data", "fsdp"), "chunked: mesh axes the batch is split on"),
        }
    )


SIGMOID = ContrastiveLoss(sigmoid_loss, SIGMOID_RULE, _sigmoid_from_stats, uses_bias=True)
SOFTMAX = ContrastiveLoss(softmax_loss, SOFTMAX_RULE, _softmax_from_stats, uses_bias=False)


def chunked_loss(
    loss: ContrastiveLoss, tile_size: int, mesh: Mesh | None = None, batch_axes=()
) -> LossFn:
    """The memory-bounded form of `loss`: at most tile_size^2 logits per device at once."""
    stats_fn = pairwise_stats(loss.rule, tile_size, mesh, batch_axes)

    def loss_fn(image_emb, text_emb, logit_scale, logit_bias):
        bias = logit_bias if loss.uses_bias else jnp.zeros_like(logit_bias)
        row, col = stats_fn(image_emb, text_emb, logit_scale, bias)
        positive = logit_scale * _positive_dots(image_emb, text_emb) + bias  # [B]
        return loss.from_stats(row, col, positive)

    return loss_fn
