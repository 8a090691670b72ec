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

Duplicate-aware targets and hard negatives (`loss.positives`, `loss.hard_negatives`; which
pairs they pick: losses/pairs.py). With a positive mask P (P_ii = 1; P_ij = 1 for duplicates)
and pair weights a_ij = 1 + w H_ij (H_ij = 1 on image i's mined hard negatives, never on a
positive; a_ij = 1 without hard negatives), over logits l_ij:

    sigmoid: (1 / B) sum_ij a_ij * -log sigmoid(z_ij l_ij), z_ij = 2 P_ij - 1
           = (1 / B) [sum_ij a_ij softplus(l_ij) - sum_ij P_ij l_ij]          (a_ij = 1 on P)
    softmax: (1 / 2B) sum_i [-sum_j (P_ij / n_i) log(a_ij e^l_ij / sum_k a_ik e^l_ik)]
           + (1 / 2B) sum_j [-sum_i (P_ij / m_j) log(a_ij e^l_ij / sum_k a_kj e^l_kj)]
             n_i = sum_j P_ij, m_j = sum_i P_ij: each row's (column's) positives share its
             target mass equally; a hard negative counts a_ij times in the partition function.

Both need, beyond the rule's weighted row/column statistics, the positive logits summed per row
and per column and their counts (`ring.Positives`): the ring computes them from per-example
ids that travel with the text embeddings, so no B x B mask is ever built in the chunked form.
The hard negatives are found first by a forward-only ring pass (`ring.ring_top_k`). With
positives="diagonal" and no hard negatives the losses are exactly the forms above (same code).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vlm_jax.losses.pairs import (
    HARD_NEGATIVES,
    POSITIVES,
    HardNegatives,
    candidate_scores,
    pair_roles,
)
from vlm_jax.losses.ring import (
    Array,
    Positives,
    TileRule,
    pairwise_stats,
    ring_top_k,
    similarities,
)
from vlm_jax.schema import Key, Schema, positive

# (image_emb[B, E], text_emb[B, E], logit_scale[], logit_bias[]) -> float32[]; the duplicate-aware
# forms also take positive_ids= int32[B, K] and caption_ids= int32[B, 2] (pairs.batch_ids).
LossFn = Callable[..., Array]
WHOLE_BATCH = 2**31 - 1  # a tile size no batch reaches: one tile holds all B x B pairs


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
# `weight` float32[t, t] (hard negatives) counts a pair that many times; None: once each.
def _sigmoid_update(logits: Array, row: Array, col: Array, weight=None) -> tuple[Array, Array]:
    # Every pair counted as a negative: softplus(l) = -log sigmoid(-l); positives fixed later.
    terms = jax.nn.softplus(logits) if weight is None else weight * jax.nn.softplus(logits)
    return row + jnp.sum(terms, axis=1), col


def _sigmoid_dlogits(logits, row, row_ct, col, col_ct, weight=None) -> Array:
    del row, col, col_ct
    probs = jax.nn.sigmoid(logits) if weight is None else weight * jax.nn.sigmoid(logits)
    return probs * row_ct[:, None]


def _weighted_logits(logits: Array, weight: Array | None) -> Array:
    """Softmax: a pair counted `weight` times in the partition function adds log(weight)."""
    return logits if weight is None else logits + jnp.log(weight)


def _softmax_update(logits: Array, row: Array, col: Array, weight=None) -> tuple[Array, Array]:
    # Online log-sum-exp in both directions.
    logits = _weighted_logits(logits, weight)
    row = jnp.logaddexp(row, jax.nn.logsumexp(logits, axis=1))
    col = jnp.logaddexp(col, jax.nn.logsumexp(logits, axis=0))
    return row, col


def _softmax_dlogits(logits, row, row_ct, col, col_ct, weight=None) -> Array:
    logits = _weighted_logits(logits, weight)
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


def _sigmoid_from_positives(row: Array, col: Array, positives: Positives) -> Array:
    """Weighted softplus sums of every pair, each positive pair's logit subtracted, / B."""
    del col
    return (jnp.sum(row) - jnp.sum(positives.row_sum)) / row.shape[0]


def _softmax_from_positives(row: Array, col: Array, positives: Positives) -> Array:
    """Multi-positive cross-entropies: log-sum-exp minus the mean positive logit, both ways."""
    image_to_text = row - positives.row_sum / positives.row_count
    text_to_image = col - positives.col_sum / positives.col_count
    return (jnp.sum(image_to_text) + jnp.sum(text_to_image)) / (2 * row.shape[0])


@dataclasses.dataclass(frozen=True)
class ContrastiveLoss:
    """One loss in both forms: `plain` on full logits, `rule` + `from_stats` for the chunked;
    `from_positives` (optional) for the duplicate-aware / hard-negative forms, whose rule must
    take pair weights."""

    plain: LossFn
    rule: TileRule
    from_stats: Callable[[Array, Array, Array], Array]  # (row[B], col[B], positive[B]) -> []
    uses_bias: bool
    # (row[B], col[B], Positives) -> []: None where the loss has no duplicate-aware form
    from_positives: Callable[[Array, Array, Positives], Array] | None = None
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
            "positives": Key(
                str, "diagonal", "which pairs are matches (losses/pairs.py)", choices=POSITIVES
            ),
            "hard_negatives": HARD_NEGATIVES,
        }
    )


SIGMOID = ContrastiveLoss(
    sigmoid_loss, SIGMOID_RULE, _sigmoid_from_stats, True, _sigmoid_from_positives
)
SOFTMAX = ContrastiveLoss(
    softmax_loss, SOFTMAX_RULE, _softmax_from_stats, False, _softmax_from_positives
)


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


def hard_negative_miner(
    hard: HardNegatives, tile_size: int = WHOLE_BATCH, mesh: Mesh | None = None, batch_axes=()
) -> Callable[..., Array]:
    """(image_emb[B,E], text_emb[B,E], positive_ids int32[B, K], caption_ids int32[B, 2]) ->
    int32[B, k]: each image's hard negatives, global text indices by descending similarity (-1
    where fewer than k texts pass the guard), found by the ring over `batch_axes`."""
    top_k = ring_top_k(candidate_scores(hard.guard), hard.k, tile_size, mesh, batch_axes)

    def mine(image_emb, text_emb, positive_ids, caption_ids):
        index = jnp.arange(image_emb.shape[0], dtype=jnp.int32)
        extra = (positive_ids, caption_ids)
        return top_k(image_emb, text_emb, extra, extra, index)[1]

    return mine


def pair_loss(
    loss: ContrastiveLoss,
    hard: HardNegatives,
    tile_size: int = WHOLE_BATCH,
    mesh: Mesh | None = None,
    batch_axes=(),
) -> LossFn:
    """The duplicate-aware (and hard-negative weighted) form of `loss` (formulas above).

    loss_fn(image_emb, text_emb, logit_scale, logit_bias, positive_ids=None, caption_ids=None):
    positive_ids int32[B, K] (None: each example its own id, the diagonal), caption_ids int32[B,
    2] (`pairs.caption_ids`; required with hard negatives: the guard). tile_size=WHOLE_BATCH and
    no mesh: one tile of the full logits (the plain form); else the ring of `chunked_loss`.
    """
    stats_fn = pairwise_stats(
        loss.rule, tile_size, mesh, batch_axes, pair_roles(hard.weight if hard.k else None)
    )
    mine = hard_negative_miner(hard, tile_size, mesh, batch_axes) if hard.k else None

    def loss_fn(image_emb, text_emb, logit_scale, logit_bias, positive_ids=None, caption_ids=None):
        size = image_emb.shape[0]
        index = jnp.arange(size, dtype=jnp.int32)
        ids = index[:, None] if positive_ids is None else jnp.asarray(positive_ids, jnp.int32)
        hard_index = jnp.zeros((size, 0), jnp.int32)
        if mine is not None:
            if caption_ids is None:
                raise ValueError(
                    f"loss.hard_negatives.k={hard.k} needs caption_ids (pairs.caption_ids of the "
                    "tokens): the guard never mines a text whose caption is the image's own"
                )
            hard_index = mine(image_emb, text_emb, ids, caption_ids)
        bias = logit_bias if loss.uses_bias else jnp.zeros_like(logit_bias)
        row, col, positives = stats_fn(
            image_emb, text_emb, logit_scale, bias, (ids, hard_index), (ids, index)
        )
        return loss.from_positives(row, col, positives)

    return loss_fn
