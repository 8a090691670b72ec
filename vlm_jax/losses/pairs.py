"""Which pairs of a contrastive batch are positives, and which negatives are hard.

`loss.positives` says which pairs (image i, text j) are matches:
  "diagonal"      i == j only (the classic losses);
  "same_caption"  the two captions are the same token sequence (a batch of templated class
                  captions holds many: treating those pairs as negatives fights the data);
  "same_label"    the two records share a class label (the source must give train records a
                  "label", as folder sources with a label column do).
Each example gets ids int32[B, K] and a pair is positive iff all K lanes of its two ids are
equal. Caption ids are a polynomial hash of the token ids in two 32-bit lanes (64 bits, so an
accidental collision in a batch of 10^5 captions has probability ~1e-10), computed on device
from the tokens; label ids are the label.

`loss.hard_negatives` (off unless k > 0): per image, the k texts of the global batch with the
highest similarity s_ij = <x_i, y_j> among its candidates are its hard negatives (H_ij = 1) and
count 1 + weight times in the loss. The guard keeps likely false negatives out of the
candidates: pairs positive under `positives`, pairs with identical captions (whatever
`positives` says) and pairs with s_ij > guard. The loss formulas are in losses/contrastive.py.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.losses.ring import Array, PairRoles
from vlm_jax.schema import Key, Schema

POSITIVES = ("diagonal", "same_caption", "same_label")
HASH_BASES = (0x01000193, 0x9E3779B1)  # odd multipliers: two independent 32-bit lanes


def _non_negative(value: Any) -> bool:
    return value >= 0


HARD_NEGATIVES = Schema(
    {
        "k": Key(
            int,
            0,
            "hard negatives mined per image over the global batch (0: off)",
            valid=_non_negative,
            expect="a number of texts >= 0",
        ),
        "weight": Key(
            float,
            1.0,
            "extra weight w: a hard-negative pair counts 1 + w times in the loss",
            valid=_non_negative,
            expect="a weight >= 0",
        ),
        "guard": Key(
            float,
            0.9,
            "similarity <x_i, y_j> above which a pair is a likely false negative, never mined",
        ),
    }
)


class HardNegatives(NamedTuple):
    k: int = 0
    weight: float = 1.0
    guard: float = 0.9


def _hash_powers(length: int) -> np.ndarray:
    """uint32[2, L]: base^(L-1-l) mod 2^32 for each lane."""
    return np.array(
        [[pow(base, length - 1 - pos, 2**32) for pos in range(length)] for base in HASH_BASES],
        np.uint32,
    )


def caption_ids(tokens: Array) -> Array:
    """int32[B, 2]: sum_l tokens[b, l] * base^(L-1-l) mod 2^32 per lane (uint32 arithmetic
    wraps), bit-cast to int32. Equal token rows give equal ids; rows that differ in one token
    never collide (base odd, |difference| < 2^32), in general with probability ~2^-64."""
    powers = jnp.asarray(_hash_powers(tokens.shape[1]))  # [2, L]
    hashes = jnp.sum(tokens.astype(jnp.uint32)[:, None, :] * powers[None], axis=-1)  # [B, 2]
    return jax.lax.bitcast_convert_type(hashes, jnp.int32)


def same(row_ids: Array, col_ids: Array) -> Array:
    """bool[r, c]: ids [r, K] and [c, K] equal in every lane."""
    return jnp.all(row_ids[:, None, :] == col_ids[None, :, :], axis=-1)


def batch_ids(positives: str, hard_negatives: HardNegatives, batch: dict) -> dict[str, Array]:
    """The pair ids a loss built by build_loss takes for `batch` ({"tokens": int32[B, L],
    "label": int[B] with same_label}), as its keyword arguments: positive_ids (omitted for
    "diagonal") and caption_ids (for the hard-negative guard)."""
    if positives not in POSITIVES:
        raise ValueError(f"loss.positives={positives!r} is not one of: {', '.join(POSITIVES)}")
    ids = {}
    needs_captions = positives == "same_caption" or hard_negatives.k > 0
    captions = caption_ids(batch["tokens"]) if needs_captions else None
    if positives == "same_caption":
        ids["positive_ids"] = captions
    elif positives == "same_label":
        ids["positive_ids"] = jnp.asarray(batch["label"], jnp.int32)[:, None]
    if hard_negatives.k > 0:
        ids["caption_ids"] = captions
    return ids


def candidate_scores(guard: float):
    """score(dots[t, t], row_extra, col_extra) for ring_top_k: the similarity of each pair that
    may be a hard negative, -inf where the guard excludes it. Extras: (ids, caption ids)."""

    def score(dots: Array, row_extra, col_extra) -> Array:
        (row_ids, row_captions), (col_ids, col_captions) = row_extra, col_extra
        excluded = same(row_ids, col_ids) | same(row_captions, col_captions) | (dots > guard)
        return jnp.where(excluded, -jnp.inf, dots)

    return score


def pair_roles(hard_weight: float | None) -> PairRoles:
    """Roles of a tile's pairs. row_extra: (ids [t, K], hard int32[t, k]: each image's hard
    negatives as global text indices, -1 for none); col_extra: (ids [t, K], index int32[t]).
    Weight 1 + hard_weight on hard negatives; None: no pair weights (no hard negatives)."""

    def roles(row_extra, col_extra) -> tuple[Array, Array | None]:
        (row_ids, hard), (col_ids, index) = row_extra, col_extra
        positive = same(row_ids, col_ids)
        if hard_weight is None:
            return positive, None
        is_hard = jnp.any(hard[:, None, :] == index[None, :, None], axis=-1)  # [t, t]
        return positive, 1.0 + hard_weight * is_hard.astype(jnp.float32)

    return PairRoles(roles)
