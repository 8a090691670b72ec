"""Losses: contrastive image-text losses (plain and tiled-ring forms)."""

from vlm_jax.losses.contrastive import (
    LOSSES,
    SIGMOID_RULE,
    SOFTMAX_RULE,
    ContrastiveLoss,
    TileRule,
    build_loss,
    chunked_loss,
    pairwise_stats,
    sigmoid_loss,
    softmax_loss,
)

__all__ = [
    "LOSSES",
    "SIGMOID_RULE",
    "SOFTMAX_RULE",
    "ContrastiveLoss",
    "TileRule",
    "build_loss",
    "chunked_loss",
    "pairwise_stats",
    "sigmoid_loss",
    "softmax_loss",
]
