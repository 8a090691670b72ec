"""Gradient cache: a contrastive batch far larger than activation memory, same gradient.

The contrastive loss couples every example with every other, so the batch cannot simply be
split into micro-batches with summed gradients. It only couples them through the embeddings,
though, which are small. So (Gao et al., "Scaling deep contrastive learning batch size under
memory limited setup", 2021):

  1. embed the batch chunk by chunk without keeping activations (no autodiff);
  2. compute the loss on all the embeddings and its gradient w.r.t. them;
  3. re-run each chunk's forward pass under `jax.vjp` and pull those embedding gradients back
     to the parameters, summing over chunks.

Peak activation memory is one chunk's; the result equals `jax.value_and_grad` of the plain
step (up to float rounding) when the forward pass is deterministic. With dropout each chunk
gets its own key (`fold_in(rngs, chunk)`), the same key in steps 1 and 3, so the gradient is
exact for the masks drawn, which differ from those of the unchunked batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
ApplyFn = Callable[[Any, Array, Array, Any], dict[str, Array]]
LossFn = Callable[[Array, Array, Array, Array], Array]
OUTPUTS = ("image_emb", "text_emb", "logit_scale", "logit_bias")


def _split(x: Array, num_chunks: int) -> Array:
    """[B, ...] -> [num_chunks, B / num_chunks, ...], chunk k holding rows k, k+K, k+2K, ...

    Strided rather than contiguous chunks: with the batch sharded over devices in contiguous
    blocks, every chunk is then spread over all devices instead of living on a few of them.
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // num_chunks, num_chunks, *x.shape[1:]), 0, 1)


def _merge(x: Array) -> Array:
    """Inverse of `_split`: [K, B / K, ...] -> [B, ...] in the original order."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def _chunk_rngs(rngs: Any, num_chunks: int) -> Any:
    """One key per chunk, or None for a deterministic forward."""
    if rngs is None:
        return None
    return jax.vmap(lambda k: jax.random.fold_in(rngs, k))(jnp.arange(num_chunks))


def gradcache_value_and_grad(
    apply_fn: ApplyFn,
    loss_fn: LossFn,
    params: Any,
    batch: dict[str, Array],
    *,
    num_chunks: int,
    rngs: Any = None,
) -> tuple[tuple[Array, dict[str, Array]], Any]:
    """((loss, metrics), d loss / d params) of `loss_fn(**apply_fn(params, images, tokens,
    rngs))`, as `jax.value_and_grad(..., has_aux=True)` returns them; metrics are the
    logit_scale and logit_bias the loss used (logged like the plain step's).

    batch: {"image": float32[B, H, W, 3], "tokens": int32[B, L], ...}; B % num_chunks == 0.
    apply_fn(params, images, tokens, rngs) -> {"image_emb": [b, E], "text_emb": [b, E],
    "logit_scale": [], "logit_bias": []} (the two-tower output contract).
    """
    images, tokens = batch["image"], batch["tokens"]
    if num_chunks < 1 or images.shape[0] % num_chunks:
        raise ValueError(
            f"num_chunks={num_chunks} must be a positive divisor of the batch size "
            f"{images.shape[0]}"
        )
    chunks = (_split(images, num_chunks), _split(tokens, num_chunks))
    chunk_rngs = _chunk_rngs(rngs, num_chunks)

    def embed(p, chunk) -> tuple[Array, ...]:
        out = apply_fn(p, *chunk)
        return tuple(out[k] for k in OUTPUTS)

    # 1. Embeddings of every chunk, no activations kept. image_emb, text_emb: [K, b, E].
    outputs = jax.lax.map(lambda chunk: embed(params, chunk), (*chunks, chunk_rngs))
    image_emb, text_emb = _merge(outputs[0]), _merge(outputs[1])
    # Scale and bias depend on the parameters only: equal in every chunk.
    logit_scale, logit_bias = outputs[2][0], outputs[3][0]

    # 2. The loss and its gradient w.r.t. the embeddings, scale and bias.
    loss, emb_grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3))(
        image_emb, text_emb, logit_scale, logit_bias
    )
    d_image, d_text = _split(emb_grads[0], num_chunks), _split(emb_grads[1], num_chunks)
    # Each chunk's copy of scale/bias carries an equal share of their gradient.
    d_scale = jnp.full((num_chunks,), emb_grads[2] / num_chunks)
    d_bias = jnp.full((num_chunks,), emb_grads[3] / num_chunks)

    # 3. Re-run each chunk with its embedding gradients; sum the parameter gradients.
    def accumulate(grads, chunk):
        inputs, cotangent = chunk
        _, pullback = jax.vjp(lambda p: embed(p, inputs), params)
        (chunk_grads,) = pullback(cotangent)
        return jax.tree.map(jnp.add, grads, chunk_grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    cotangents = (d_image, d_text, d_scale, d_bias)
    grads, _ = jax.lax.scan(accumulate, zeros, ((*chunks, chunk_rngs), cotangents))
    return (loss, {"logit_scale": logit_scale, "logit_bias": logit_bias}), grads
