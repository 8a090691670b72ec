"""HuggingFace CLIPModel / SiglipModel / Siglip2Model <-> vlm_jax two-tower.

A release directory holds `config.json`, weights (`model.safetensors` or `pytorch_model.bin`)
and usually `preprocessor_config.json` (the image mean/std, kept as `image.input_mean/std` so
our [-1, 1] inputs reach the tower as it was trained). Layout per model type:

    CLIP:     cls token, ln_pre, causal text pooled at EOS (argmax id for legacy eos_id 2),
              bias-free projections on both towers, quick_gelu, LN eps 1e-5, no logit bias.
    SigLIP:   no cls, MAP head, no image projection, bidirectional text attending to pads and
              pooled at the last position, text head with bias, gelu_tanh, `t` and `b`.
    SigLIP 2: SigLIP with a Linear patch embedding over (row, col, channel)-flattened patches.

`export` writes our params back as a CLIP or SigLIP release (same names, config, processor);
every mapping is a transpose/reshape, so export -> import reproduces params bit for bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from vlm_jax.convert import common, hf_lm
from vlm_jax.convert.common import Entry, read_json

MODEL_TYPES = ("clip", "siglip", "siglip2")
ACTIVATIONS = {  # HF hidden_act -> ours
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
ARCHITECTURES = {"clip": "CLIPModel", "siglip": "SiglipModel"}


def activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise common.ConversionError(f"hidden_act={name!r} is not one of: {list(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def normalisation(model_type: str, processor: dict) -> tuple[tuple | None, tuple | None]:
    """(input_mean, input_std) for the image section; None where it is our [-1, 1] already."""
    default = (OPENAI_MEAN, OPENAI_STD) if model_type == "clip" else ((0.5,) * 3, (0.5,) * 3)
    mean = tuple(processor.get("image_mean", default[0]))
    std = tuple(processor.get("image_std", default[1]))
    if mean == (0.5,) * 3 and std == (0.5,) * 3:
        return None, None
    return mean, std


def tower(config: dict) -> dict:
    """The size and layout keys both towers take from an HF sub-config."""
    return dict(
        width=config["hidden_size"],
        depth=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        mlp_dim=config["intermediate_size"],
        activation=activation(config.get("hidden_act", "gelu_pytorch_tanh")),
        ln_eps=config.get("layer_norm_eps", 1e-6),
        dropout=0.0,
    )


def sections(config: dict, processor: dict) -> dict[str, dict]:
    """HF config.json (+ preprocessor_config.json) -> our model, tokenizer and loss sections."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise common.ConversionError(
            f"model_type={model_type!r} is not one of: {', '.join(MODEL_TYPES)}"
        )
    vision, text = config["vision_config"], config["text_config"]
    clip = model_type == "clip"
    mean, std = normalisation(model_type, processor)
    num_patches = vision.get("num_patches")
    image_size = vision.get("image_size") or math.isqrt(num_patches) * vision["patch_size"]
    image = tower(vision) | dict(
        variant=None,
        patch_size=vision["patch_size"],
        image_size=image_size,
        posemb="learn",
        pool="cls" if clip else "map",
        ln_pre=clip,
        patch_bias=not clip,
        head=clip,
        head_bias=False,
        input_mean=mean,
        input_std=std,
    )
    vocab_size = text["vocab_size"]
    eos_id = text.get("eos_token_id", 2 if clip else 1)
    if clip and eos_id == 2:  # HF's legacy CLIP configs pool at argmax(id): the EOT token
        eos_id = vocab_size - 1
    text_section = tower(text) | dict(
        vocab_size=vocab_size,
        max_len=text["max_position_embeddings"],
        causal=clip,
        pool="eos" if clip else "last_position",
        pad_id=0 if clip else text.get("pad_token_id", 1),
        eos_id=eos_id,
        mask_pad=clip,
        head_bias=not clip,
    )
    embed_dim = config.get("projection_dim") if clip else text.get("projection_size")
    model = dict(
        name="two_tower",
        embed_dim=embed_dim or text["hidden_size"],
        dtype="float32",
        attention_impl="auto",
        remat=False,
        scan=False,
        image=image,
        text=text_section,
        temperature_init=math.exp(config.get("logit_scale_init_value", math.log(10.0))),
        bias_init=None if clip else -10.0,
        learn_temperature=True,
        max_logit_scale=100.0,
    )
    if clip:
        tokenizer = dict(name="clip_bpe", max_len=text["max_position_embeddings"])
    else:
        tokenizer = dict(
            name="sentencepiece",
            max_len=64,
            model_path="",
            lower=True,
            strip_punctuation=model_type == "siglip",
            pad_id=text_section["pad_id"],
        )
    loss = dict(name="softmax" if clip else "sigmoid", chunked=False, tile_size=1024)
    return {"model": model, "tokenizer": tokenizer, "loss": loss}


def entries(model_type: str, model: dict) -> list[Entry]:
    """Every HF tensor <-> our param of this layout."""
    image, text = model["image"], model["text"]
    clip = model_type == "clip"
    width, patch = image["width"], image["patch_size"]
    grid = image["image_size"] // patch
    tokens = grid * grid + clip
    emb = "vision_model.embeddings"
    out = [
        common.reshaped(
            f"{emb}.position_embedding.weight", "img/posemb", (1, tokens, width), (tokens, width)
        ),
        *common.encoder_entries(
            "vision_model.encoder.layers", "img/encoder", image["depth"], image["num_heads"], "hf"
        ),
        *common.norm("vision_model.post_layernorm", "img/encoder/ln_final"),
        Entry("text_model.embeddings.token_embedding.weight", "txt/embedding/embedding"),
        common.reshaped(
            "text_model.embeddings.position_embedding.weight",
            "txt/posemb",
            (1, text["max_len"], text["width"]),
            (text["max_len"], text["width"]),
        ),
        *common.encoder_entries(
            "text_model.encoder.layers", "txt/encoder", text["depth"], text["num_heads"], "hf"
        ),
        *common.norm("text_model.final_layer_norm", "txt/encoder/ln_final"),
    ]
    if clip:
        out += [
            common.reshaped(f"{emb}.class_embedding", "img/cls", (1, 1, width), (width,)),
            common.conv_patches(f"{emb}.patch_embedding.weight", "img/embedding/conv/kernel"),
            *common.norm("vision_model.pre_layrnorm", "img/ln_pre"),
            *common.projection("visual_projection", "img/head", bias=False),
            *common.projection("text_projection", "txt/head", bias=False),
            common.reshaped("logit_scale", "t", (), ()),
        ]
        return out
    if model_type == "siglip2":  # Linear over (row, col, channel)-flattened patches
        out.append(
            Entry(
                f"{emb}.patch_embedding.weight",
                "img/embedding/conv/kernel",
                lambda w: w.T.reshape(patch, patch, 3, w.shape[0]),
                lambda k: k.reshape(-1, k.shape[-1]).T,
            )
        )
    else:
        out.append(
            common.conv_patches(f"{emb}.patch_embedding.weight", "img/embedding/conv/kernel")
        )
    return [
        *out,
        Entry(f"{emb}.patch_embedding.bias", "img/embedding/conv/bias"),
        *common.map_head_entries("vision_model.head", "img/map", image["num_heads"]),
        *common.projection("text_model.head", "txt/head", bias=True),
        common.reshaped("logit_scale", "t", (), (1,)),
        common.reshaped("logit_bias", "b", (), (1,)),
    ]


def convert(src: str | Path, out: str | Path, resize: common.NewImageSize | None = None) -> Path:
    """An HF release directory -> a vlm_jax checkpoint + config in `out` (decoder LMs:
    hf_lm.convert)."""
    src = Path(src)
    config = read_json(src / "config.json")
    if not config:
        raise FileNotFoundError(f"no config.json in {src}")
    model_type = config.get("model_type")
    if model_type in hf_lm.ARCHITECTURES:
        return hf_lm.convert(src, out, resize)
    if model_type not in MODEL_TYPES:
        supported = (*MODEL_TYPES, *hf_lm.ARCHITECTURES)
        raise common.ConversionError(
            f"model_type={model_type!r} is not one of: {', '.join(supported)}"
        )
    found = sections(config, read_json(src / "preprocessor_config.json"))
    if (src / "spiece.model").is_file():
        found["tokenizer"]["model_path"] = str((src / "spiece.model").absolute())
    tensors = common.Tensors(
        common.load_tensors(src), ignore=("text_model.embeddings.position_ids",)
    )
    layout = entries(config["model_type"], found["model"])
    params = common.import_entries(layout, tensors, common.expected_shapes(found["model"]))
    tensors.check_consumed()
    common.check_params(params, found["model"])
    meta = {"source": str(src.absolute()), "format": "hf", "model_type": config["model_type"]}
    return common.save_converted(out, params, found, meta, resize)


def hf_config(model_type: str, model: dict) -> tuple[dict, dict]:
    """(config.json, preprocessor_config.json) of our model section as an HF release."""
    image, text = model["image"], model["text"]

    def sub(section: dict) -> dict:
        return dict(
            hidden_size=section["width"],
            num_hidden_layers=section["depth"],
            num_attention_heads=section["num_heads"],
            intermediate_size=section["mlp_dim"],
            hidden_act={v: k for k, v in ACTIVATIONS.items() if k != "gelu_new"}[
                section["activation"]
            ],
            layer_norm_eps=section["ln_eps"],
        )

    vision = sub(image) | dict(image_size=image["image_size"], patch_size=image["patch_size"])
    text_config = sub(text) | dict(
        vocab_size=text["vocab_size"],
        max_position_embeddings=text["max_len"],
        eos_token_id=text["eos_id"],
        pad_token_id=text["pad_id"],
    )
    config = dict(
        model_type=model_type,
        architectures=[ARCHITECTURES[model_type]],
        vision_config=vision,
        text_config=text_config,
    )
    if model_type == "clip":
        config |= dict(
            projection_dim=model["embed_dim"],
            logit_scale_init_value=math.log(model["temperature_init"]),
        )
        text_config["bos_token_id"] = text["eos_id"] - 1
    else:
        text_config["projection_size"] = model["embed_dim"]
    mean = image.get("input_mean") or (0.5,) * 3
    std = image.get("input_std") or (0.5,) * 3
    size = image["image_size"]
    processor = dict(
        image_mean=list(mean),
        image_std=list(std),
        do_normalize=True,
        do_resize=True,
        size={"height": size, "width": size},
    )
    return config, processor


def export_type(model: dict) -> str:
    """Which HF model type our model section's layout is (or fail naming the mismatch)."""
    image, text = model["image"], model["text"]
    if image["pool"] == "cls" and text["causal"] and text["pool"] == "eos":
        return "clip"
    if image["pool"] == "map" and not image.get("head", True) and text["pool"] == "last_position":
        return "siglip"
    raise common.ConversionError(
        f"image pool={image['pool']!r} with text pool={text['pool']!r} (causal={text['causal']}) "
        "is neither HF CLIP (cls, causal, eos) nor HF SigLIP (map without head, last_position)"
    )


def export(src: str | Path, out: str | Path, added_rows: str = "drop") -> Path:
    """A converted (or fine-tuned from converted) checkpoint directory -> an HF release
    (`added_rows`: an LM's, hf_lm.export; a two-tower model adds no vocabulary)."""
    hf_lm.check_added_rows(added_rows)
    safetensors_numpy = common.optional_import("safetensors.numpy", "writing an HF release")
    params, config = common.load_converted(src)
    if config.model.name != "two_tower":
        return hf_lm.export(src, out, params, config, added_rows)
    model = config.model.to_dict()
    model_type = export_type(model)
    common.check_params(params, config.model)
    tensors = common.export_entries(entries(model_type, model), params)
    hf, processor = hf_config(model_type, model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.array(v, np.float32, order="C") for k, v in tensors.items()}
    safetensors_numpy.save_file(arrays, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return out
