"""One mask description shared by every attention implementation.

A key at position `kp` is visible to a query at position `qp` when all of these hold:

* causal:        `kp <= qp`, or `kp < prefix_length` (prefix-LM: the prefix is
                 bidirectional, the rest causal), or `kv_prefix[kp]` (a packed row's
                 per-conversation prefixes: with segments, each prefix is seen by every
                 query of its own conversation). Without `causal` every key is visible.
* segments:      `q_segment_ids[qp] == kv_segment_ids[kp]` (packed sequences).
* key padding:   `kv_valid[kp]`.
* window:        `qp - kp < window` (sliding-window attention: each query sees its last
                 `window` positions, itself included; needs `causal`).

Positions default to `arange(Tq)` / `arange(Tk)`; pass explicit positions for decoding
with a KV cache (queries sit at the end of the cached keys). This single rule yields
full, causal, prefix-LM and packed masks (PaliGemma-style: one rule, not three cases).
Rows with no visible key produce zeros in every implementation, never NaN.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class AttentionMask:
    causal: bool = flax.struct.field(pytree_node=False, default=False)
    prefix_lengths: jax.Array | None = None  # int32[B]
    kv_prefix: jax.Array | None = None  # bool[B, Tk]: prefix keys (packed prefix-LM)
    q_segment_ids: jax.Array | None = None  # int32[B, Tq]
    kv_segment_ids: jax.Array | None = None  # int32[B, Tk]
    kv_valid: jax.Array | None = None  # bool[B, Tk]
    q_positions: jax.Array | None = None  # int32[B, Tq]
    kv_positions: jax.Array | None = None  # int32[B, Tk]
    window: int | None = flax.struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        if (self.prefix_lengths is not None or self.kv_prefix is not None) and not self.causal:
            raise ValueError(
                "AttentionMask: prefix_lengths and kv_prefix need causal=True (prefix-LM)"
            )
        if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
            raise ValueError("AttentionMask: give both q_segment_ids and kv_segment_ids or neither")
        if self.window is not None and (not self.causal or self.window < 1):
            raise ValueError(
                f"AttentionMask: window={self.window} needs causal=True and a positive window"
            )

    @property
    def is_full(self) -> bool:
        """True when every key is visible to every query (no mask at all)."""
        return not self.causal and self.q_segment_ids is None and self.kv_valid is None

    def positions(self, batch: int, q_len: int, kv_len: int) -> tuple[jax.Array, jax.Array]:
        """Query and key positions: int32[B, Tq], int32[B, Tk]."""
        qp = self.q_positions
        kp = self.kv_positions
        if qp is None:
            qp = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))
        if kp is None:
            kp = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))
        return qp, kp

    def dense(self, batch: int, q_len: int, kv_len: int) -> jax.Array:
        """The mask as bool[B, 1, Tq, Tk] (True = attend)."""
        visible = jnp.ones((batch, q_len, kv_len), dtype=bool)
        if self.causal:
            qp, kp = self.positions(batch, q_len, kv_len)
            visible = kp[:, None, :] <= qp[:, :, None]
            if self.prefix_lengths is not None:
                prefix = jnp.asarray(self.prefix_lengths, jnp.int32)
                visible = visible | (kp[:, None, :] < prefix[:, None, None])
            if self.kv_prefix is not None:
                visible = visible | self.kv_prefix[:, None, :].astype(bool)
            if self.window is not None:
                visible = visible & (qp[:, :, None] - kp[:, None, :] < self.window)
        if self.q_segment_ids is not None:
            same = self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :]
            visible = visible & same
        if self.kv_valid is not None:
            visible = visible & self.kv_valid[:, None, :].astype(bool)
        return visible[:, None, :, :]
