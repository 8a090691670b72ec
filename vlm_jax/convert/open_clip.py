"""open_clip ViT CLIPs (OpenAI's and LAION's B/32, B/16, L/14, ...) -> vlm_jax two-tower.

A release is a directory (as on the HF hub) with `open_clip_config.json` ({"model_cfg": ...,
"preprocess_cfg": ...}; or a bare model config such as open_clip's `model_configs/*.json`) and
`open_clip_pytorch_model.bin` or `open_clip_model.safetensors` (a state dict; a `.pt`/`.bin`
file path works too, with the config beside it). The layout: patch conv without bias, cls token,
ln_pre, blocks with fused in_proj, ln_post on the cls output, bare projection matrices, causal
text pooled at the EOT token (open_clip's argmax of ids: EOT is the largest id), LN eps 1e-5,
quick_gelu for OpenAI weights (`quick_gelu: true`), exact GELU otherwise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from vlm_jax.convert import common
from vlm_jax.convert.common import Entry
from vlm_jax.convert.hf import OPENAI_MEAN, OPENAI_STD

WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Config keys of layouts this converter does not map (timm / HF towers, other poolings, ...).
UNSUPPORTED = {
    "vision_cfg": ("timm_model_name", "hf_model_name", "attentional_pool", "global_average_pool"),
    "text_cfg": ("hf_model_name", "no_causal_mask", "proj_bias", "final_ln_after_pool"),
}
SUPPORTED_POOLS = {"vision_cfg": ("tok",), "text_cfg": ("argmax",)}


def read_config(src: Path) -> dict:
    """The release's open_clip_config.json: {"model_cfg": ..., "preprocess_cfg": ...}."""
    directory = src if src.is_dir() else src.parent
    path = directory / "open_clip_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no open_clip_config.json in {directory}")
    config = json.loads(path.read_text())
    return config if "model_cfg" in config else {"model_cfg": config}


def check_supported(model_cfg: dict) -> None:
    for tower, keys in UNSUPPORTED.items():
        section = model_cfg.get(tower, {})
        for key in keys:
            if section.get(key):
                raise common.ConversionError(f"{tower}.{key}={section[key]!r} is not supported")
        pool = section.get("pool_type")
        if pool is not None and pool not in SUPPORTED_POOLS[tower]:
            raise common.ConversionError(
                f"{tower}.pool_type={pool!r} is not one of: {SUPPORTED_POOLS[tower]}"
            )


def sections(release: dict) -> dict[str, dict]:
    """open_clip model/preprocess config -> our model, tokenizer and loss sections."""
    model_cfg = release["model_cfg"]
    check_supported(model_cfg)
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    width = vision["width"]
    preprocess = release.get("preprocess_cfg", {})
    image = dict(
        variant=None,
        width=width,
        depth=vision["layers"],
        num_heads=width // vision.get("head_width", 64),
        mlp_dim=int(width * vision.get("mlp_ratio", 4.0)),
        patch_size=vision["patch_size"],
        image_size=vision["image_size"],
        posemb="learn",
        pool="cls",
        dropout=0.0,
        activation=act,
        ln_eps=1e-5,
        ln_pre=True,
        patch_bias=False,
        head=True,
        head_bias=False,
        input_mean=tuple(preprocess.get("mean", OPENAI_MEAN)),
        input_std=tuple(preprocess.get("std", OPENAI_STD)),
    )
    vocab_size = text.get("vocab_size", 49408)
    text_width = text.get("width", 512)
    text_section = dict(
        vocab_size=vocab_size,
        max_len=text.get("context_length", 77),
        width=text_width,
        depth=text.get("layers", 12),
        num_heads=text.get("heads", 8),
        mlp_dim=int(text_width * text.get("mlp_ratio", 4.0)),
        causal=True,
        pool="eos",
        pad_id=0,
        eos_id=vocab_size - 1,
        mask_pad=True,
        dropout=0.0,
        activation=act,
        ln_eps=1e-5,
        head=True,
        head_bias=False,
    )
    model = dict(
        name="two_tower",
        embed_dim=model_cfg["embed_dim"],
        dtype="float32",
        attention_impl="auto",
        remat=False,
        scan=False,
        image=image,
        text=text_section,
        temperature_init=1 / 0.07,
        bias_init=None,
        learn_temperature=True,
        max_logit_scale=100.0,
    )
    tokenizer = dict(name="clip_bpe", max_len=text_section["max_len"])
    loss = dict(name="softmax", chunked=False, tile_size=1024)
    return {"model": model, "tokenizer": tokenizer, "loss": loss}


def entries(model: dict) -> list[Entry]:
    image, text = model["image"], model["text"]
    width = image["width"]
    tokens = (image["image_size"] // image["patch_size"]) ** 2 + 1
    text_shape = (text["max_len"], text["width"])
    return [
        common.conv_patches("visual.conv1.weight", "img/embedding/conv/kernel"),
        common.reshaped("visual.class_embedding", "img/cls", (1, 1, width), (width,)),
        common.reshaped(
            "visual.positional_embedding", "img/posemb", (1, tokens, width), (tokens, width)
        ),
        *common.norm("visual.ln_pre", "img/ln_pre"),
        *common.encoder_entries(
            "visual.transformer.resblocks",
            "img/encoder",
            image["depth"],
            image["num_heads"],
            "open_clip",
        ),
        *common.norm("visual.ln_post", "img/encoder/ln_final"),
        *common.projection("visual.proj", "img/head", bias=False, transposed=True),
        Entry("token_embedding.weight", "txt/embedding/embedding"),
        common.reshaped("positional_embedding", "txt/posemb", (1, *text_shape), text_shape),
        *common.encoder_entries(
            "transformer.resblocks", "txt/encoder", text["depth"], text["num_heads"], "open_clip"
        ),
        *common.norm("ln_final", "txt/encoder/ln_final"),
        *common.projection("text_projection", "txt/head", bias=False, transposed=True),
        common.reshaped("logit_scale", "t", (), ()),
    ]


def convert(src: str | Path, out: str | Path, resize: common.NewImageSize | None = None) -> Path:
    """An open_clip release (directory or weights file) -> a vlm_jax checkpoint in `out`."""
    src = Path(src)
    found = sections(read_config(src))
    tensors = common.Tensors(common.load_tensors(src, WEIGHTS), ignore=("attn_mask",))
    layout = entries(found["model"])
    params = common.import_entries(layout, tensors, common.expected_shapes(found["model"]))
    tensors.check_consumed()
    common.check_params(params, found["model"])
    found["model"]["temperature_init"] = math.exp(float(params["t"]))
    meta = {"source": str(src.absolute()), "format": "open_clip"}
    return common.save_converted(out, params, found, meta, resize)
