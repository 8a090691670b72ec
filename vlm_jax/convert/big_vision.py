"""big_vision SigLIP `.npz` checkpoints (two-tower, MAP head, `t`/`b`) -> vlm_jax.

big_vision saves flax params flattened with "/" (optionally under "params/"): `img/...` (ViT:
`embedding` conv, `pos_embedding`, `Transformer/encoderblock_{i}` or one scanned `encoderblock`
stacked over depth, `encoder_norm`, `MAPHead_0`, optional `head`), `txt/...` (`Embed_0`,
`pos_embedding`, `Encoder_0/...`, `head`), and scalars `t` (log temperature) and `b`. Flax
layouts match ours, so tensors map one-to-one; every size is read off the tensor shapes. Text is
pooled at the last position over all tokens (SigLIP pads with EOS, id 1).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from vlm_jax.convert import common
from vlm_jax.convert.common import Entry

BLOCK = {  # big_vision encoderblock names -> ours
    "LayerNorm_0": "ln_attn",
    "LayerNorm_1": "ln_mlp",
    "MultiHeadDotProductAttention_0": "attn",
    "MlpBlock_0/Dense_0": "mlp/fc1",
    "MlpBlock_0/Dense_1": "mlp/fc2",
}
MAP_HEAD = {
    "MultiHeadDotProductAttention_0": "attn",
    "LayerNorm_0": "ln",
    "MlpBlock_0/Dense_0": "mlp/fc1",
    "MlpBlock_0/Dense_1": "mlp/fc2",
}
TOWER_ENCODERS = {"img": "img/Transformer", "txt": "txt/Encoder_0"}


def unscan(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Names without "params/", and a scanned `encoderblock` (leading depth axis) split into
    `encoderblock_{i}` so both saved layouts map the same way."""
    out = {}
    for name, value in arrays.items():
        name = name.removeprefix("params/")
        if "/encoderblock/" in name:
            for i, layer in enumerate(value):
                out[name.replace("/encoderblock/", f"/encoderblock_{i}/")] = layer
        else:
            out[name] = value
    return out


def depth(arrays: dict, encoder: str) -> int:
    pattern = re.compile(rf"{re.escape(encoder)}/encoderblock_(\d+)/")
    found = {int(m.group(1)) for name in arrays if (m := pattern.match(name))}
    if not found:
        raise common.ConversionError(f"no {encoder}/encoderblock_* keys in the checkpoint")
    return max(found) + 1


def shape(arrays: dict, name: str) -> tuple[int, ...]:
    if name not in arrays:
        raise common.ConversionError(f"missing key {name!r} in the checkpoint")
    return tuple(np.shape(arrays[name]))


def tower(arrays: dict, prefix: str) -> dict:
    """Sizes of one tower, read off its first block's tensor shapes."""
    block = f"{TOWER_ENCODERS[prefix]}/encoderblock_0"
    width, heads, _ = shape(arrays, f"{block}/MultiHeadDotProductAttention_0/query/kernel")
    return dict(
        width=width,
        depth=depth(arrays, TOWER_ENCODERS[prefix]),
        num_heads=heads,
        mlp_dim=shape(arrays, f"{block}/MlpBlock_0/Dense_0/kernel")[1],
        activation="gelu_tanh",
        ln_eps=1e-6,
        dropout=0.0,
    )


def sections(arrays: dict) -> dict[str, dict]:
    """Our model, tokenizer and loss sections from the tensor shapes of a SigLIP checkpoint."""
    image = tower(arrays, "img")
    patch = shape(arrays, "img/embedding/kernel")[0]
    grid = math.isqrt(shape(arrays, "img/pos_embedding")[1])
    image_head = "img/head/kernel" in arrays
    embed_dim = shape(arrays, "txt/head/kernel")[1]
    image |= dict(
        variant=None,
        patch_size=patch,
        image_size=grid * patch,
        posemb="learn",
        pool="map" if "img/MAPHead_0/probe" in arrays else "gap",
        patch_bias=True,
        ln_pre=False,
        head=image_head,
        head_bias=image_head,
        input_mean=None,
        input_std=None,
    )
    text = tower(arrays, "txt") | dict(
        vocab_size=shape(arrays, "txt/Embed_0/embedding")[0],
        max_len=shape(arrays, "txt/pos_embedding")[1],
        causal=False,
        pool="last_position",
        pad_id=1,
        eos_id=1,
        mask_pad=False,
        head=True,
        head_bias=True,
    )
    model = dict(
        name="two_tower",
        embed_dim=embed_dim,
        dtype="float32",
        attention_impl="auto",
        remat=False,
        scan=False,
        image=image,
        text=text,
        temperature_init=float(np.exp(np.asarray(arrays["t"]).reshape(()))),
        bias_init=float(np.asarray(arrays["b"]).reshape(())),
        learn_temperature=True,
        max_logit_scale=100.0,
    )
    tokenizer = dict(
        name="sentencepiece",
        max_len=text["max_len"],
        model_path="",
        lower=True,
        strip_punctuation=True,
        pad_id=1,
    )
    loss = dict(name="sigmoid", chunked=False, tile_size=1024)
    return {"model": model, "tokenizer": tokenizer, "loss": loss}


def renamed(source: str, ours: str, names: dict[str, str], arrays: dict) -> list[Entry]:
    """Every tensor under `source/<big_vision name>/...` -> `ours/<our name>/...`, as is."""
    entries = []
    for theirs, mine in names.items():
        prefix = f"{source}/{theirs}/"
        for name in sorted(n for n in arrays if n.startswith(prefix)):
            entries.append(Entry(name, f"{ours}/{mine}/{name.removeprefix(prefix)}"))
        if not any(n.startswith(prefix) for n in arrays):
            raise common.ConversionError(f"missing key {prefix}* in the checkpoint")
    return entries


def entries(model: dict, arrays: dict) -> list[Entry]:
    out = []
    for prefix, section in (("img", model["image"]), ("txt", model["text"])):
        encoder = TOWER_ENCODERS[prefix]
        for i in range(section["depth"]):
            block = f"{encoder}/encoderblock_{i}"
            out += renamed(block, f"{prefix}/encoder/block_{i}", BLOCK, arrays)
        out += renamed(encoder, f"{prefix}/encoder", {"encoder_norm": "ln_final"}, arrays)
        out += [Entry(f"{prefix}/pos_embedding", f"{prefix}/posemb")]
        if section["head"]:
            out += renamed(prefix, prefix, {"head": "head"}, arrays)
    out += renamed("img", "img/embedding", {"embedding": "conv"}, arrays)
    out += [Entry("txt/Embed_0/embedding", "txt/embedding/embedding")]
    if model["image"]["pool"] == "map":
        out += [Entry("img/MAPHead_0/probe", "img/map/probe")]
        out += renamed("img/MAPHead_0", "img/map", MAP_HEAD, arrays)
    scalar = lambda name: common.reshaped(name, name, (), np.shape(arrays[name]))
    return [*out, scalar("t"), scalar("b")]


def convert(src: str | Path, out: str | Path, resize: common.NewImageSize | None = None) -> Path:
    """A big_vision SigLIP .npz -> a vlm_jax checkpoint + config in `out`."""
    src = Path(src)
    arrays = unscan(common.load_tensors(src))
    found = sections(arrays)
    tensors = common.Tensors(arrays)
    layout = entries(found["model"], arrays)
    params = common.import_entries(layout, tensors, common.expected_shapes(found["model"]))
    tensors.check_consumed()
    common.check_params(params, found["model"])
    meta = {"source": str(src.absolute()), "format": "big_vision"}
    return common.save_converted(out, params, found, meta, resize)
