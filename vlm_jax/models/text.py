"""Text transformer tower: bidirectional (SigLIP) or causal (CLIP) encoder with pooling.

tokens int32[B, L] -> token + learned position embedding -> pre-LN blocks -> final LN ->
pool -> head -> float[B, out_dim]. Pad tokens (`pad_id`) are masked out as keys when
`mask_pad` (HF SigLIP attends to pads, so its converter turns that off).

Pooling (all position choices are per row):
  first:          token 0 (BERT-style [CLS])
  last:           the last non-pad token
  last_position:  position L - 1 whatever it holds (HF SigLIP)
  eos:            the first `eos_id` token (CLIP's EOT), else the last non-pad token
  mean:           mean over the attended tokens (non-pad, or all when mask_pad=False)
  map:            attention pooling over the attended tokens
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.kernels import AttentionMask
from vlm_jax.models.layers import Dtype, Encoder, MAPHead, constrain, logical_dense

TEXT_POOLS = ("last", "eos", "first", "mean", "map", "last_position")


def last_valid_index(valid: jax.Array) -> jax.Array:
    """bool[B, L] -> int32[B]: the last True position (0 when a row has none)."""
    positions = jnp.arange(valid.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(valid, positions, 0), axis=1)


def first_eos_index(tokens: jax.Array, eos_id: int, valid: jax.Array) -> jax.Array:
    """int32[B]: the first `eos_id` position, or the last valid one where a row has no eos."""
    is_eos = tokens == eos_id
    return jnp.where(
        jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), last_valid_index(valid)
    ).astype(jnp.int32)


def gather_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """x: float[B, L, D], index: int32[B] -> float[B, D]."""
    return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]


class TextTransformer(nn.Module):
    """Token embedding + transformer encoder + pooling + linear head (None: no head)."""

    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    out_dim: int | None = None
    causal: bool = False
    pool: str = "last"
    pad_id: int = 0
    eos_id: int = 1
    mask_pad: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False
    scan: bool = False
    activation: str = "gelu_tanh"
    ln_eps: float = 1e-6
    head_bias: bool = True

    def _pool(self, x: jax.Array, tokens: jax.Array, kv_valid: jax.Array | None) -> jax.Array:
        """x: float[B, L, D] -> float[B, D]. kv_valid: bool[B, L], the attended keys (None: all)."""
        not_pad = tokens != self.pad_id
        if self.pool == "first":
            return x[:, 0]
        if self.pool == "last_position":
            return x[:, -1]
        if self.pool == "last":
            return gather_rows(x, last_valid_index(not_pad))
        if self.pool == "eos":
            return gather_rows(x, first_eos_index(tokens, self.eos_id, not_pad))
        if self.pool == "mean":
            if kv_valid is None:
                return jnp.mean(x, axis=1)
            weights = kv_valid.astype(x.dtype)[:, :, None]
            return jnp.sum(x * weights, 1) / jnp.maximum(jnp.sum(weights, 1), 1)
        return MAPHead(
            self.num_heads,
            self.mlp_dim,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            activation=self.activation,
            ln_eps=self.ln_eps,
            name="map",
        )(x, mask=None if kv_valid is None else AttentionMask(kv_valid=kv_valid))

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        if self.pool not in TEXT_POOLS:
            raise ValueError(f"text pool={self.pool!r} is not one of: {', '.join(TEXT_POOLS)}")
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds text max_len={self.max_len}")
        x = nn.Embed(
            self.vocab_size,
            self.width,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1 / self.width**0.5), ("vocab", "embed")
            ),
            name="embedding",
        )(tokens)  # [B, L, D]
        posemb = self.param(
            "posemb",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1 / self.width**0.5), (None, None, "embed")
            ),
            (1, self.max_len, self.width),
            jnp.float32,
        )
        x = x + posemb[:, :length].astype(self.dtype)
        x = nn.Dropout(self.dropout)(x, not train)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        kv_valid = tokens != self.pad_id if self.mask_pad else None  # bool[B, L]
        mask = AttentionMask(causal=self.causal, kv_valid=kv_valid)
        x = Encoder(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            dtype=self.dtype,
            dropout=self.dropout,
            attention_impl=self.attention_impl,
            remat=self.remat,
            scan=self.scan,
            activation=self.activation,
            ln_eps=self.ln_eps,
            name="encoder",
        )(x, mask, deterministic=not train)
        x = self._pool(x, tokens, kv_valid)  # [B, D]
        if self.out_dim is None:
            return x
        return logical_dense(
            self.out_dim, ("embed", None), dtype=self.dtype, use_bias=self.head_bias, name="head"
        )(x)
