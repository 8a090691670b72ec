"""The two-tower contrastive model (CLIP / SigLIP), registered as "two_tower".

Params: `img/...` (ViT), `txt/...` (text transformer), `t` (log temperature, scalar) and `b`
(logit bias, scalar; absent when `bias_init` is None), so path regexes like "img/.*" select a
tower. logit_scale = min(exp(t), max_logit_scale):
  SigLIP: temperature_init=10 (t = log 10), bias_init=-10.
  CLIP:   temperature_init=1/0.07 (t = log(1/0.07)), bias_init=None (logit_bias == 0).
With learn_temperature=False neither `t` nor `b` is a param: both are constants at their init.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.kernels import ATTENTION_IMPLS
from vlm_jax.models import MODEL, MODELS
from vlm_jax.models.layers import ACTIVATIONS, COMPUTE_DTYPES, check_heads, compute_dtype
from vlm_jax.models.text import TEXT_POOLS, TextTransformer
from vlm_jax.models.vit import (
    IMAGE_POOLS,
    POSEMBS,
    STEMS,
    ViT,
    conv_stem_channels,
    decode_variant,
)
from vlm_jax.schema import REQUIRED, Key, Schema, resolve, resolve_keys


def _sizes(doc: str, types: type | tuple[type, ...] = int) -> Key:
    return Key(types, REQUIRED, doc)


def _tower_keys(pools: Sequence[str], pool: str, sizes=int) -> dict[str, Key]:
    """Keys both towers have (the sizes, the pooling, the norms and activations, the head)."""
    return dict(
        width=_sizes("model width", sizes),
        depth=_sizes("number of blocks", sizes),
        num_heads=_sizes("attention heads (must divide width)", sizes),
        mlp_dim=_sizes("hidden width of the MLP blocks", sizes),
        pool=Key(str, pool, "how the tokens become one embedding", choices=pools),
        dropout=Key(float, 0.0, "dropout rate"),
        activation=Key(str, "gelu_tanh", "MLP activation", choices=lambda: tuple(ACTIVATIONS)),
        ln_eps=Key(float, 1e-6, "layer-norm epsilon"),
        head_bias=Key(bool, True, "a bias in the projection head"),
        head=Key(bool, True, "False: no projection, the pooled features are the embedding"),
    )


def _check_image(path: str, s: dict) -> None:
    unset = [key for key in VARIANT_SIZES if s[key] is None]
    if unset:
        raise ValueError(f"{path}.{unset[0]}=None: set it, or a {path}.variant that sets it")
    check_heads(path, s["width"], s["num_heads"])
    if s["stem"] == "conv":
        conv_stem_channels(s["patch_size"], s["width"])  # raises if it can't
    if s["image_size"] % s["patch_size"]:
        raise ValueError(
            f"{path}.image_size={s['image_size']} is not a multiple of patch_size={s['patch_size']}"
        )


VARIANT_SIZES = ("width", "depth", "num_heads", "mlp_dim", "patch_size")  # a variant may set
IMAGE = Schema(
    {
        "variant": Key((str, type(None)), None, 'a ViT size ("B/16") setting the sizes'),
        **_tower_keys(IMAGE_POOLS, "map", sizes=(int, type(None))),  # None: the variant's
        "patch_size": _sizes("patch side in pixels", (int, type(None))),
        "image_size": _sizes("input side in pixels (data.image_size)"),
        "posemb": Key(str, "learn", "position embedding", choices=POSEMBS),
        "stem": Key(str, "patch", "patch embedding", choices=STEMS),
        "ln_pre": Key(bool, False, "a layer norm before the blocks (CLIP)"),
        "patch_bias": Key(bool, True, "a bias in the patch embedding"),
        "input_mean": Key((tuple, type(None)), None, "a released tower's input normalisation"),
        "input_std": Key((tuple, type(None)), None, "(see ViT.input_mean)"),
    },
    doc="the ViT image tower (model.image)",
    prepare=lambda section: _apply_variant(section),
    check=_check_image,
)
TEXT = Schema(
    {
        "vocab_size": _sizes("token embedding rows (>= the tokenizer's vocabulary)"),
        "max_len": _sizes("position embedding rows (>= tokenizer.max_len)"),
        **_tower_keys(TEXT_POOLS, "last"),
        "causal": Key(bool, False, "a causal attention mask"),
        "pad_id": Key(int, 0, "the tokenizer's pad id"),
        "eos_id": Key(int, 1, "the tokenizer's EOS id"),
        "mask_pad": Key(bool, True, "pad tokens are masked out of attention"),
    },
    doc="the text transformer (model.text)",
    check=lambda path, s: check_heads(path, s["width"], s["num_heads"]),
)


def attention_choices() -> tuple[str, ...]:
    """Valid `model.attention_impl` values: "auto" and the dispatcher's registered kernels."""
    return ("auto", *ATTENTION_IMPLS.names())


# Keys at the top of `model` that every tower reads (the VLM's vision tower included).
SHARED = Schema(
    {
        "dtype": Key(str, "float32", "compute dtype", choices=lambda: tuple(COMPUTE_DTYPES)),
        "attention_impl": Key(str, "auto", "attention kernel", choices=attention_choices),
        "remat": Key(bool, False, "rematerialise each block in the backward pass"),
        "scan": Key(bool, False, "scan over the blocks (one compiled block)"),
    }
)
TWO_TOWER = SHARED | Schema(
    {
        "embed_dim": Key(int, REQUIRED, "width of the shared embedding"),
        "image": IMAGE,
        "text": TEXT,
        "temperature_init": Key(float, 10.0, "logit_scale at init (t = log of it)"),
        "bias_init": Key((float, type(None)), -10.0, "logit bias at init; None: no bias"),
        "learn_temperature": Key(bool, True, "False: t and b stay constants"),
        "max_logit_scale": Key(float, 100.0, "cap on exp(t)"),
    },
    doc="the two-tower contrastive model",
)


def _apply_variant(section: dict) -> dict:
    """A `variant` ("B/16") fills width/depth/mlp_dim/num_heads(/patch_size); a size also set
    explicitly (e.g. by a CLI override) must agree with it, or the variant would silently undo it.
    """
    variant = section.get("variant")
    if not variant:
        return section
    sizes = decode_variant(variant)
    for key, size in sizes.items():
        given = section.get(key)
        if given is not None and given != size:
            raise ValueError(
                f"model.image.{key}={given} conflicts with model.image.variant={variant!r}, "
                f"which sets {key}={size}; set model.image.variant='' to size the tower by its "
                f"explicit keys, or pick another variant"
            )
    return section | sizes


def image_settings(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """model.image resolved (IMAGE): the one reading of it for the two-tower model, the VLM's
    vision tower and the FLOP count. `variant` ("B/16") sets the sizes (see _apply_variant)."""
    return dict(resolve("model.image", model_config.image, IMAGE))


def text_settings(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """model.text resolved (TEXT)."""
    return dict(resolve("model.text", model_config.text, TEXT))


def shared_settings(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Settings every tower (and the VLM's vision tower) takes from the top of `model`."""
    shared = resolve_keys("model", model_config, SHARED)
    return dict(shared, dtype=compute_dtype(shared.dtype))


def _tower_shared(model_config: ml_collections.ConfigDict, head: bool) -> dict[str, Any]:
    """`shared_settings` for one tower; without a head its pooled features are the embedding."""
    return shared_settings(model_config) | {"out_dim": model_config.embed_dim if head else None}


def build_vit(model_config: ml_collections.ConfigDict, patch_tokens: bool = False) -> ViT:
    """model.image -> ViT. `patch_tokens=True`: the tower returns its patch tokens (the VLM's
    vision tower, whose params load from a contrastive run's `img`); no head, no embed_dim."""
    settings = image_settings(model_config)
    for key in ("variant", "image_size"):
        settings.pop(key)
    for key in ("input_mean", "input_std"):
        settings[key] = None if settings[key] is None else tuple(settings[key])
    head = settings.pop("head")
    if patch_tokens:
        return ViT(**settings, **shared_settings(model_config), patch_tokens=True)
    return ViT(**settings, **_tower_shared(model_config, head))


def build_text(model_config: ml_collections.ConfigDict) -> TextTransformer:
    settings = text_settings(model_config)
    shared = _tower_shared(model_config, settings.pop("head"))
    return TextTransformer(**settings, **shared)


def l2_normalize(x: jax.Array) -> jax.Array:
    """float[B, E] -> float32[B, E] with unit rows (computed in float32 for bf16 towers)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class TwoTower(nn.Module):
    """Image and text towers into one embedding space, with temperature and bias."""

    img: ViT
    txt: TextTransformer
    temperature_init: float = 10.0
    bias_init: float | None = -10.0
    learn_temperature: bool = True
    max_logit_scale: float = 100.0

    def setup(self) -> None:
        self.t = self._scalar("t", math.log(self.temperature_init))
        self.b = None if self.bias_init is None else self._scalar("b", self.bias_init)

    def _scalar(self, name: str, value: float) -> jax.Array:
        if not self.learn_temperature:
            return jnp.asarray(value, jnp.float32)
        init = nn.with_logical_partitioning(nn.initializers.constant(value), ())
        return self.param(name, init, (), jnp.float32)

    def embed_image(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images: float32[B, H, W, 3] in [-1, 1] -> float32[B, E], unit norm."""
        return l2_normalize(self.img(images, train))

    def embed_text(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """tokens: int32[B, L] -> float32[B, E], unit norm."""
        return l2_normalize(self.txt(tokens, train))

    def __call__(
        self, images: jax.Array, tokens: jax.Array, train: bool = False
    ) -> dict[str, jax.Array]:
        logit_bias = jnp.zeros((), jnp.float32) if self.b is None else self.b
        return {
            "image_emb": self.embed_image(images, train),
            "text_emb": self.embed_text(tokens, train),
            "logit_scale": jnp.minimum(jnp.exp(self.t), self.max_logit_scale),
            "logit_bias": logit_bias,
        }


@MODELS.register("two_tower", schema=TWO_TOWER)
def build_two_tower(model_config: ml_collections.ConfigDict) -> TwoTower:
    """config.model -> TwoTower (keys: TWO_TOWER)."""
    model_config = resolve("model", model_config, MODEL)
    return TwoTower(
        img=build_vit(model_config),
        txt=build_text(model_config),
        temperature_init=model_config.temperature_init,
        bias_init=model_config.bias_init,
        learn_temperature=model_config.learn_temperature,
        max_logit_scale=model_config.max_logit_scale,
    )
