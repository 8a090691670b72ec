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

A packed row (training: several conversations in one row, `data.packing`) gives instead
`segments = (segment_ids int32[B, L], prefix_mask bool[B, L])`: each conversation a run of one
id (0: padding), prefix_mask its bidirectional prefix. The k-th `<image>` of the row takes the
k-th image, so the images of each conversation sit in the row's K slots in order; segment ids
and prefix flags follow each text token into its spliced slots, a Q-Former reads only the
prefix of its own image's conversation, and the LM keeps attention and positions inside each
conversation (DecoderLM), so every conversation's logits are those it gets unpacked. Early
fusion and "none" only: cross-attention's media would be shared by the row.
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


def spliced_values(ends: jax.Array, values: jax.Array, total: int) -> jax.Array:
    """Per text token values [B, L] -> per spliced slot [B, total]: each slot takes the value
    of the text token it holds (an image's slots its marker's; trailing slots the last's)."""
    slots = jnp.arange(total, dtype=jnp.int32)
    src = jax.vmap(lambda e: jnp.searchsorted(e, slots, side="right"))(ends)
    return jnp.take_along_axis(values, jnp.minimum(src, ends.shape[1] - 1), axis=1)


def image_segments(is_image: jax.Array, segment_ids: jax.Array, num_images: int) -> jax.Array:
    """The segment of each image slot int32[B, K]: its `<image>` marker's (0: no marker)."""
    rank = jnp.cumsum(is_image, axis=1) - 1  # [B, L]
    owns = is_image[:, None, :] & (rank[:, None, :] == jnp.arange(num_images)[None, :, None])
    return jnp.max(jnp.where(owns, segment_ids[:, None, :], 0), axis=2)


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

    def instruction(self, tokens, prefix_lengths, segments, num_images: int) -> jax.Array:
        """bool[B, K, L]: the prefix words each image's connector reads (a packed row: those
        of the image's own conversation)."""
        words = (tokens != self.image_token_id) & (tokens != self.pad_id)
        if segments is None:
            prefix = jnp.arange(tokens.shape[1]) < prefix_lengths[:, None]
            return jnp.repeat((prefix & words)[:, None], num_images, axis=1)
        segment_ids, prefix_mask = segments
        owner = image_segments(tokens == self.image_token_id, segment_ids, num_images)
        same = segment_ids[:, None, :] == owner[:, :, None]  # [B, K, L]
        return same & (prefix_mask.astype(bool) & words)[:, None]

    def encode_images(
        self, images, tokens, prefix_lengths, train: bool = False, segments=None
    ) -> jax.Array:
        """Visual tokens float[B, K, M, D]; the instruction (prefix text) conditions a Q-Former."""
        if images.ndim == 4:
            images = images[:, None]
        batch, num_images = images.shape[:2]
        features = self.vision(images.reshape(batch * num_images, *images.shape[2:]), train=train)
        text_valid = self.instruction(tokens, prefix_lengths, segments, num_images)
        visual = self.connector(
            features,
            text_embeds=jnp.repeat(self.lm.embed(tokens), num_images, axis=0),
            text_valid=text_valid.reshape(batch * num_images, -1),
        )
        return visual.reshape(batch, num_images, *visual.shape[1:])

    def _inputs(self, images, tokens, prefix_lengths, train, segments=None):
        """LM inputs for the fusion: (kwargs for the LM, ends int32[B, L] or None)."""
        fusion = FUSIONS.get(self.fusion)
        if segments is None:
            return fusion.inputs(self, images, tokens, prefix_lengths, train)
        if fusion.cross_attention:
            raise ValueError(
                f"fusion={self.fusion!r} cannot take packed rows (every text token reads all "
                "of the row's media); pack with fusion early or none (data.packing=False here)"
            )
        return fusion.inputs(self, images, tokens, prefix_lengths, train, segments)

    def __call__(
        self, images, tokens, prefix_lengths, train: bool = False, segments=None
    ) -> jax.Array:
        """Next-token logits float32[B, L, V] aligned with the text tokens; `segments`: a
        packed row's (segment_ids int32[B, L], prefix_mask bool[B, L]), prefix_lengths None."""
        inputs, ends = self._inputs(images, tokens, prefix_lengths, train, segments)
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


def _early_inputs(vlm: VisionLanguageModel, images, tokens, prefix_lengths, train, segments=None):
    """The visual tokens spliced in place of each `<image>`, prefix lengths (or a packed row's
    segments) moved with them."""
    visual = vlm.encode_images(images, tokens, prefix_lengths, train, segments)
    embeds, ends = splice_visual_tokens(vlm.lm.embed(tokens), tokens == vlm.image_token_id, visual)
    if segments is not None:
        total = embeds.shape[1]
        segment_ids, prefix_mask = (spliced_values(ends, x, total) for x in segments)
        return dict(embeds=embeds, segment_ids=segment_ids, prefix_mask=prefix_mask), ends
    return dict(embeds=embeds, prefix_lengths=spliced_prefix_lengths(ends, prefix_lengths)), ends


def _cross_attention_inputs(vlm: VisionLanguageModel, images, tokens, prefix_lengths, train):
    """The text as it is; the visual tokens of every image, float[B, K*M, D], as `media`."""
    visual = vlm.encode_images(images, tokens, prefix_lengths, train)
    media = visual.reshape(visual.shape[0], -1, visual.shape[-1])
    return dict(tokens=tokens, prefix_lengths=prefix_lengths, media=media), None


def _text_only_inputs(
    vlm: VisionLanguageModel, images, tokens, prefix_lengths, train, segments=None
):
    if segments is not None:
        return dict(tokens=tokens, segment_ids=segments[0], prefix_mask=segments[1]), None
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
