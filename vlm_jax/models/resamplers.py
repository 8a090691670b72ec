"""Resamplers: a fixed number of learned queries read the image, whatever its patch count.

`perceiver` (Flamingo): latents cross-attend to [patches; latents], then an MLP, N layers.
`qformer` (BLIP-2 / InstructBLIP): queries self-attend (jointly with the instruction
text when `text_conditioned`), cross-attend to the patches, then an MLP, N layers.
Both return float[B, num_tokens, out_dim]: the visual-token budget is `num_tokens`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.kernels import AttentionMask
from vlm_jax.models.layers import Dtype, MlpBlock, MultiHeadAttention, layer_norm, logical_dense
from vlm_jax.models.projectors import CONNECTORS
from vlm_jax.schema import Key, Schema, positive


def _learned_queries(module: nn.Module, num_tokens: int, width: int, batch: int, dtype: Dtype):
    """The learned query bank, tiled over the batch: float[B, M, W]."""
    queries = module.param(
        "queries",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
        (num_tokens, width),
        jnp.float32,
    )
    return jnp.broadcast_to(queries.astype(dtype), (batch, num_tokens, width))


class PerceiverLayer(nn.Module):
    """latents += Attn(LN(latents), [LN(media); LN(latents)]); latents += MLP(LN(latents))."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, latents: jax.Array, media: jax.Array) -> jax.Array:
        # latents: float[B, M, W]; media: float[B, N, W]
        normed = layer_norm(self.dtype, name="ln_latents")(latents)
        context = jnp.concatenate([layer_norm(self.dtype, name="ln_media")(media), normed], 1)
        latents = latents + MultiHeadAttention(
            self.num_heads, dtype=self.dtype, attention_impl=self.attention_impl, name="attn"
        )(normed, context)
        h = layer_norm(self.dtype, name="ln_mlp")(latents)
        return latents + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(h)


class PerceiverResampler(nn.Module):
    """Flamingo's perceiver resampler: float[B, N, Dv] -> float[B, num_tokens, out_dim]."""

    out_dim: int
    num_tokens: int = 64
    depth: int = 2
    width: int | None = None
    num_heads: int = 4
    mlp_dim: int | None = None
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def output_tokens(self, num_patches: int) -> int:
        return self.num_tokens

    @nn.compact
    def __call__(self, image_features: jax.Array, **unused_text) -> jax.Array:
        width = self.width or self.out_dim
        media = logical_dense(width, (None, "embed"), dtype=self.dtype, name="in_proj")(
            image_features
        )
        latents = _learned_queries(self, self.num_tokens, width, media.shape[0], self.dtype)
        for i in range(self.depth):
            latents = PerceiverLayer(
                self.num_heads,
                self.mlp_dim or 4 * width,
                dtype=self.dtype,
                attention_impl=self.attention_impl,
                name=f"layer_{i}",
            )(latents, media)
        latents = layer_norm(self.dtype, name="ln_out")(latents)
        return logical_dense(self.out_dim, (None, "embed"), dtype=self.dtype, name="out_proj")(
            latents
        )


class QFormerLayer(nn.Module):
    """Self-attention over [queries; text], cross-attention queries -> image, MLPs.

    The instruction text shares the self-attention with the queries (InstructBLIP) and
    has its own MLP; only the queries read the image. queries: float[B, M, W];
    text: float[B, Lt, W] or None; image: float[B, N, W].
    """

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def _mlp(self, x: jax.Array, name: str) -> jax.Array:
        h = layer_norm(self.dtype, name=f"ln_{name}")(x)
        return x + MlpBlock(self.mlp_dim, dtype=self.dtype, name=name)(h)

    @nn.compact
    def __call__(self, queries, image, text=None, text_valid=None):
        num_queries = queries.shape[1]
        attn = lambda name: MultiHeadAttention(
            self.num_heads, dtype=self.dtype, attention_impl=self.attention_impl, name=name
        )
        joint = queries if text is None else jnp.concatenate([queries, text], axis=1)
        mask = None
        if text_valid is not None:
            query_valid = jnp.ones(queries.shape[:2], bool)
            mask = AttentionMask(kv_valid=jnp.concatenate([query_valid, text_valid], axis=1))
        normed = layer_norm(self.dtype, name="ln_self")(joint)
        joint = joint + attn("self_attn")(normed, mask=mask)
        queries, text = joint[:, :num_queries], joint[:, num_queries:]
        normed = layer_norm(self.dtype, name="ln_cross")(queries)
        queries = queries + attn("cross_attn")(normed, layer_norm(self.dtype, name="ln_img")(image))
        queries = self._mlp(queries, "mlp")
        if text is not None and text.shape[1]:
            text = self._mlp(text, "text_mlp")
        return queries, text


class QFormer(nn.Module):
    """BLIP-2's querying transformer: float[B, N, Dv] -> float[B, num_tokens, out_dim].

    With `text_conditioned`, `text_embeds: float[B, Lt, Dt]` (the instruction; never the
    answer) and `text_valid: bool[B, Lt]` steer which image content the queries extract.
    """

    out_dim: int
    num_tokens: int = 32
    depth: int = 2
    width: int | None = None
    num_heads: int = 4
    mlp_dim: int | None = None
    text_conditioned: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def output_tokens(self, num_patches: int) -> int:
        return self.num_tokens

    @nn.compact
    def __call__(self, image_features, text_embeds=None, text_valid=None) -> jax.Array:
        width = self.width or self.out_dim
        image = logical_dense(width, (None, "embed"), dtype=self.dtype, name="in_proj")(
            image_features
        )
        queries = _learned_queries(self, self.num_tokens, width, image.shape[0], self.dtype)
        text = None
        if self.text_conditioned:
            if text_embeds is None:
                raise ValueError("qformer with text_conditioned=True needs text_embeds")
            text = logical_dense(width, (None, "embed"), dtype=self.dtype, name="text_proj")(
                text_embeds
            )
        else:
            text_valid = None
        for i in range(self.depth):
            queries, text = QFormerLayer(
                self.num_heads,
                self.mlp_dim or 4 * width,
                dtype=self.dtype,
                attention_impl=self.attention_impl,
                name=f"layer_{i}",
            )(queries, image, text, text_valid)
        queries = layer_norm(self.dtype, name="ln_out")(queries)
        return logical_dense(self.out_dim, (None, "embed"), dtype=self.dtype, name="out_proj")(
            queries
        )


_OPTIONAL_INT = (int, type(None))
RESAMPLER = Schema(
    {
        "num_tokens": Key(
            int,
            32,
            "the visual-token budget (learned queries)",
            valid=positive,
            expect="a positive int",
        ),
        "depth": Key(int, 2, "layers"),
        "width": Key(_OPTIONAL_INT, None, "query width; None: the LM's width"),
        "num_heads": Key(int, 4, "attention heads (must divide width)"),
        "mlp_dim": Key(_OPTIONAL_INT, None, "MLP width; None: 4 * width"),
    }
)
QFORMER = RESAMPLER | Schema(
    {"text_conditioned": Key(bool, False, "the queries also read the instruction (InstructBLIP)")}
)


def _resampler_kwargs(cfg: ml_collections.ConfigDict) -> dict:
    return {key: cfg[key] for key in RESAMPLER.keys}


@CONNECTORS.register("perceiver", schema=RESAMPLER)
def _perceiver(cfg: ml_collections.ConfigDict, out_dim: int, dtype: Dtype, attention_impl: str):
    return PerceiverResampler(
        out_dim, **_resampler_kwargs(cfg), dtype=dtype, attention_impl=attention_impl
    )


@CONNECTORS.register("qformer", schema=QFORMER)
def _qformer(cfg: ml_collections.ConfigDict, out_dim: int, dtype: Dtype, attention_impl: str):
    return QFormer(
        out_dim,
        **_resampler_kwargs(cfg),
        text_conditioned=cfg.text_conditioned,
        dtype=dtype,
        attention_impl=attention_impl,
    )
