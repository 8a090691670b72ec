"""The attention dispatcher: one entry point, several implementations.

    out = attention(q, k, v, mask, impl="auto")
    q: float[B, Tq, H, D]; k, v: float[B, Tk, Hkv, D] with H % Hkv == 0 (GQA) -> float[B, Tq, H, D]

`impl` is a name from ATTENTION_IMPLS ("xla", "cudnn", "pallas") or "auto", which picks,
per call, the fastest implementation measured for this device kind, mask kind, head dim,
dtype and (nearest) sequence length among those whose `SUPPORTS` predicate accepts the call
(see autotune.py); unmeasured devices and shapes get Pallas on GPU/TPU, and CPU always gets
XLA. The device is the one being compiled for: the mesh in scope (`jax.set_mesh`), else jax's
default backend (`autotune.target_device`), so a step compiled for a TPU topology on a CPU
host picks, and lowers, what the TPU would. Every implementation accepts the same
`AttentionMask` and returns zeros for query rows that see no key.

`with record_impls() as names:` collects the implementation each call traced inside the block
dispatched to (vlm_jax.compile reports which attention a compiled step holds).

Two options only some implementations have (Gemma's): a sliding `mask.window` (xla and cudnn,
which read the dense mask) and `logit_softcap` (cap * tanh(scores / cap) before the mask; xla).
"auto" then picks among those; an explicit implementation without them fails, naming them.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from vlm_jax.kernels import autotune
from vlm_jax.kernels.autotune import AttentionCall
from vlm_jax.kernels.mask import AttentionMask
from vlm_jax.registry import Registry

ATTENTION_IMPLS = Registry("attention_impl")
_RECORDERS: list[list[str]] = []  # open record_impls() blocks


@contextlib.contextmanager
def record_impls() -> Iterator[list[str]]:
    """A list that receives the implementation name of every attention call traced inside the
    block, once per call site traced (a layer scanned or rematerialised is traced once)."""
    names: list[str] = []
    _RECORDERS.append(names)
    try:
        yield names
    finally:
        _RECORDERS.remove(names)


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
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: AttentionMask | None,
    scale: float,
    logit_softcap: float | None = None,
) -> jax.Array:
    """Reference implementation in plain jnp; softmax in float32."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    qg = q.reshape(batch, q_len, kv_heads, group, head_dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    logits = logits * scale
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
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
    platform = autotune.target_device().platform
    if platform != "gpu":
        raise ValueError(
            f"attention impl='cudnn' needs a GPU, the target platform is {platform!r}; "
            f"valid here: {', '.join(n for n in ATTENTION_IMPLS.names() if n != 'cudnn')}"
        )
    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]
    plain_causal = (
        mask is not None
        and mask.causal
        and mask.prefix_lengths is None
        and mask.kv_prefix is None
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


# Hopper and later: cuDNN's flash attention takes head dims up to 256 there, 128 before.
HOPPER_OR_LATER = re.compile(r"\b(G?H\d{2,3}|G?B\d{3})\b")


def cudnn_supports(call: AttentionCall) -> bool:
    """Where cuDNN runs fused, forward and backward: GPU, bf16/fp16, no dense mask.

    Only no mask and plain causal (square) reach cuDNN's fused kernel; every other mask is
    passed as a dense bool[B, 1, Tq, Tk] (quadratic memory, slower than ours on the H100 for
    prefix-LM). Lengths must be multiples of 64: its backward rejects T=197/577 (ViT).
    """
    max_dim = 256 if HOPPER_OR_LATER.search(call.device_kind) else 128
    return (
        call.backend == "gpu"
        and call.dtype in ("bfloat16", "float16")
        and call.head_dim % 8 == 0
        and call.head_dim <= max_dim
        and call.q_len % 64 == 0
        and call.kv_len % 64 == 0
        and (call.mask == "none" or (call.mask == "causal" and call.q_len == call.kv_len))
    )


# Which calls each implementation can run; one without an entry runs everywhere.
SUPPORTS: dict[str, Callable[[AttentionCall], bool]] = {
    "cudnn": cudnn_supports,
    "pallas": lambda call: call.backend in ("cpu", "gpu", "tpu"),  # interpreted on CPU
}


# The options of `attention` beyond the mask rule, and the implementations that have them.
OPTION_IMPLS = {"window": ("xla", "cudnn"), "logit_softcap": ("xla",)}


def _options(mask: AttentionMask | None, logit_softcap: float | None) -> list[str]:
    """The names in OPTION_IMPLS that this call uses."""
    used = {"window": mask is not None and mask.window is not None}
    used["logit_softcap"] = logit_softcap is not None
    return [name for name, on in used.items() if on]


def _impl_with(impl: str, options: list[str], call: AttentionCall | None) -> str:
    """`impl` resolved among the implementations that have every option in `options`."""
    able = [n for n in ATTENTION_IMPLS.names() if all(n in OPTION_IMPLS[o] for o in options)]
    if impl == "auto":
        chosen = resolve_impl(impl, call)
        return chosen if chosen in able else "xla"
    if impl not in able:
        ATTENTION_IMPLS.get(impl)  # raises naming the valid choices
        raise ValueError(
            f"attention impl={impl!r} does not support {' and '.join(options)}; "
            f"implementations that do: {', '.join(able)} (or 'auto')"
        )
    return impl


def supported_impls(call: AttentionCall) -> list[str]:
    """Registered implementations whose SUPPORTS predicate accepts the call."""
    return [n for n in ATTENTION_IMPLS.names() if SUPPORTS.get(n, lambda _: True)(call)]


def describe_call(q: jax.Array, k: jax.Array, mask: AttentionMask | None) -> AttentionCall:
    """The static key of one call: target platform and device kind (the mesh's devices, see
    `autotune.target_device`), mask kind, shapes."""
    target = autotune.target_device()
    return AttentionCall(
        backend=target.platform,
        device_kind=target.device_kind,
        mask=autotune.mask_kind(mask),
        q_len=q.shape[1],
        kv_len=k.shape[1],
        head_dim=q.shape[-1],
        dtype=jnp.dtype(q.dtype).name,
    )


def resolve_impl(impl: str, call: AttentionCall | None = None) -> str:
    """Turn "auto" into a concrete implementation name: measured choice for `call`, else
    the fallback rule (Pallas on GPU/TPU when registered, XLA on CPU)."""
    if impl != "auto":
        ATTENTION_IMPLS.get(impl)  # raises naming the valid choices
        return impl
    if call is None:
        platform = autotune.target_device().platform
        return autotune.fallback_impl(platform, ATTENTION_IMPLS.names())
    return autotune.choose_impl(call, supported_impls(call))


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: AttentionMask | None = None,
    *,
    impl: str = "auto",
    scale: float | None = None,
    logit_softcap: float | None = None,
) -> jax.Array:
    """Scaled dot-product attention through the implementation named by `impl`
    (`logit_softcap`: scores -> cap * tanh(scores / cap), Gemma 2's attention soft-capping)."""
    _check_shapes(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    call = describe_call(q, k, mask) if impl == "auto" else None
    options = _options(mask, logit_softcap)
    name = _impl_with(impl, options, call) if options else resolve_impl(impl, call)
    for names in _RECORDERS:
        names.append(name)
    extra = {} if logit_softcap is None else {"logit_softcap": logit_softcap}
    return ATTENTION_IMPLS.get(name)(q, k, v, mask, scale, **extra)
