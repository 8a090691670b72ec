"""Vision Transformer image tower (big_vision's ViT, with the knobs released CLIP/SigLIP need).

Order of operations (the one released checkpoints use, so converters map one-to-one):
patch embed -> [prepend cls] -> + posemb -> [ln_pre] -> pre-LN blocks -> final LN -> pool -> head.

    images: float[B, H, W, 3] in [-1, 1] -> embeddings float[B, out_dim]
                                         (patch_tokens=True: float[B, N, D], before pooling)
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.layers import (
    Dtype,
    Encoder,
    MAPHead,
    constrain,
    layer_norm,
    logical_dense,
    sincos_2d,
)

# big_vision's standard sizes: name -> (width, depth, mlp_dim, num_heads).
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
}
IMAGE_POOLS = ("cls", "gap", "map")
POSEMBS = ("learn", "sincos2d")
STEMS = ("patch", "conv")


def decode_variant(variant: str) -> dict[str, int]:
    """Variant name -> sizes: "B/16" sets width, depth, mlp_dim, num_heads and patch_size=16;
    a bare "B" leaves the patch size to the config."""
    match = re.fullmatch(r"([A-Za-z0-9]+?)(?:/(\d+))?", variant)
    if match is None or match.group(1) not in VARIANTS:
        raise ValueError(
            f"image variant={variant!r} is not one of: {', '.join(VARIANTS)} "
            "(optionally followed by /PATCH, e.g. B/16)"
        )
    width, depth, mlp_dim, num_heads = VARIANTS[match.group(1)]
    sizes = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
    if match.group(2):
        sizes["patch_size"] = int(match.group(2))
    return sizes


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> width: float[B, H, W, 3] -> float[B, H/p * W/p, D]."""

    width: int
    patch_size: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        x = nn.Conv(
            self.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="conv",
        )(images)  # [B, H/p, W/p, D]
        return x.reshape(x.shape[0], -1, self.width)


def conv_stem_channels(patch_size: int, width: int) -> list[int]:
    """Output channels of ConvStem's stride-2 convs: doubling, the last one `width`."""
    num_convs = patch_size.bit_length() - 1
    if patch_size < 2 or 2**num_convs != patch_size:
        raise ValueError(
            f"image stem='conv' needs a power-of-two patch_size >= 2, got {patch_size}"
        )
    return [max(width // 2 ** (num_convs - 1 - i), 8) for i in range(num_convs)]


class ConvStem(nn.Module):
    """Early convolutions (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"):
    log2(p) stride-2 3x3 convs, channels doubling up to `width`, then a 1x1 conv to `width`.
    Same token grid as a p x p PatchEmbed, but overlapping receptive fields, so a small shape cut
    by a patch border is still seen whole; costs ~20% of a 4-layer width-128 ViT at 16 tokens.

        float[B, H, W, 3] -> float[B, H/p * W/p, D]
    """

    width: int
    patch_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images
        for i, channels in enumerate(conv_stem_channels(self.patch_size, self.width)):
            x = nn.gelu(self._conv(channels, 3, 2, f"conv{i}")(x))  # [B, H/2^(i+1), ., C]
        x = self._conv(self.width, 1, 1, "proj")(x)  # [B, H/p, W/p, D]
        return x.reshape(x.shape[0], -1, self.width)

    def _conv(self, features: int, size: int, stride: int, name: str) -> nn.Conv:
        return nn.Conv(
            features,
            (size, size),
            strides=(stride, stride),
            padding="SAME",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name=name,
        )


def build_stem(stem: str, width: int, patch_size: int, dtype: Dtype, patch_bias: bool = True):
    """The image -> tokens module, under the param name released checkpoints use for it."""
    if stem == "conv":
        return ConvStem(width, patch_size, dtype, name="stem")
    if stem == "patch":
        return PatchEmbed(width, patch_size, patch_bias, dtype, name="embedding")
    raise ValueError(f"image stem={stem!r} is not one of: {', '.join(STEMS)}")


class ViT(nn.Module):
    """ViT with `cls | gap | map` pooling and a linear head to `out_dim` (None: no head), or
    (patch_tokens=True) the encoder's patch tokens."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    out_dim: int | None = None
    posemb: str = "learn"
    pool: str = "map"
    stem: str = "patch"  # "patch": one p x p conv (standard ViT); "conv": ConvStem
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False
    scan: bool = False
    activation: str = "gelu_tanh"
    ln_eps: float = 1e-6
    ln_pre: bool = False
    patch_bias: bool = True
    head_bias: bool = True
    # Per-channel mean/std in [0, 1] units a released tower was trained to see (CLIP:
    # OpenAI's); our inputs are in [-1, 1], so they are mapped to ((x + 1) / 2 - mean) / std.
    # None: the inputs go in as they are (SigLIP's mean = std = 0.5 is the identity).
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None
    # True: return the patch tokens float[B, N, D] after the final LayerNorm (no cls token, no
    # pooling, no head), e.g. for a VLM; param names are unchanged, so a contrastive run's
    # image tower loads as is (its pooling and head params are simply not used).
    patch_tokens: bool = False

    def _normalize(self, images: jax.Array) -> jax.Array:
        """float32[B, H, W, 3] in [-1, 1] -> the tower's input normalisation."""
        if self.input_mean is None and self.input_std is None:
            return images
        mean = jnp.asarray(self.input_mean or (0.5, 0.5, 0.5), jnp.float32)
        std = jnp.asarray(self.input_std or (0.5, 0.5, 0.5), jnp.float32)
        return ((images.astype(jnp.float32) + 1) / 2 - mean) / std

    def _posemb(self, grid: tuple[int, int], num_tokens: int) -> jax.Array:
        """float32[1, num_tokens, D]; with a cls token the fixed sin-cos table gives it zeros."""
        if self.posemb == "learn":
            init = nn.initializers.normal(stddev=1 / self.width**0.5)
            return self.param(
                "posemb",
                nn.with_logical_partitioning(init, (None, None, "embed")),
                (1, num_tokens, self.width),
                jnp.float32,
            )
        table = sincos_2d(*grid, self.width)  # [N, D]
        table = jnp.pad(table, ((num_tokens - table.shape[0], 0), (0, 0)))
        return table[None]

    def _pool(self, x: jax.Array) -> jax.Array:
        """x: float[B, T, D] -> float[B, D]."""
        if self.pool == "cls":
            return x[:, 0]
        if self.pool == "gap":
            return jnp.mean(x, axis=1)
        return MAPHead(
            self.num_heads,
            self.mlp_dim,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            activation=self.activation,
            ln_eps=self.ln_eps,
            name="map",
        )(x)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if self.pool not in IMAGE_POOLS:
            raise ValueError(f"image pool={self.pool!r} is not one of: {', '.join(IMAGE_POOLS)}")
        if self.posemb not in POSEMBS:
            raise ValueError(f"image posemb={self.posemb!r} is not one of: {', '.join(POSEMBS)}")
        _, height, width, _ = images.shape
        grid = (height // self.patch_size, width // self.patch_size)
        stem = build_stem(self.stem, self.width, self.patch_size, self.dtype, self.patch_bias)
        x = stem(self._normalize(images).astype(self.dtype))  # [B, N, D]
        if self.pool == "cls":
            cls = self.param(
                "cls",
                nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")),
                (1, 1, self.width),
                jnp.float32,
            )
            x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), (x.shape[0], 1, 1)), x], 1)
        x = x + self._posemb(grid, x.shape[1]).astype(self.dtype)
        x = nn.Dropout(self.dropout)(x, not train)
        if self.ln_pre:
            x = layer_norm(self.dtype, name="ln_pre", eps=self.ln_eps)(x)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
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
        )(x, deterministic=not train)
        if self.patch_tokens:
            return x[:, x.shape[1] - grid[0] * grid[1] :]  # [B, N, D], without the cls token
        x = self._pool(x)  # [B, D]
        if self.out_dim is None:
            return x
        return logical_dense(
            self.out_dim, ("embed", None), dtype=self.dtype, use_bias=self.head_bias, name="head"
        )(x)
