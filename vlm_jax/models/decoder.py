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

The released decoder families differ in a few knobs, each a key of `model.lm` (LM below) whose
default is the plain LLaMA block: q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3, Gemma 3),
`(1 + w)` RMSNorm, GeGLU, sqrt(width) embedding scale, `query_pre_attn_scalar`, attention and
final-logit soft-capping, norms after attention/MLP too (Gemma), sliding-window layers among
global ones (Mistral, Gemma 2/3, with their own RoPE base in Gemma 3) and RoPE frequency scaling
(linear, Llama 3). Prompts of different lengths are right-padded: causal attention keeps the
pads out of every real token's view, and the KV cache writes each row at its own index.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax.kernels import AttentionMask, attention
from vlm_jax.models.layers import (
    ACTIVATIONS,
    Dtype,
    HeadsDense,
    MultiHeadAttention,
    activation_fn,
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
    """x / rms(x) * (offset + scale), computed in float32 (LLaMA): no mean subtraction, no bias.

    Gemma stores `scale - 1` (offset 1.0, a zero-initialised scale); `axis_name` is the logical
    name of the normalised dim ("head_dim" for per-head q/k norms).
    """

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    offset: float = 0.0
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(
                nn.initializers.constant(1.0 - self.offset), (self.axis_name,)
            ),
            (x.shape[-1],),
            jnp.float32,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (self.offset + scale if self.offset else scale)).astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class Rope:
    """RoPE frequencies: base `theta`, optionally scaled for longer contexts.

    scaling None: theta^(-i / (hd/2)); "linear": those / factor (positions / factor);
    "llama3": Llama 3.1's smooth blend, frequencies with wavelengths above
    original_max_len / low_freq_factor divided by factor, below original_max_len /
    high_freq_factor kept, and interpolated in between.
    """

    theta: float = 10_000.0
    scaling: str | None = None
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def frequencies(self, head_dim: int) -> jax.Array:
        """float32[hd/2], the rotation per position of each pair of dims."""
        half = head_dim // 2
        freqs = self.theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
        if self.scaling == "linear":
            return freqs / self.factor
        if self.scaling == "llama3":
            return self._llama3(freqs)
        return freqs

    def _llama3(self, freqs: jax.Array) -> jax.Array:
        wavelen = 2 * math.pi / freqs
        low_wavelen = self.original_max_len / self.low_freq_factor
        high_wavelen = self.original_max_len / self.high_freq_factor
        scaled = jnp.where(wavelen > low_wavelen, freqs / self.factor, freqs)
        smooth = (self.original_max_len / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """What a decoder block does beyond the LLaMA block (defaults: the LLaMA block).

    qkv_bias: biases on q/k/v (Qwen2); qk_norm: RMSNorm of each q/k head before RoPE (Qwen3,
    Gemma 3); norm_eps / norm_offset: every RMSNorm's (Gemma: offset 1.0); mlp_activation: the
    gate's (gelu_tanh: GeGLU); query_pre_attn_scalar: scores scaled by its ^-1/2 instead of
    head_dim^-1/2; attn_logit_softcap: scores -> cap * tanh(scores / cap); post_norms: RMSNorm
    of the attention and MLP outputs before each residual add (Gemma 2/3).
    """

    qkv_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6
    norm_offset: float = 0.0
    mlp_activation: str = "silu"
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    post_norms: bool = False

    def norm(self, dtype: Dtype, name: str, axis_name: str = "embed") -> RMSNorm:
        return RMSNorm(self.norm_eps, dtype, self.norm_offset, axis_name, name=name)


def apply_rope(
    x: jax.Array, positions: jax.Array, theta: float = 10_000.0, rope: Rope | None = None
) -> jax.Array:
    """Rotary position embedding (rotate-half layout). x: [B, T, H, hd]; positions: int[B, T].

    `rope` (else plain RoPE of base `theta`) gives the frequencies.
    """
    freqs = (rope or Rope(theta)).frequencies(x.shape[-1])  # [hd/2]
    angles = positions[:, :, None].astype(jnp.float32) * freqs  # [B, T, hd/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


GATE_ACTIVATIONS = {"silu": nn.silu, **{name: activation_fn(name) for name in ACTIVATIONS}}


class SwiGLU(nn.Module):
    """act(x W_gate) * (x W_up) W_down (PaLM / LLaMA MLP with silu, Gemma's GeGLU with
    gelu_tanh). x: [B, T, D] -> [B, T, D]."""

    mlp_dim: int
    dtype: Dtype = jnp.float32
    activation: str = "silu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda n, names, name: logical_dense(
            n, names, dtype=self.dtype, use_bias=False, name=name
        )
        gate = dense(self.mlp_dim, ("embed", "mlp"), "gate")(x)
        up = dense(self.mlp_dim, ("embed", "mlp"), "up")(x)
        h = constrain(
            GATE_ACTIVATIONS[self.activation](gate) * up, ("act_batch", "act_length", "act_mlp")
        )
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
    rope: Rope | None = None  # else plain RoPE of base rope_theta
    options: BlockOptions = BlockOptions()

    @nn.compact
    def __call__(self, x, positions, mask, kv=None, index=None):
        # x: float[B, T, D]; positions: int32[B, T]; kv: (float[B, S, Hkv, hd],) * 2 or None
        opts = self.options

        def project(heads: int, names: tuple[str, ...], name: str) -> jax.Array:
            features = (heads, self.head_dim)
            dense = HeadsDense(features, names, opts.qkv_bias, self.dtype, name=name)
            return dense(x)

        q = project(self.num_heads, ("embed", "heads", "head_dim"), "query")
        k = project(self.num_kv_heads, ("embed", "kv_heads", "head_dim"), "key")
        v = project(self.num_kv_heads, ("embed", "kv_heads", "head_dim"), "value")
        if opts.qk_norm:
            q = opts.norm(self.dtype, "norm_query", "head_dim")(q)
            k = opts.norm(self.dtype, "norm_key", "head_dim")(k)
        rope = self.rope or Rope(self.rope_theta)
        q, k = apply_rope(q, positions, rope=rope), apply_rope(k, positions, rope=rope)
        if kv is not None:
            k, v = _write(kv[0], k, index), _write(kv[1], v, index)
            kv = (k, v)
        q = constrain(q, ("act_batch", "act_length", "act_heads", None))
        scale = None if opts.query_pre_attn_scalar is None else opts.query_pre_attn_scalar**-0.5
        out = attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            mask,
            impl=self.attention_impl,
            scale=scale,
            logit_softcap=opts.attn_logit_softcap,
        )
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
    """Pre-norm LLaMA block: x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x)).

    With `options.post_norms` (Gemma 2/3): x + RMSNorm(Attn(RMSNorm(x))), likewise for the MLP.
    `window`: this layer's sliding window (None: global attention).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    rope: Rope | None = None
    options: BlockOptions = BlockOptions()
    window: int | None = None

    @nn.compact
    def __call__(self, x, positions, mask, kv=None, index=None, deterministic=True):
        opts = self.options
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        if self.window is not None:
            mask = dataclasses.replace(mask, window=self.window)
        h, kv = CausalSelfAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.rope_theta,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            rope=self.rope,
            options=opts,
            name="attn",
        )(opts.norm(self.dtype, "norm_attn")(x), positions, mask, kv, index)
        if opts.post_norms:
            h = opts.norm(self.dtype, "norm_attn_post")(h)
        x = x + nn.Dropout(self.dropout)(h, deterministic)
        h = SwiGLU(self.mlp_dim, dtype=self.dtype, activation=opts.mlp_activation, name="mlp")(
            opts.norm(self.dtype, "norm_mlp")(x)
        )
        if opts.post_norms:
            h = opts.norm(self.dtype, "norm_mlp_post")(h)
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
    cross-attention blocks when `cross_attention_every > 0`. A packed row (several sequences,
    training only) gives `segment_ids: int32[B, T]` (each sequence a run of one id, 0 the
    padding) and optionally `prefix_mask: bool[B, T]` (each sequence's bidirectional prefix)
    instead of prefix_lengths: RoPE positions restart at each sequence and attention stays
    inside it, so each sequence sees exactly what it would alone (`packed_positions_and_mask`).
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
    # The released families' knobs (keys of LM; the defaults are the LLaMA decoder).
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6
    norm_offset: float = 0.0
    mlp_activation: str = "silu"
    embed_scale: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    post_norms: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    rope_scaling: str | None = None
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    rope_local_theta: float | None = None

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or check_heads("model.lm", self.width, self.num_heads)

    @property
    def options(self) -> BlockOptions:
        return BlockOptions(
            qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm,
            norm_eps=self.norm_eps,
            norm_offset=self.norm_offset,
            mlp_activation=self.mlp_activation,
            query_pre_attn_scalar=self.query_pre_attn_scalar,
            attn_logit_softcap=self.attn_logit_softcap,
            post_norms=self.post_norms,
        )

    def is_sliding(self, layer: int) -> bool:
        """Layer `layer` attends within `sliding_window` (all layers when layer_types is ())."""
        if self.sliding_window is None:
            return False
        return not self.layer_types or self.layer_types[layer] == "sliding"

    def rope(self, layer: int) -> Rope:
        """Layer `layer`'s RoPE: sliding layers take `rope_local_theta`, unscaled, when it is set
        (Gemma 3); every other layer rope_theta with rope_scaling."""
        if self.rope_local_theta is not None and self.is_sliding(layer):
            return Rope(self.rope_local_theta)
        return Rope(
            self.rope_theta,
            self.rope_scaling,
            self.rope_factor,
            self.rope_low_freq_factor,
            self.rope_high_freq_factor,
            self.rope_original_max_len,
        )

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
                rope=self.rope(i),
                options=self.options,
                window=self.sliding_window if self.is_sliding(i) else None,
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
        self.norm_final = RMSNorm(self.norm_eps, self.dtype, self.norm_offset)
        if not self.tie_embeddings:
            self.unembed = logical_dense(
                self.vocab_size, ("embed", "vocab"), dtype=self.dtype, use_bias=False
            )

    def embed(self, tokens: jax.Array) -> jax.Array:
        """int32[B, T] -> float[B, T, D] (times sqrt(width) with embed_scale, as Gemma)."""
        x = self.embedder(tokens)
        return x * jnp.asarray(self.width**0.5, x.dtype) if self.embed_scale else x

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and (tied or untied) unembedding: float[B, T, D] -> float32[B, T, V]."""
        x = self.norm_final(x)
        out = self.embedder.attend(x) if self.tie_embeddings else self.unembed(x)
        out = out.astype(jnp.float32)
        cap = self.final_logit_softcap
        return out if cap is None else cap * jnp.tanh(out / cap)

    def __call__(
        self,
        tokens: jax.Array | None = None,
        *,
        embeds: jax.Array | None = None,
        prefix_lengths: jax.Array | None = None,
        cache: KVCache | None = None,
        media: jax.Array | None = None,
        media_valid: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        prefix_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, KVCache | None]:
        if (tokens is None) == (embeds is None):
            raise ValueError("DecoderLM: pass exactly one of tokens or embeds")
        x = self.embed(tokens) if embeds is None else embeds.astype(self.dtype)
        if segment_ids is not None:
            if cache is not None or prefix_lengths is not None:
                raise ValueError(
                    "DecoderLM: segment_ids (packed rows) take no cache and no "
                    "prefix_lengths (give prefix_mask)"
                )
            positions, mask = packed_positions_and_mask(segment_ids, prefix_mask)
            index = None
        else:
            positions, mask, index = _positions_and_mask(
                x.shape[0], x.shape[1], prefix_lengths, cache
            )
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

    def prefill(self, images, prompt, prompt_lengths, max_new_tokens: int):
        """`generate`'s prefill for a text-only LM (`images` is ignored: None): the right-padded
        prompt int32[B, P] with lengths int32[B], causal, into a cache with room for
        `max_new_tokens` -> (logits float32[B, V] of each prompt's last token, cache, None)."""
        cache = self.init_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
        logits, cache = self(prompt, cache=cache)
        last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
        return last, cache.replace(index=prompt_lengths), None

    def decode_step(self, tokens, cache: KVCache, media=None):
        """One token per example: tokens int32[B, 1] -> (logits float32[B, V], cache)."""
        logits, cache = self(tokens, cache=cache, media=media)
        return logits[:, -1], cache


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


def packed_positions_and_mask(
    segment_ids: jax.Array, prefix_mask: jax.Array | None
) -> tuple[jax.Array, AttentionMask]:
    """A packed row's RoPE positions int32[B, T], restarting at 0 where each run of one
    segment id begins, and its mask: causal (or prefix-LM on `prefix_mask`'s keys) within each
    segment. Causality compares row positions, which order the keys of one segment exactly as
    the restarted ones do (and keep the flash kernel's block skipping)."""
    steps = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
    )
    first = jax.lax.cummax(jnp.where(starts, steps, 0), axis=1)  # each token's run start
    mask = AttentionMask(
        causal=True,
        q_segment_ids=segment_ids,
        kv_segment_ids=segment_ids,
        kv_prefix=None if prefix_mask is None else prefix_mask.astype(bool),
    )
    return steps - first, mask


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


def _check_lm(path: str, cfg: dict) -> None:
    """Head counts (below); layer_types one per layer, sliding ones needing a window."""
    _check_lm_heads(path, cfg)
    types = tuple(cfg["layer_types"])
    if types and len(types) != cfg["depth"]:
        raise ValueError(f"{path}.layer_types has {len(types)} entries; depth={cfg['depth']}")
    bad = sorted(set(types) - set(LAYER_TYPES))
    if bad:
        raise ValueError(f"{path}.layer_types: {bad[0]!r} is not one of: {', '.join(LAYER_TYPES)}")
    if "sliding" in types and cfg["sliding_window"] is None:
        raise ValueError(f"{path}.layer_types has sliding layers but sliding_window is None")


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
_OPTIONAL_FLOAT = (float, type(None))
LAYER_TYPES = ("full", "sliding")
ROPE_SCALINGS = (None, "linear", "llama3")
_POSITIVE = dict(valid=lambda v: v is None or v > 0, expect="None or a positive number")
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
        "qkv_bias": Key(bool, False, "biases on the q/k/v projections (Qwen2)"),
        "qk_norm": Key(bool, False, "RMSNorm of each query/key head before RoPE (Qwen3, Gemma 3)"),
        "norm_eps": Key(float, 1e-6, "epsilon of every RMSNorm"),
        "norm_offset": Key(float, 0.0, "RMSNorm multiplies by offset + scale (Gemma: 1.0)"),
        "mlp_activation": Key(
            str,
            "silu",
            "the gated MLP's gate activation (gelu_tanh: GeGLU)",
            choices=tuple(GATE_ACTIVATIONS),
        ),
        "embed_scale": Key(bool, False, "token embeddings times sqrt(width) (Gemma)"),
        "query_pre_attn_scalar": Key(
            _OPTIONAL_FLOAT, None, "scores scaled by its ^-1/2; None: head_dim's", **_POSITIVE
        ),
        "attn_logit_softcap": Key(
            _OPTIONAL_FLOAT, None, "scores -> cap * tanh(scores / cap) (Gemma 2)", **_POSITIVE
        ),
        "final_logit_softcap": Key(
            _OPTIONAL_FLOAT, None, "logits -> cap * tanh(logits / cap) (Gemma 2)", **_POSITIVE
        ),
        "post_norms": Key(bool, False, "RMSNorm of attention/MLP outputs too (Gemma 2/3)"),
        "sliding_window": Key(
            _OPTIONAL_INT, None, "sliding layers see their last N positions", **_POSITIVE
        ),
        "layer_types": Key(
            tuple, (), f"per layer, one of {LAYER_TYPES}; (): all sliding when sliding_window"
        ),
        "rope_scaling": Key(
            (str, type(None)), None, "RoPE frequency scaling", choices=ROPE_SCALINGS
        ),
        "rope_factor": Key(float, 1.0, "RoPE scaling factor (linear, llama3)"),
        "rope_low_freq_factor": Key(float, 1.0, "llama3 RoPE scaling: low_freq_factor"),
        "rope_high_freq_factor": Key(float, 4.0, "llama3 RoPE scaling: high_freq_factor"),
        "rope_original_max_len": Key(
            int, 8192, "llama3 RoPE scaling: original_max_position_embeddings"
        ),
        "rope_local_theta": Key(
            _OPTIONAL_FLOAT, None, "RoPE base of sliding layers, unscaled (Gemma 3); None: same"
        ),
    },
    doc="the decoder LM (model.lm)",
    check=_check_lm,
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
    keys = resolve("model.lm", cfg, LM)
    return DecoderLM(
        **{**keys, "layer_types": tuple(keys["layer_types"])},  # hashable: a static jit arg
        cross_attention_every=cross_attention_every,
        dtype=dtype,
        attention_impl=attention_impl,
        remat=remat,
    )
