"""Attention kernels and the one dispatcher every model calls."""

from vlm_jax.kernels import autotune, flash  # flash registers impl="pallas"
from vlm_jax.kernels.attention import ATTENTION_IMPLS, attention, resolve_impl
from vlm_jax.kernels.flash import BlockSizes, flash_attention
from vlm_jax.kernels.mask import AttentionMask

__all__ = [
    "ATTENTION_IMPLS",
    "AttentionMask",
    "BlockSizes",
    "attention",
    "autotune",
    "flash",
    "flash_attention",
    "resolve_impl",
]
