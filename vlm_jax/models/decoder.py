"""Causal decoder LM: RoPE, RMSNorm, SwiGLU, grouped-query attention, KV cache.

    logits, cache = DecoderLM(...)(tokens=int32[B, T])            # training / scoring
    logits, cache = lm(embeds=float[B, T, D], cache=cache)         # prefill or one step

Decoding is functional: the cache is a `KVCache` pytree passed in and returned, never a
mutable collection, so a whole generation loop jits as one `lax.while_loop`. New keys and
values are written at each example's own `cache.index` (prompts of different lengths in
one batch), and queries see cached keys through the dispatcher's explicit positions:
q_positions = index + arange(T), kv_valid = slot < index + T. Writing past `max_len` is an
error when the index is concrete; under jit, where it is traced, the overflowed rows get NaN
logits (never silently wrong ones).

With `cross_attention_every = k > 0`, a Flamingo gated cross-attention block runs before
every k-th decoder layer; its tanh gates start at 0, so until trained the model is
exactly the language model it was initialised from.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax.kernels import AttentionMask, attention
from vlm_jax.models.layers import (
    Dtype,
    HeadsDense,
    MultiHeadAttention,
    check_heads,
    constrain,
    logical_dense,
)
from vlm_jax.schema import REQUIRED, Key, Schema, resolve


@flax.struct.dataclass
class KVCache:
    """Per-layer keys/values float[B, S, Hkv, hd] and the next write slot int32[B]."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    index: jax.Array

    @classmethod
    def zeros(cls, batch, max_len, depth, kv_heads, head_dim, dtype=jnp.float32) -> KVCache:
        empty = tuple(jnp.zeros((batch, max_len, kv_heads, head_dim), dtype) for _ in range(depth))
        return cls(keys=empty, values=empty, index=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[1]


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 (LLaMA): no mean subtraction, no bias."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            jnp.float32,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale).astype(self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10_000.0) -> jax.Array:
    """Rotary position embedding (rotate-half layout). x: [B, T, H, hd]; positions: int[B, T]."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [hd/2]
    angles = positions[:, :, None].astype(jnp.float32) * freqs  # [B, T, hd/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) W_down (PaLM / LLaMA MLP). x: [B, T, D] -> [B, T, D]."""

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda n, names, name: logical_dense(
            n, names, dtype=self.dtype, use_bias=False, name=name
        )
        gate = dense(self.mlp_dim, ("embed", "mlp"), "gate")(x)
        up = dense(self.mlp_dim, ("embed", "mlp"), "up")(x)
        h = constrain(nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), "down")(h)


def _write(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """Write new[b] at cache[b, index[b]:index[b] + T] for every example b."""
    return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (i, 0, 0)))(
        cache, new.astype(cache.dtype), index
    )


class CausalSelfAttention(nn.Module):
    """GQA self-attention with RoPE; reads and extends a layer's KV cache when given one."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, positions, mask, kv=None, index=None):
        # x: float[B, T, D]; positions: int32[B, T]; kv: (float[B, S, Hkv, hd],) * 2 or None
        def project(heads: int, names: tuple[str, ...], name: str) -> jax.Array:
            features = (heads, self.head_dim)
            return HeadsDense(features, names, use_bias=False, dtype=self.dtype, name=name)(x)

        q = project(self.num_heads, ("embed", "heads", "head_dim"), "query")
        k = project(self.num_kv_heads, ("embed", "kv_heads", "head_dim"), "key")
        v = project(self.num_kv_heads, ("embed", "kv_heads", "head_dim"), "value")
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
        if kv is not None:
            k, v = _write(kv[0], k, index), _write(kv[1], v, index)
            kv = (k, v)
        q = constrain(q, ("act_batch", "act_length", "act_heads", None))
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, impl=self.attention_impl)
        out = HeadsDense(
            (x.shape[-1],),
            ("heads", "head_dim", "embed"),
            use_bias=False,
            dtype=self.dtype,
            in_dims=2,
            name="out",
        )(out)
        return out, kv


class DecoderBlock(nn.Module):
    """Pre-norm LLaMA block: x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, positions, mask, kv=None, index=None, deterministic=True):
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        h, kv = CausalSelfAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.rope_theta,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            name="attn",
        )(RMSNorm(dtype=self.dtype, name="norm_attn")(x), positions, mask, kv, index)
        x = x + nn.Dropout(self.dropout)(h, deterministic)
        h = SwiGLU(self.mlp_dim, dtype=self.dtype, name="mlp")(
            RMSNorm(dtype=self.dtype, name="norm_mlp")(x)
        )
        return x + nn.Dropout(self.dropout)(h, deterministic), kv


class GatedCrossAttention(nn.Module):
    """Flamingo's gated xattn-dense block; tanh gates initialised to 0 (an identity at init).

    x: float[B, T, D] text states; media: float[B, M, D] visual tokens -> float[B, T, D].
    """

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def _gate(self, name: str) -> jax.Array:
        return jnp.tanh(
            self.param(
                name, nn.with_logical_partitioning(nn.initializers.zeros, ()), (), jnp.float32
            )
        ).astype(self.dtype)

    @nn.compact
    def __call__(self, x: jax.Array, media: jax.Array, media_valid=None) -> jax.Array:
        mask = None if media_valid is None else AttentionMask(kv_valid=media_valid)
        h = MultiHeadAttention(
            self.num_heads,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            use_bias=False,
            name="attn",
        )(RMSNorm(dtype=self.dtype, name="norm_attn")(x), media, mask=mask)
        x = x + self._gate("attn_gate") * h
        h = SwiGLU(self.mlp_dim, dtype=self.dtype, name="mlp")(
            RMSNorm(dtype=self.dtype, name="norm_mlp")(x)
        )
        return x + self._gate("mlp_gate") * h


class DecoderLM(nn.Module):
    """Decoder-only LM. Call with `tokens` or `embeds` (e.g. text with visual tokens spliced in).

    Returns (logits float32[B, T, vocab], cache). `prefix_lengths: int32[B]` makes the first
    positions bidirectional (prefix-LM); `media: float[B, M, D]` feeds the gated
    cross-attention blocks when `cross_attention_every > 0`.
    """

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int | None = None
    rope_theta: float = 10_000.0
    tie_embeddings: bool = True
    cross_attention_every: int = 0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or check_heads("model.lm", self.width, self.num_heads)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.zeros(
            batch, max_len, self.depth, self.kv_heads, self.dim_per_head, self.dtype
        )

    def setup(self):
        self.embedder = nn.Embed(
            self.vocab_size,
            self.width,
            param_dtype=jnp.float32,
            dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(1.0 / self.width**0.5), ("vocab", "embed")
            ),
        )
        block_cls = nn.remat(DecoderBlock, static_argnums=(6,)) if self.remat else DecoderBlock
        self.blocks = [
            block_cls(
                self.num_heads,
                self.kv_heads,
                self.dim_per_head,
                self.mlp_dim or 4 * self.width,
                self.rope_theta,
                self.dropout,
                dtype=self.dtype,
                attention_impl=self.attention_impl,
            )
            for i in range(self.depth)
        ]
        every = self.cross_attention_every
        self.xattn = {
            str(i): GatedCrossAttention(
                self.num_heads,
                self.mlp_dim or 4 * self.width,
                dtype=self.dtype,
                attention_impl=self.attention_impl,
            )
            for i in range(self.depth)
            if every and i % every == 0
        }
        self.norm_final = RMSNorm(dtype=self.dtype)
        if not self.tie_embeddings:
            self.unembed = logical_dense(
                self.vocab_size, ("embed", "vocab"), dtype=self.dtype, use_bias=False
            )

    def embed(self, tokens: jax.Array) -> jax.Array:
        """int32[B, T] -> float[B, T, D]."""
        return self.embedder(tokens)

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and (tied or untied) unembedding: float[B, T, D] -> float32[B, T, V]."""
        x = self.norm_final(x)
        out = self.embedder.attend(x) if self.tie_embeddings else self.unembed(x)
        return out.astype(jnp.float32)

    def __call__(
        self,
        tokens: jax.Array | None = None,
        *,
        embeds: jax.Array | None = None,
        prefix_lengths: jax.Array | None = None,
        cache: KVCache | None = None,
        media: jax.Array | None = None,
        media_valid: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, KVCache | None]:
        if (tokens is None) == (embeds is None):
            raise ValueError("DecoderLM: pass exactly one of tokens or embeds")
        x = self.embed(tokens) if embeds is None else embeds.astype(self.dtype)
        positions, mask, index = _positions_and_mask(x.shape[0], x.shape[1], prefix_lengths, cache)
        if self.xattn and media is None:
            raise ValueError("DecoderLM with cross_attention_every > 0 needs media")
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            if str(i) in self.xattn:
                x = self.xattn[str(i)](x, media.astype(self.dtype), media_valid)
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = block(x, positions, mask, kv, index, deterministic)
            if kv is not None:
                keys.append(kv[0])
                values.append(kv[1])
        logits = self.logits(x)
        if cache is not None:
            logits = _nan_where_overflowed(logits, index, cache.max_len)
            cache = KVCache(tuple(keys), tuple(values), index + x.shape[1])
        return logits, cache


def _check_capacity(cache: KVCache, length: int) -> None:
    """Fail at trace time when the shapes (or a concrete index) prove that `length` new tokens
    overflow the cache; a traced index is caught by `_nan_where_overflowed` instead."""
    if length > cache.max_len:
        raise ValueError(f"{length} new tokens do not fit a KV cache of max_len={cache.max_len}")
    if isinstance(cache.index, jax.core.Tracer):
        return
    ends = np.asarray(cache.index) + length
    if (ends > cache.max_len).any():
        row = int(np.argmax(ends > cache.max_len))
        raise ValueError(
            f"KV cache overflow: row {row} is at index {int(cache.index[row])}, and {length} "
            f"new tokens would end at {int(ends[row])} > max_len={cache.max_len}"
        )


def _nan_where_overflowed(logits: jax.Array, index: jax.Array, max_len: int) -> jax.Array:
    """NaN logits float32[B, T, V] for the rows whose T new tokens ran past the cache.

    dynamic_update_slice clamps an out-of-range write back into the cache, overwriting earlier
    keys/values, so such a row's logits would be silently wrong; NaN cannot be mistaken for an
    answer (and the row stays NaN: its index only grows). Size the cache as prompt + new tokens.
    """
    overflowed = index + logits.shape[1] > max_len  # bool[B]
    return jnp.where(overflowed[:, None, None], jnp.nan, logits)


def _positions_and_mask(batch: int, length: int, prefix_lengths, cache: KVCache | None):
    """Positions int32[B, T], the AttentionMask, and the cache write index for T new tokens."""
    steps = jnp.arange(length, dtype=jnp.int32)
    if cache is None:
        positions = jnp.broadcast_to(steps, (batch, length))
        return positions, AttentionMask(causal=True, prefix_lengths=prefix_lengths), None
    _check_capacity(cache, length)
    positions = cache.index[:, None] + steps  # int32[B, T]
    slots = jnp.arange(cache.max_len, dtype=jnp.int32)
    mask = AttentionMask(
        causal=True,
        prefix_lengths=prefix_lengths,
        q_positions=positions,
        kv_positions=jnp.broadcast_to(slots, (batch, cache.max_len)),
        kv_valid=slots[None, :] < (cache.index + length)[:, None],
    )
    return positions, mask, cache.index


def _check_lm_heads(path: str, cfg: dict) -> None:
    """Without head_dim, width must split evenly over the heads; kv heads must group them."""
    if not cfg["head_dim"]:
        check_heads(path, cfg["width"], cfg["num_heads"])
    kv_heads = cfg["num_kv_heads"] or cfg["num_heads"]
    if kv_heads <= 0 or cfg["num_heads"] % kv_heads:
        raise ValueError(
            f"{path}: num_heads={cfg['num_heads']} is not a multiple of num_kv_heads={kv_heads}"
        )


_OPTIONAL_INT = (int, type(None))
LM = Schema(
    {
        "vocab_size": Key(int, REQUIRED, "token embedding rows"),
        "width": Key(int, REQUIRED, "model width"),
        "depth": Key(int, REQUIRED, "number of decoder blocks"),
        "num_heads": Key(int, REQUIRED, "query heads"),
        "num_kv_heads": Key(_OPTIONAL_INT, None, "key/value heads (GQA); None: num_heads"),
        "head_dim": Key(_OPTIONAL_INT, None, "per-head width; None: width // num_heads"),
        "mlp_dim": Key(_OPTIONAL_INT, None, "gated MLP width; None: 4 * width"),
        "rope_theta": Key(float, 10_000.0, "RoPE base"),
        "tie_embeddings": Key(bool, True, "the output head reuses the token embedding"),
        "dropout": Key(float, 0.0, "dropout rate"),
    },
    doc="the decoder LM (model.lm)",
    check=_check_lm_heads,
)


def decoder_from_config(
    cfg: ml_collections.ConfigDict,
    *,
    dtype: Dtype = jnp.float32,
    attention_impl: str = "auto",
    remat: bool = False,
    cross_attention_every: int = 0,
) -> DecoderLM:
    """Build a DecoderLM from `config.model.lm`.

    Keys: LM (resolved here, so head counts are checked before any compute).
    """
    return DecoderLM(
        **resolve("model.lm", cfg, LM),
        cross_attention_every=cross_attention_every,
        dtype=dtype,
        attention_impl=attention_impl,
        remat=remat,
    )
