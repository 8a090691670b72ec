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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.config import check_choice
from vlm_jax.kernels import ATTENTION_IMPLS
from vlm_jax.models import MODELS
from vlm_jax.models.layers import ACTIVATIONS, check_heads, compute_dtype
from vlm_jax.models.text import TEXT_POOLS, TextTransformer
from vlm_jax.models.vit import (
    IMAGE_POOLS,
    POSEMBS,
    STEMS,
    ViT,
    conv_stem_channels,
    decode_variant,
)

REQUIRED = object()  # marks a setting with no default
IMAGE_DEFAULTS: dict[str, Any] = dict(
    variant=None,
    width=REQUIRED,
    depth=REQUIRED,
    num_heads=REQUIRED,
    mlp_dim=REQUIRED,
    patch_size=REQUIRED,
    image_size=REQUIRED,
    posemb="learn",
    pool="map",
    stem="patch",
    dropout=0.0,
    activation="gelu_tanh",
    ln_eps=1e-6,
    ln_pre=False,
    patch_bias=True,
    head_bias=True,
    head=True,  # False: no projection, the pooled features are the embedding (SigLIP's image)
    input_mean=None,  # a released tower's input normalisation (see ViT.input_mean)
    input_std=None,
)
TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=REQUIRED,
    max_len=REQUIRED,
    width=REQUIRED,
    depth=REQUIRED,
    num_heads=REQUIRED,
    mlp_dim=REQUIRED,
    causal=False,
    pool="last",
    pad_id=0,
    eos_id=1,
    mask_pad=True,
    dropout=0.0,
    activation="gelu_tanh",
    ln_eps=1e-6,
    head_bias=True,
    head=True,
)


def _resolve(section: ml_collections.ConfigDict | dict, defaults: dict, where: str) -> dict:
    """The section's values over `defaults`; unknown or missing keys fail naming them."""
    given = dict(section)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]} is not a known key; valid: {', '.join(defaults)}")
    settings = {**defaults, **given}
    missing = [k for k, v in settings.items() if v is REQUIRED]
    if missing:
        raise ValueError(f"{where} needs {', '.join(missing)}")
    return settings


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
    """model.image resolved and validated: the one reading of it for the two-tower model, the
    VLM's vision tower and the FLOP count. `variant` ("B/16") sets the sizes (see _apply_variant).
    """
    section = _apply_variant(dict(model_config.image))
    settings = _resolve(section, IMAGE_DEFAULTS, "model.image")
    check_heads("model.image", settings["width"], settings["num_heads"])
    check_choice("model.image.pool", settings["pool"], IMAGE_POOLS)
    check_choice("model.image.posemb", settings["posemb"], POSEMBS)
    check_choice("model.image.stem", settings["stem"], STEMS)
    if settings["stem"] == "conv":
        conv_stem_channels(settings["patch_size"], settings["width"])  # raises if it can't
    check_choice("model.image.activation", settings["activation"], tuple(ACTIVATIONS))
    if settings["image_size"] % settings["patch_size"]:
        raise ValueError(
            f"model.image.image_size={settings['image_size']} is not a multiple of "
            f"patch_size={settings['patch_size']}"
        )
    return settings


def text_settings(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """model.text resolved over its defaults and validated."""
    settings = _resolve(model_config.text, TEXT_DEFAULTS, "model.text")
    check_heads("model.text", settings["width"], settings["num_heads"])
    check_choice("model.text.pool", settings["pool"], TEXT_POOLS)
    check_choice("model.text.activation", settings["activation"], tuple(ACTIVATIONS))
    return settings


def attention_choices() -> tuple[str, ...]:
    """Valid `model.attention_impl` values: "auto" and the dispatcher's registered kernels."""
    return ("auto", *ATTENTION_IMPLS.names())


def shared_settings(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Settings every tower (and the VLM's vision tower) takes from the top of `model`."""
    impl = model_config.get("attention_impl", "auto")
    check_choice("model.attention_impl", impl, attention_choices())
    return dict(
        dtype=compute_dtype(model_config.get("dtype", "float32")),
        attention_impl=impl,
        remat=model_config.get("remat", False),
        scan=model_config.get("scan", False),
    )


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


@MODELS.register("two_tower")
def build_two_tower(model_config: ml_collections.ConfigDict) -> TwoTower:
    """config.model -> TwoTower (keys: see IMAGE_DEFAULTS, TEXT_DEFAULTS and the contract)."""
    return TwoTower(
        img=build_vit(model_config),
        txt=build_text(model_config),
        temperature_init=model_config.get("temperature_init", 10.0),
        bias_init=model_config.get("bias_init", -10.0),
        learn_temperature=model_config.get("learn_temperature", True),
        max_logit_scale=model_config.get("max_logit_scale", 100.0),
    )
