"""Attention kernels and the one dispatcher every model calls."""

from vlm_jax.kernels.attention import ATTENTION_IMPLS, attention, resolve_impl
from vlm_jax.kernels.mask import AttentionMask

__all__ = ["ATTENTION_IMPLS", "AttentionMask", "attention", "resolve_impl"]
