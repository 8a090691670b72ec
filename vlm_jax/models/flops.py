"""Analytic matmul FLOPs of the two-tower model and the decoder LM (and the VLM's towers),
for MFU.

A matmul of [m, k] x [k, n] costs 2*m*n*k FLOPs. Per example, with width D, MLP width M,
sequence length T and embedding dim E:

  transformer block:  qkv 2*T*D*3D + QK^T 2*T*T*D + AV 2*T*T*D + out 2*T*D*D + MLP 2*T*D*M*2
                      (= 24*T*D^2 + 4*T^2*D when M = 4D)
  MAP head (1 probe): q 2*D*D + kv 2*T*D*2D + QK^T/AV 2*2*T*D + out 2*D*D + MLP 2*D*M*2
  image patch embed:  2*N*(p*p*3)*D over N = (image_size/p)^2 patches (T = N, +1 with cls)
  image conv stem:    per 3x3 stride-2 conv i, 2*(image_size/2^i)^2*(9*C_in)*C_out, then
                      the 1x1 projection 2*N*C*D (channels as in vit.ConvStem)
  heads:              2*D*E per tower (none with `head=False`)
  text embedding:     0 (a gather, not a matmul)

Causal text attention is counted in full (T*T): the XLA and cuDNN paths compute the whole
score matrix. Not counted: LayerNorm, softmax, activations, residual adds, L2 normalisation
(elementwise, a few % at small widths and less at scale) and the loss, whose B x B logits
depend on the global batch. Training FLOPs = 3 x forward (the backward pass is two matmuls
per forward matmul), except for a tower whose params are all frozen (optim.freeze): its
backward pass is never built (`Task.stop_frozen`), so it costs 1 x forward. A partly frozen
tower is counted at 3 x (an upper bound).

The text tower runs over the tokenizer's length, which may be shorter than the tower's
position table (`model.text.max_len`): pass it as `text_len`.

Decoder LM (model.lm; H query heads, Hkv key/value heads of width d, gated MLP width M,
vocabulary V), T new tokens attending to S keys (S = T without a KV cache, else the cache's
length, all of whose slots are computed):

  decoder block:      q, out 2*T*D*H*d*2 + k, v 2*T*D*Hkv*d*2 + QK^T/AV 2*2*T*S*H*d
                      + SwiGLU 2*T*D*M*3
  unembedding:        2*T*D*V
  vision tower (VLM): the image tower's patch embedding and blocks (patch tokens: no pooling,
                      no head)

Not counted there: the VLM's connector and the gated cross-attention blocks.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import ml_collections

from vlm_jax.models.two_tower import image_settings, text_settings
from vlm_jax.models.vit import conv_stem_channels


def block_flops(tokens: int, width: int, mlp_dim: int) -> float:
    """One pre-LN transformer block over `tokens` tokens."""
    projections = 2 * tokens * width * (3 * width + width)  # q, k, v, out
    attention = 2 * 2 * tokens * tokens * width  # QK^T and AV
    mlp = 2 * 2 * tokens * width * mlp_dim
    return float(projections + attention + mlp)


def map_head_flops(tokens: int, width: int, mlp_dim: int) -> float:
    """Attention pooling with one learned probe over `tokens` tokens."""
    projections = 2 * width * width * 2 + 2 * tokens * width * 2 * width  # q, out; k, v
    attention = 2 * 2 * tokens * width
    mlp = 2 * 2 * width * mlp_dim
    return float(projections + attention + mlp)


def encoder_flops(tokens: int, settings: dict, pool: str, embed_dim: int) -> float:
    """Blocks, pooling and the head of one tower."""
    width, mlp_dim = settings["width"], settings["mlp_dim"]
    flops = settings["depth"] * block_flops(tokens, width, mlp_dim)
    if pool == "map":
        flops += map_head_flops(tokens, width, mlp_dim)
    return flops + (2.0 * width * embed_dim if settings["head"] else 0.0)


def conv_stem_flops(image_size: int, patch_size: int, width: int) -> float:
    """vit.ConvStem: stride-2 3x3 convs with doubling channels, then a 1x1 conv to `width`."""
    flops, size, channels_in = 0.0, image_size, 3
    for channels in conv_stem_channels(patch_size, width):
        size //= 2
        flops += 2.0 * size * size * 9 * channels_in * channels
        channels_in = channels
    return flops + 2.0 * size * size * channels_in * width


def _patch_embed_flops(s: dict) -> tuple[float, int]:
    """(FLOPs of the patch embedding or conv stem, number of patches) of model.image `s`."""
    patches = (s["image_size"] // s["patch_size"]) ** 2
    if s["stem"] == "conv":
        return conv_stem_flops(s["image_size"], s["patch_size"], s["width"]), patches
    return 2.0 * patches * s["patch_size"] ** 2 * 3 * s["width"], patches


def image_flops(model_config: ml_collections.ConfigDict) -> float:
    s = image_settings(model_config)
    embed, patches = _patch_embed_flops(s)
    tokens = patches + (s["pool"] == "cls")
    return embed + encoder_flops(tokens, s, s["pool"], model_config.embed_dim)


def vision_flops(model_config: ml_collections.ConfigDict) -> float:
    """The VLM's vision tower over one image: patch embedding and blocks (patch tokens)."""
    s = image_settings(model_config)
    embed, patches = _patch_embed_flops(s)
    tokens = patches + (s["pool"] == "cls")
    return embed + s["depth"] * block_flops(tokens, s["width"], s["mlp_dim"])


def decoder_flops(lm: Mapping[str, Any], tokens: int, context: int | None = None) -> float:
    """The decoder LM (model.lm, resolved) over `tokens` new tokens attending to `context`
    keys (default `tokens`: no cache), unembedding included."""
    width, heads, vocab = lm["width"], lm["num_heads"], lm["vocab_size"]
    head_dim = lm["head_dim"] or width // heads
    kv_heads = lm["num_kv_heads"] or heads
    mlp_dim = lm["mlp_dim"] or 4 * width
    context = tokens if context is None else context
    projections = 2 * tokens * width * head_dim * 2 * (heads + kv_heads)
    attention = 2 * 2 * tokens * context * heads * head_dim
    mlp = 2 * tokens * width * mlp_dim * 3
    return float(lm["depth"] * (projections + attention + mlp) + 2 * tokens * width * vocab)


def text_flops(model_config: ml_collections.ConfigDict, text_len: int | None = None) -> float:
    s = text_settings(model_config)
    return encoder_flops(text_len or s["max_len"], s, s["pool"], model_config.embed_dim)


def forward_flops_per_example(
    model_config: ml_collections.ConfigDict, text_len: int | None = None
) -> float:
    """Forward matmul FLOPs of one (image, text) pair through the two-tower model."""
    return image_flops(model_config) + text_flops(model_config, text_len)


def train_flops_per_example(
    model_config: ml_collections.ConfigDict,
    frozen_towers: Collection[str] = (),
    text_len: int | None = None,
) -> float:
    """Forward + backward FLOPs of one pair; `frozen_towers` ("img", "txt") run forward only."""
    image = image_flops(model_config) * (1.0 if "img" in frozen_towers else 3.0)
    text = text_flops(model_config, text_len) * (1.0 if "txt" in frozen_towers else 3.0)
    return image + text
