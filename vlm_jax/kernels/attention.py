"""The attention dispatcher: one entry point, several implementations.

    out = attention(q, k, v, mask, impl="auto")
    q: float[B, Tq, H, D]; k, v: float[B, Tk, Hkv, D] with H % Hkv == 0 (GQA) -> float[B, Tq, H, D]

`impl` is a name from ATTENTION_IMPLS ("xla", "cudnn", "pallas") or "auto", which picks
Pallas on GPU/TPU (when registered) and XLA on CPU. Every implementation accepts the same
`AttentionMask` and returns zeros for query rows that see no key.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vlm_jax.kernels.mask import AttentionMask
from vlm_jax.registry import Registry

ATTENTION_IMPLS = Registry("attention_impl")


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(
            f"attention expects q[B,Tq,H,D], k/v[B,Tk,Hkv,D]; got q{q.shape} k{k.shape} v{v.shape}"
        )
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"attention: batch and head_dim must match and heads ({q.shape[2]}) must be a "
            f"multiple of kv heads ({k.shape[2]}); got q{q.shape} k{k.shape}"
        )


@ATTENTION_IMPLS.register("xla")
def xla_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None, scale: float
) -> jax.Array:
    """Reference implementation in plain jnp; softmax in float32."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    qg = q.reshape(batch, q_len, kv_heads, group, head_dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    logits = logits * scale
    if mask is not None and not mask.is_full:
        visible = mask.dense(batch, q_len, kv_len)[:, :, None]  # bool[B, 1, 1, Tq, Tk]
        logits = jnp.where(visible, logits, -jnp.inf)
        row_max = jnp.max(logits, axis=-1, keepdims=True)
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        weights = jnp.exp(logits - row_max)
        denom = jnp.sum(weights, axis=-1, keepdims=True)
        probs = weights / jnp.where(denom > 0, denom, 1.0)
    else:
        probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v)
    return out.reshape(batch, q_len, heads, head_dim)


@ATTENTION_IMPLS.register("cudnn")
def cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None, scale: float
) -> jax.Array:
    """cuDNN fused attention through jax.nn.dot_product_attention (GPU only)."""
    if jax.default_backend() != "gpu":
        raise ValueError(
            f"attention impl='cudnn' needs a GPU, the backend is {jax.default_backend()!r}; "
            f"valid here: {', '.join(n for n in ATTENTION_IMPLS.names() if n != 'cudnn')}"
        )
    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]
    plain_causal = (
        mask is not None
        and mask.causal
        and mask.prefix_lengths is None
        and mask.q_segment_ids is None
        and mask.kv_valid is None
        and mask.q_positions is None
        and mask.kv_positions is None
    )
    dense = None
    if mask is not None and not mask.is_full and not plain_causal:
        dense = mask.dense(batch, q_len, kv_len)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=dense, scale=scale, is_causal=plain_causal, implementation="cudnn"
    )
    if dense is not None:  # rows with no visible key -> 0, as the other impls
        any_visible = jnp.any(dense[:, 0], axis=-1)  # bool[B, Tq]
        out = jnp.where(any_visible[:, :, None, None], out, 0)
    return out


def resolve_impl(impl: str) -> str:
    """Turn "auto" into a concrete implementation name for the current backend."""
    if impl == "auto":
        backend = jax.default_backend()
        return "pallas" if backend in ("gpu", "tpu") and "pallas" in ATTENTION_IMPLS else "xla"
    ATTENTION_IMPLS.get(impl)  # raises naming the valid choices
    return impl


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: AttentionMask | None = None,
    *,
    impl: str = "auto",
    scale: float | None = None,
) -> jax.Array:
    """Scaled dot-product attention through the implementation named by `impl`."""
    _check_shapes(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return ATTENTION_IMPLS.get(resolve_impl(impl))(q, k, v, mask, scale)
