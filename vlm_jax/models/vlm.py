"""Vision-language model: vision tower -> connector -> decoder LM, with a selectable fusion.

`fusion="early"`: each `<image>` placeholder in the text is replaced by the image's visual
tokens, and the LM runs on the spliced sequence with a prefix-LM mask (image + prompt
bidirectional, answer causal). `fusion="cross_attention"` (Flamingo): the text stays as it
is and gated cross-attention blocks read the visual tokens every k layers. `fusion="none"`:
the LM alone (the text-only baseline); images are ignored.

Whatever the fusion, the model returns logits aligned with the *text* tokens,
`logits[:, i]` predicting `tokens[:, i + 1]`, so the loss and metrics never depend on it.

    images: float32[B, K, H, W, 3] in [-1, 1] (or [B, H, W, 3] for K = 1)
    tokens: int32[B, L], with K `<image>` placeholders inside the prompt
    prefix_lengths: int32[B], number of text tokens in the bidirectional prefix
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models import MODEL, MODELS
from vlm_jax.models.decoder import LM, DecoderLM, KVCache, decoder_from_config
from vlm_jax.models.layers import compute_dtype
from vlm_jax.models.projectors import CONNECTOR, build_connector
from vlm_jax.models.two_tower import IMAGE, SHARED, build_vit
from vlm_jax.models.vit import ViT
from vlm_jax.registry import Registry
from vlm_jax.schema import REQUIRED, Key, Schema, positive, resolve, resolve_keys

FUSIONS = Registry("fusion")  # model.fusion: how the visual tokens reach the LM


def splice_visual_tokens(
    text_embeds: jax.Array, is_image: jax.Array, visual: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Replace the k-th placeholder of each row by the k-th image's M visual tokens.

    text_embeds: float[B, L, D]; is_image: bool[B, L]; visual: float[B, K, M, D]
    -> (embeds float[B, L + K(M-1), D], ends int32[B, L]) where `ends[b, i]` is one past
    the last slot of text token i, so slot `ends - 1` holds the token (or the image's last
    visual token) whose output predicts text token i + 1. Slots past the last token (rows
    with fewer than K placeholders) repeat the last token; they sit after every real token,
    so the causal mask keeps them invisible.
    """
    _, num_images, per_image, _ = visual.shape
    total = text_embeds.shape[1] + num_images * (per_image - 1)

    def one(embeds, image_flags, images):
        sizes = jnp.where(image_flags, per_image, 1)
        ends = jnp.cumsum(sizes).astype(jnp.int32)
        slots = jnp.arange(total, dtype=jnp.int32)
        src = jnp.minimum(jnp.searchsorted(ends, slots, side="right"), len(ends) - 1)
        within = jnp.clip(slots - (ends[src] - sizes[src]), 0, per_image - 1)
        rank = jnp.clip(jnp.cumsum(image_flags) - 1, 0, num_images - 1)[src]
        out = jnp.where(image_flags[src][:, None], images[rank, within], embeds[src])
        return out, ends

    return jax.vmap(one)(text_embeds, is_image, visual.astype(text_embeds.dtype))


def spliced_prefix_lengths(ends: jax.Array, prefix_lengths: jax.Array) -> jax.Array:
    """Text prefix lengths int32[B] -> lengths in the spliced sequence int32[B]."""
    last = jnp.take_along_axis(ends, jnp.maximum(prefix_lengths - 1, 0)[:, None], axis=1)[:, 0]
    return jnp.where(prefix_lengths > 0, last, 0)


class VisionLanguageModel(nn.Module):
    """vision: images float[B', H, W, 3] -> patch features float[B', N, Dv] (None for "none");
    connector: features -> visual tokens float[B', M, D] (see projectors.py)."""

    lm: DecoderLM
    vision: nn.Module | None = None
    connector: nn.Module | None = None
    fusion: str = "early"
    image_token_id: int = 1
    pad_id: int = 0  # the tokenizer's; pad tokens never condition a Q-Former

    def setup(self) -> None:
        """What the fusion needs of the modules (once per bound model, not per call)."""
        fusion = FUSIONS.get(self.fusion)
        if fusion.reads_images and (self.vision is None or self.connector is None):
            raise ValueError(f"fusion={self.fusion!r} needs a vision tower and a connector")
        if fusion.cross_attention != bool(self.lm.cross_attention_every):
            raise ValueError(
                f"fusion={self.fusion!r} needs lm.cross_attention_every "
                f"{'> 0' if fusion.cross_attention else '== 0'}, "
                f"got {self.lm.cross_attention_every}"
            )

    def encode_images(self, images, tokens, prefix_lengths, train: bool = False) -> jax.Array:
        """Visual tokens float[B, K, M, D]; the instruction (prefix text) conditions a Q-Former."""
        if images.ndim == 4:
            images = images[:, None]
        batch, num_images = images.shape[:2]
        features = self.vision(images.reshape(batch * num_images, *images.shape[2:]), train=train)
        text_valid = (
            (jnp.arange(tokens.shape[1]) < prefix_lengths[:, None])
            & (tokens != self.image_token_id)
            & (tokens != self.pad_id)
        )
        repeat = lambda x: jnp.repeat(x, num_images, axis=0)
        visual = self.connector(
            features,
            text_embeds=repeat(self.lm.embed(tokens)),
            text_valid=repeat(text_valid),
        )
        return visual.reshape(batch, num_images, *visual.shape[1:])

    def _inputs(self, images, tokens, prefix_lengths, train):
        """LM inputs for the fusion: (kwargs for the LM, ends int32[B, L] or None)."""
        return FUSIONS.get(self.fusion).inputs(self, images, tokens, prefix_lengths, train)

    def __call__(self, images, tokens, prefix_lengths, train: bool = False) -> jax.Array:
        """Next-token logits float32[B, L, V] aligned with the text tokens."""
        inputs, ends = self._inputs(images, tokens, prefix_lengths, train)
        logits, _ = self.lm(**inputs, deterministic=not train)
        if ends is not None:
            logits = jnp.take_along_axis(logits, (ends - 1)[:, :, None], axis=1)
        return logits

    def prefill(self, images, prompt, prompt_lengths, max_new_tokens: int):
        """Encode image + prompt once into a KV cache with room for `max_new_tokens`.

        prompt: int32[B, P] right-padded, prompt_lengths: int32[B] -> (logits float32[B, V]
        for the first answer token, the cache positioned after each prompt, media for the
        cross-attention blocks or None).
        """
        inputs, ends = self._inputs(images, prompt, prompt_lengths, train=False)
        lengths = prompt_lengths if ends is None else inputs["prefix_lengths"]
        prefix_len = inputs.get("embeds", inputs.get("tokens")).shape[1]
        cache = self.lm.init_cache(prompt.shape[0], prefix_len + max_new_tokens)
        logits, cache = self.lm(**inputs, cache=cache)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return last, cache.replace(index=lengths), inputs.get("media")

    def decode_step(self, tokens, cache: KVCache, media=None):
        """One token per example: tokens int32[B, 1] -> (logits float32[B, V], cache)."""
        logits, cache = self.lm(tokens, cache=cache, media=media)
        return logits[:, -1], cache


@dataclasses.dataclass(frozen=True)
class Fusion:
    """`inputs(vlm, images, tokens, prefix_lengths, train) -> (LM kwargs, ends int32[B, L] or
    None)`: what the LM reads; `reads_images`: it needs the vision tower and connector;
    `cross_attention`: the LM has gated cross-attention blocks (model.cross_attention_every)."""

    inputs: Callable[..., tuple[dict, jax.Array | None]]
    reads_images: bool = True
    cross_attention: bool = False


def _early_inputs(vlm: VisionLanguageModel, images, tokens, prefix_lengths, train):
    """The visual tokens spliced in place of each `<image>`, prefix lengths moved with them."""
    visual = vlm.encode_images(images, tokens, prefix_lengths, train)
    embeds, ends = splice_visual_tokens(vlm.lm.embed(tokens), tokens == vlm.image_token_id, visual)
    return dict(embeds=embeds, prefix_lengths=spliced_prefix_lengths(ends, prefix_lengths)), ends


def _cross_attention_inputs(vlm: VisionLanguageModel, images, tokens, prefix_lengths, train):
    """The text as it is; the visual tokens of every image, float[B, K*M, D], as `media`."""
    visual = vlm.encode_images(images, tokens, prefix_lengths, train)
    media = visual.reshape(visual.shape[0], -1, visual.shape[-1])
    return dict(tokens=tokens, prefix_lengths=prefix_lengths, media=media), None


def _text_only_inputs(vlm: VisionLanguageModel, images, tokens, prefix_lengths, train):
    return dict(tokens=tokens, prefix_lengths=prefix_lengths), None


FUSIONS.register("early")(Fusion(_early_inputs))
FUSIONS.register("cross_attention")(Fusion(_cross_attention_inputs, cross_attention=True))
FUSIONS.register("none")(Fusion(_text_only_inputs, reads_images=False))


# Keys of model.image that only shape the pooled embedding; the VLM reads the patch tokens.
POOLED_ONLY_KEYS = ("head", "head_bias")


def _reject_pooled_only(section: dict) -> dict:
    unused = sorted(set(section) & set(POOLED_ONLY_KEYS))
    if unused:
        raise ValueError(
            f"model.image.{unused[0]} is not used by the VLM's vision tower (it returns the "
            "patch tokens, before pooling and head); remove it"
        )
    return section


VISION = Schema(
    {k: v for k, v in IMAGE.keys.items() if k not in POOLED_ONLY_KEYS},
    doc="the VLM's vision tower: model.image of the two-tower model, without its head",
    prepare=lambda section: IMAGE.prepare(_reject_pooled_only(section)),
    check=IMAGE.check,
)


def vision_tower(model_cfg: ml_collections.ConfigDict) -> ViT:
    """`model.image` -> the ViT returning its patch tokens float[B, N, W], resolved and validated
    exactly as the two-tower's image tower (two_tower.image_settings), under the same param
    names, so a contrastive run's `img` initialises it. `pool="cls"` keeps the cls token in the
    encoder (as in that run) but not in the output; "gap" / "map" change nothing here."""
    resolve("model.image", model_cfg.image, VISION)
    return build_vit(model_cfg, patch_tokens=True)


DECODER_LM = Schema({k: SHARED.keys[k] for k in ("dtype", "attention_impl", "remat")}) | Schema(
    {"lm": LM}, doc="a decoder-only LM (model.lm)"
)
VLM = SHARED | Schema(
    {
        "fusion": Key(str, "early", "how the visual tokens reach the LM", choices=FUSIONS.names),
        "cross_attention_every": Key(
            int,
            1,
            "cross_attention: a gated xattn block every k layers",
            valid=positive,
            expect="a positive int",
        ),
        "image_token_id": Key(int, REQUIRED, "the tokenizer's id of the <image> placeholder"),
        "pad_id": Key(int, 0, "the tokenizer's pad id (never conditions a Q-Former)"),
        "image": VISION,
        "connector": CONNECTOR,
        "lm": LM,
    },
    doc="vision tower -> connector -> decoder LM",
)


@MODELS.register("decoder_lm", schema=DECODER_LM)
def build_decoder_lm(model_cfg: ml_collections.ConfigDict, cross_attention_every: int = 0):
    """The decoder LM of `model_cfg.lm` ("decoder_lm" model, and the VLM's `lm`)."""
    shared = resolve_keys("model", model_cfg, DECODER_LM)
    return decoder_from_config(
        model_cfg.lm,
        dtype=compute_dtype(shared.dtype),
        attention_impl=shared.attention_impl,
        remat=shared.remat,
        cross_attention_every=cross_attention_every,
    )


@MODELS.register("vlm", schema=VLM)
def build_vlm(model_cfg: ml_collections.ConfigDict) -> VisionLanguageModel:
    """The "vlm" model (keys: VLM): fusion, cross_attention_every, image_token_id, pad_id, image
    (ViT), connector (projectors.build_connector), lm (decoder.decoder_from_config)."""
    model_cfg = resolve("model", model_cfg, MODEL)
    fusion = FUSIONS.get(model_cfg.fusion)
    every = model_cfg.cross_attention_every if fusion.cross_attention else 0
    lm = build_decoder_lm(model_cfg, every)
    ids = dict(image_token_id=model_cfg.image_token_id, pad_id=model_cfg.pad_id)
    if not fusion.reads_images:
        return VisionLanguageModel(lm=lm, fusion=model_cfg.fusion, **ids)
    impl = model_cfg.attention_impl
    return VisionLanguageModel(
        lm=lm,
        vision=vision_tower(model_cfg),
        connector=build_connector(
            model_cfg.connector, lm.width, dtype=compute_dtype(model_cfg.dtype), attention_impl=impl
        ),
        fusion=model_cfg.fusion,
        **ids,
    )
