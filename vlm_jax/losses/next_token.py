"""Next-token cross-entropy of a causal LM: the loss of the "vlm" and "lm" tasks.

Weights mark which tokens are targets (the answer tokens of a VQA example, every non-pad token
of a caption), so one function serves both; sums add up across evaluation batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_sums(
    logits: jax.Array, tokens: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(summed cross-entropy, correct argmax predictions, target count) of tokens[:, 1:] under
    logits[:, :-1], over tokens with weight 1: float32 scalars that add up across batches.

    logits: float32[B, L, V]; tokens, weights: int[B, L] (weights mark target tokens).
    """
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    targets, w = tokens[:, 1:], weights[:, 1:].astype(jnp.float32)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(log_probs, -1) == targets) * w
    return (nll * w).sum(), correct.sum(), w.sum()


def next_token_loss(
    logits: jax.Array, tokens: jax.Array, weights: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy and token accuracy of `next_token_sums` (same shapes)."""
    nll, correct, count = next_token_sums(logits, tokens, weights)
    count = jnp.maximum(count, 1.0)
    return nll / count, {"token_acc": correct / count}
