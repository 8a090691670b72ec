"""HuggingFace decoder LMs (Llama, Mistral, Qwen2/3, Gemma 1/2/3 text) <-> vlm_jax "decoder_lm".

    python -m vlm_jax.convert --from hf --src LLAMA_DIR --out RUN    # config.json model_type
    python -m vlm_jax.convert --to hf --src RUN --out HF_DIR         # an lm (or vlm) run
        [--added_rows drop|keep]     # a VLM's <image> and grown rows: dropped (default) or kept

RUN is an "lm" task run (checkpoints/0 holds the decoder's params at the top level, as an lm
run's), so `--config.init.lm_checkpoint=RUN` initialises a VLM's LM from it. What each family
sets in `model.lm` (every other key keeps the LLaMA default):

    llama:       rope_scaling linear / llama3       mistral: sliding_window on every layer
    qwen2:       qkv_bias (and sliding layers from layer_types)
    qwen3:       qk_norm
    gemma:       norm_offset 1, gelu_tanh (GeGLU), embed_scale
    gemma2:      gemma + post_norms, query_pre_attn_scalar, soft-capping, sliding/full layers
    gemma3_text: gemma2 + qk_norm, rope_local_theta for the sliding layers

A config option we do not implement (rope type yarn, attention_bias, ...) fails naming it and
what is supported; so does a missing or mis-shaped tensor (common.import_entries). Export writes
the same layout back (config.json + model.safetensors + the run's release tokenizer files),
checking that the model section is one that family expresses: parsing the written config must
give back the same `model.lm`, and the written tokenizer must fit the written embedding rows.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from vlm_jax.convert import common
from vlm_jax.convert.common import ConversionError, Entry

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
GEMMAS = ("gemma", "gemma2", "gemma3_text")
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}
# Options whose only supported value is the one given (HF key: supported value).
FIXED_OPTIONS = {
    "attention_bias": False,
    "mlp_bias": False,
    "use_bidirectional_attention": False,
    "partial_rotary_factor": 1.0,
}


def _fail(option: str, value, supported) -> ConversionError:
    return ConversionError(f"{option}={value!r} is not supported; supported: {supported}")


def _check_fixed(config: dict) -> None:
    for option, supported in FIXED_OPTIONS.items():
        value = config.get(option)
        if value is not None and value != supported:
            raise _fail(option, value, supported)


def activation(config: dict, model_type: str) -> str:
    key = "hidden_activation" if config.get("hidden_activation") else "hidden_act"
    default = "gelu_pytorch_tanh" if model_type in GEMMAS else "silu"
    name = config.get(key) or default
    if name not in ACTIVATIONS:
        raise _fail(key, name, ", ".join(ACTIVATIONS))
    return ACTIVATIONS[name]


def _rope_parameters(config: dict) -> tuple[dict, dict | None]:
    """(global layers' RoPE parameters, sliding layers' or None) in transformers 5's
    `rope_parameters` form, also from 4.x's rope_theta / rope_scaling / rope_local_base_freq."""
    params = config.get("rope_parameters")
    if params is None:
        full = dict(config.get("rope_scaling") or {})
        full.setdefault("rope_type", full.pop("type", "default"))
        full["rope_theta"] = config.get("rope_theta", 10_000.0)
        local = config.get("rope_local_base_freq")
        return full, None if local is None else {"rope_type": "default", "rope_theta": local}
    if "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention")
    return params, None


def rope_keys(config: dict) -> dict:
    """Our rope_* keys from the release's RoPE parameters (fails on a type we lack)."""
    full, local = _rope_parameters(config)
    rope_type = full.get("rope_type", full.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise _fail("rope_scaling type", rope_type, ", ".join(ROPE_TYPES))
    keys = dict(rope_theta=float(full.get("rope_theta", 10_000.0)))
    if rope_type != "default":
        keys |= dict(rope_scaling=rope_type, rope_factor=float(full["factor"]))
    if rope_type == "llama3":
        keys |= dict(
            rope_low_freq_factor=float(full["low_freq_factor"]),
            rope_high_freq_factor=float(full["high_freq_factor"]),
            rope_original_max_len=int(full["original_max_position_embeddings"]),
        )
    if local is not None:
        local_type = local.get("rope_type", "default")
        if local_type != "default":
            raise _fail("sliding_attention rope_type", local_type, "default")
        keys["rope_local_theta"] = float(local["rope_theta"])
    return keys


def layer_types(config: dict, model_type: str) -> tuple[str, ...]:
    """Per layer "full" or "sliding": the release's layer_types, else its family's rule."""
    depth = config["num_hidden_layers"]
    if config.get("layer_types"):
        bad = sorted(set(config["layer_types"]) - set(LAYER_TYPES))
        if bad:
            raise _fail("layer_types entry", bad[0], ", ".join(LAYER_TYPES))
        return tuple(LAYER_TYPES[t] for t in config["layer_types"])
    if model_type in ("gemma2", "gemma3_text"):  # 4.x configs: every n-th layer global
        every = 2 if model_type == "gemma2" else config.get("sliding_window_pattern", 6)
        return tuple("sliding" if (i + 1) % every else "full" for i in range(depth))
    if model_type == "mistral" and config.get("sliding_window") is not None:
        return ("sliding",) * depth
    if model_type in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        first = config.get("max_window_layers", depth)
        return tuple("sliding" if i >= first else "full" for i in range(depth))
    return ("full",) * depth


def lm_section(config: dict) -> dict:
    """An HF decoder config.json -> our `model.lm` (every key of decoder.LM)."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise _fail("model_type", model_type, ", ".join(ARCHITECTURES))
    _check_fixed(config)
    gemma, gemma2 = model_type in GEMMAS, model_type in ("gemma2", "gemma3_text")
    heads = config["num_attention_heads"]
    types = layer_types(config, model_type)
    sliding = "sliding" in types
    lm = dict(
        vocab_size=config["vocab_size"],
        width=config["hidden_size"],
        depth=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        mlp_dim=config["intermediate_size"],
        tie_embeddings=bool(config.get("tie_word_embeddings", gemma)),
        dropout=0.0,
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        norm_offset=1.0 if gemma else 0.0,
        mlp_activation=activation(config, model_type),
        embed_scale=gemma,
        query_pre_attn_scalar=_optional_float(config.get("query_pre_attn_scalar"))
        if gemma2
        else None,
        attn_logit_softcap=_optional_float(config.get("attn_logit_softcapping")),
        final_logit_softcap=_optional_float(config.get("final_logit_softcapping")),
        post_norms=gemma2,
        sliding_window=config.get("sliding_window") if sliding else None,
        layer_types=types if sliding and "full" in types else (),
        rope_scaling=None,
        rope_factor=1.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_len=8192,
        rope_local_theta=None,
    )
    rope = rope_keys(config)
    if not sliding:
        rope.pop("rope_local_theta", None)  # no layer uses it
    return lm | rope


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


# The files of a release that make its tokenizer (tokenizer.name="hf", data/release.py).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def tokenizer_section(src: Path, vocab_size: int) -> dict:
    """The run's tokenizer: the release's own (tokenizer.json or tokenizer.model, with its
    special tokens, generation stop ids and chat template), read from the run's copy
    (`copy_tokenizer`); the byte tokenizer for a release without one."""
    if any((src / name).is_file() for name in TOKENIZER_FILES[:2]):
        return dict(name="hf", max_len=256, path=TOKENIZER_DIR)
    logging.warning(
        "%s has neither tokenizer.json nor tokenizer.model; the converted run's tokenizer "
        "section is 'bytes' (%d ids of the LM's %d): override tokenizer.* with the release's",
        src,
        260,
        vocab_size,
    )
    return dict(name="bytes", max_len=256)


TOKENIZER_DIR = "tokenizer"  # under the run directory; made absolute by `copy_tokenizer`


def check_tokenizer(src: Path, section: dict, vocab_size: int) -> None:
    """The release's tokenizer must emit only ids the LM has embedding rows for."""
    if section["name"] != "hf":
        return
    import ml_collections

    from vlm_jax.data import build_tokenizer
    from vlm_jax.models.vocab import check_vocab_rows

    tokenizer = build_tokenizer(ml_collections.ConfigDict(dict(section, path=str(src))))
    try:
        check_vocab_rows(f"{src}: the LM's vocab_size", vocab_size, tokenizer.vocab_size)
    except ValueError as error:  # a bad release: one error line from the CLI
        raise ConversionError(str(error)) from None


def copy_tokenizer(src: Path, out: Path, section: dict) -> dict:
    """Copy the release's tokenizer files into OUT/tokenizer (the run stays usable when the
    release directory moves) -> the section with that absolute path."""
    if section["name"] != "hf":
        return section
    target = Path(out).absolute() / TOKENIZER_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, target / name)
    return dict(section, path=str(target))


def sections(config: dict, src: Path) -> dict[str, dict]:
    """HF config.json -> our model and tokenizer sections (an "lm" task run)."""
    lm = lm_section(config)
    model = dict(name="decoder_lm", dtype="float32", attention_impl="auto", remat=False, lm=lm)
    return {"model": model, "tokenizer": tokenizer_section(src, lm["vocab_size"])}


def entries(model_type: str, lm: dict) -> list[Entry]:
    """Every HF tensor <-> our decoder param (ours: blocks_{i}/..., embedder, norm_final)."""
    heads, kv_heads = lm["num_heads"], lm["num_kv_heads"] or lm["num_heads"]
    out = [
        Entry("model.embed_tokens.weight", "embedder/embedding"),
        Entry("model.norm.weight", "norm_final/scale"),
    ]
    if not lm["tie_embeddings"]:
        out += common.linear("lm_head", "unembed")[:1]
    post_norms = lm["post_norms"]
    norms = {"input_layernorm": "norm_attn"}
    if post_norms:
        norms |= {
            "post_attention_layernorm": "norm_attn_post",
            "pre_feedforward_layernorm": "norm_mlp",
            "post_feedforward_layernorm": "norm_mlp_post",
        }
    else:
        norms["post_attention_layernorm"] = "norm_mlp"
    for i in range(lm["depth"]):
        src, dst = f"model.layers.{i}", f"blocks_{i}"
        out += [
            Entry(f"{src}.{name}.weight", f"{dst}/{ours}/scale") for name, ours in norms.items()
        ]
        for proj, ours, n in (
            ("q", "query", heads),
            ("k", "key", kv_heads),
            ("v", "value", kv_heads),
        ):
            weight, bias = (
                f"{src}.self_attn.{proj}_proj.weight",
                f"{src}.self_attn.{proj}_proj.bias",
            )
            pair = common.heads_in(weight, bias, f"{dst}/attn/{ours}", n)
            out += pair if lm["qkv_bias"] else pair[:1]
        out += common.heads_out(f"{src}.self_attn.o_proj", f"{dst}/attn/out", heads)[:1]
        if lm["qk_norm"]:
            out += [
                Entry(f"{src}.self_attn.q_norm.weight", f"{dst}/attn/norm_query/scale"),
                Entry(f"{src}.self_attn.k_norm.weight", f"{dst}/attn/norm_key/scale"),
            ]
        for name in ("gate", "up", "down"):
            out += common.linear(f"{src}.mlp.{name}_proj", f"{dst}/mlp/{name}")[:1]
    return out


def lm_shapes(lm: dict) -> dict[str, tuple[int, ...]]:
    """{"path": shape} of the decoder `lm` builds (no allocation)."""
    return common.expected_shapes({"name": "decoder_lm", "lm": lm})


def convert(src: str | Path, out: str | Path, resize: common.NewImageSize | None = None) -> Path:
    """An HF decoder LM directory (config.json + weights) -> an "lm" run in `out`."""
    src = Path(src).absolute()
    config = common.read_json(src / "config.json")
    found = sections(config, src)
    lm = found["model"]["lm"]
    tensors = common.Tensors(common.load_tensors(src), ignore=_ignored(lm))
    layout = entries(config["model_type"], lm)
    params = common.import_entries(layout, tensors, lm_shapes(lm))
    tensors.check_consumed()
    common.check_params(params, found["model"])
    meta = {"source": str(src), "format": "hf", "model_type": config["model_type"], "task": "lm"}
    check_tokenizer(src, found["tokenizer"], lm["vocab_size"])
    found["tokenizer"] = copy_tokenizer(src, Path(out), found["tokenizer"])
    return common.save_converted(out, params, found, meta, resize)


def _ignored(lm: dict) -> tuple[str, ...]:
    """Release tensors that carry nothing of ours: a tied head's copy of the embedding."""
    return ("lm_head.weight",) if lm["tie_embeddings"] else ()


def model_type_of(lm: dict) -> str:
    """The HF family whose layout our `model.lm` has (checked by `export`'s round trip)."""
    if lm["norm_offset"] == 1.0:
        if not lm["post_norms"]:
            return "gemma"
        return "gemma3_text" if lm["qk_norm"] else "gemma2"
    if lm["qk_norm"]:
        return "qwen3"
    if lm["qkv_bias"]:
        return "qwen2"
    return "mistral" if lm["sliding_window"] is not None else "llama"


def hf_config(lm: dict, model_type: str) -> dict:
    """Our `model.lm` as the config.json of `model_type` (transformers 5 layout)."""
    depth = lm["depth"]
    types = lm["layer_types"] or (("sliding",) * depth if lm["sliding_window"] else ())
    rope = {"rope_type": lm["rope_scaling"] or "default", "rope_theta": lm["rope_theta"]}
    if lm["rope_scaling"]:
        rope["factor"] = lm["rope_factor"]
    if lm["rope_scaling"] == "llama3":
        rope |= dict(
            low_freq_factor=lm["rope_low_freq_factor"],
            high_freq_factor=lm["rope_high_freq_factor"],
            original_max_position_embeddings=lm["rope_original_max_len"],
        )
    if lm["rope_local_theta"] is not None:
        local = {"rope_type": "default", "rope_theta": lm["rope_local_theta"]}
        rope = {"full_attention": rope, "sliding_attention": local}
    act_key = "hidden_activation" if model_type in ("gemma2", "gemma3_text") else "hidden_act"
    config = {
        "model_type": model_type,
        "architectures": [ARCHITECTURES[model_type]],
        "vocab_size": lm["vocab_size"],
        "hidden_size": lm["width"],
        "intermediate_size": lm["mlp_dim"] or 4 * lm["width"],
        "num_hidden_layers": depth,
        "num_attention_heads": lm["num_heads"],
        "num_key_value_heads": lm["num_kv_heads"] or lm["num_heads"],
        "head_dim": lm["head_dim"] or lm["width"] // lm["num_heads"],
        "rms_norm_eps": lm["norm_eps"],
        "tie_word_embeddings": lm["tie_embeddings"],
        act_key: {v: k for k, v in ACTIVATIONS.items()}[lm["mlp_activation"]],
        "rope_parameters": rope,
        "max_position_embeddings": max(8192, lm["rope_original_max_len"]),
        "attention_bias": False,
        "sliding_window": lm["sliding_window"],
    }
    if types and model_type != "mistral":  # Mistral: sliding_window alone, every layer
        config["layer_types"] = [{v: k for k, v in LAYER_TYPES.items()}[t] for t in types]
        config["use_sliding_window"] = "sliding" in types
    if model_type in ("gemma2", "gemma3_text"):
        config |= {
            "query_pre_attn_scalar": _int_if_whole(
                lm["query_pre_attn_scalar"] or config["head_dim"]
            ),
            "attn_logit_softcapping": lm["attn_logit_softcap"],
            "final_logit_softcapping": lm["final_logit_softcap"],
        }
    return config


def _int_if_whole(value: float) -> float | int:
    """transformers types some float-valued options as int (query_pre_attn_scalar)."""
    return int(value) if float(value).is_integer() else value


def _check_expressible(lm: dict, config: dict) -> None:
    """Fail naming the first key of `lm` that the HF config cannot carry."""
    back = lm_section(config)
    for key, value in lm.items():
        ours = tuple(value) if isinstance(value, list) else value
        theirs = back.get(key)
        theirs = tuple(theirs) if isinstance(theirs, list) else theirs
        if key in ("mlp_dim", "head_dim", "num_kv_heads") and ours is None:
            continue  # None: derived, and the config holds the derived value
        if ours != theirs:
            raise ConversionError(
                f"model.lm.{key}={value!r} has no place in an HF {config['model_type']!r} "
                f"config (it would load as {theirs!r})"
            )


def lm_part(params: common.Params, model: dict) -> tuple[common.Params, dict]:
    """(decoder params, model.lm) of an lm run, or of a VLM run's LM (without xattn blocks)."""
    if model["name"] == "decoder_lm":
        return params, model["lm"]
    if model["name"] == "vlm":
        xattn = sorted(k for k in params["lm"] if k.startswith("xattn"))
        if xattn:
            raise ConversionError(
                f"the VLM's LM has gated cross-attention blocks ({xattn[0]}, ...), which an HF "
                "decoder LM does not hold; export a VLM with fusion 'early' or 'none'"
            )
        return params["lm"], model["lm"]
    raise ConversionError(f"model.name={model['name']!r}: an HF LM export needs decoder_lm or vlm")


ADDED_ROWS = ("drop", "keep")  # `convert --to hf --added_rows`; drop is the default


def check_added_rows(added_rows: str) -> None:
    if added_rows not in ADDED_ROWS:
        raise ValueError(f"added_rows={added_rows!r} is not one of: {', '.join(ADDED_ROWS)}")


def release_rows(config, rows: int) -> int:
    """The embedding rows of the release a run grew from: a VLM's `config.init.lm_checkpoint`'s
    model.lm.vocab_size (its init added the rows past it, train/tasks/vlm.py); `rows`, the run's
    own, for a run that grew none (an lm run, or a VLM whose LM did not come from one)."""
    checkpoint = config.get("init", {}).get("lm_checkpoint", "")
    if config.model.name != "vlm" or not checkpoint:
        return rows
    directory = Path(checkpoint)
    directory = directory.parent if directory.name == "checkpoints" else directory
    lm = common.read_json(directory / "config.json").get("model", {}).get("lm", {})
    if "vocab_size" not in lm:
        raise ConversionError(
            f"--added_rows drop: config.init.lm_checkpoint={checkpoint!r} has no config.json "
            "with model.lm.vocab_size (the release's rows to keep); export with --added_rows keep"
        )
    if not 0 < lm["vocab_size"] <= rows:
        raise ConversionError(
            f"--added_rows drop: the init LM's vocab_size={lm['vocab_size']} is not in "
            f"[1, {rows}] (this run's embedding rows)"
        )
    return lm["vocab_size"]


def added_tokens(config) -> dict[str, int]:
    """{token: id} of the tokens the run's task added past its release tokenizer's ids
    (a VLM's `<image>`); {} for a tokenizer that is not a release's ("hf")."""
    from vlm_jax.data import build_tokenizer
    from vlm_jax.data.vqa import run_tokenizer

    if config.tokenizer.name != "hf":
        return {}
    release_ids = build_tokenizer(config.tokenizer).vocab_size
    ours = run_tokenizer(config).special_tokens
    return {token: i for token, i in sorted(ours.items(), key=lambda kv: kv[1]) if i >= release_ids}


def _added_token(token: str) -> dict:
    """An added special token as tokenizer.json and tokenizer_config.json write one."""
    return dict(
        content=token, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True
    )


def write_tokenizer(config, out: Path, added: dict[str, int]) -> None:
    """The run's release tokenizer files into `out`, with `added` ({token: id}) as added special
    tokens: in tokenizer.json's added_tokens, and in tokenizer_config.json's
    added_tokens_decoder where the release keeps its added tokens there (a tokenizer.model
    release always does)."""
    from vlm_jax.data.release import read_release

    if config.tokenizer.name != "hf":
        logging.warning(
            "the run's tokenizer is %r, not a release's ('hf'): %s gets no tokenizer files",
            config.tokenizer.name,
            out,
        )
        return
    release = Path(config.tokenizer.path)
    for name in TOKENIZER_FILES:
        if (release / name).is_file():
            shutil.copyfile(release / name, out / name)
    if not added:
        return
    if (out / "tokenizer.json").is_file():
        tokenizer = common.read_json(out / "tokenizer.json")
        tokenizer.setdefault("added_tokens", []).extend(
            dict(id=i, **_added_token(t)) for t, i in added.items()
        )
        (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    tokenizer_config = read_release(release).config  # special_tokens_map.json merged in
    if "added_tokens_decoder" in tokenizer_config or not (out / "tokenizer.json").is_file():
        decoder = tokenizer_config.setdefault("added_tokens_decoder", {})
        decoder |= {str(i): _added_token(t) for t, i in added.items()}
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def check_exported_tokenizer(out: Path, rows: int, added: dict[str, int]) -> None:
    """The written tokenizer must give the added tokens their run ids and emit only ids the
    written embedding has rows for."""
    import ml_collections

    from vlm_jax.data import build_tokenizer
    from vlm_jax.models.vocab import check_vocab_rows

    if not any((out / name).is_file() for name in TOKENIZER_FILES[:2]):
        return
    tokenizer = build_tokenizer(ml_collections.ConfigDict(dict(name="hf", path=str(out))))
    for token, token_id in added.items():
        if tokenizer.vocabulary_id(token) != token_id:
            raise ConversionError(
                f"{out}: the exported tokenizer gives {token!r} id "
                f"{tokenizer.vocabulary_id(token)}, the run {token_id}"
            )
    try:
        check_vocab_rows(
            f"{out}: vocab_size", rows, tokenizer.vocab_size, "export with --added_rows keep"
        )
    except ValueError as error:
        raise ConversionError(str(error)) from None


def export(src: str | Path, out: str | Path, params, config, added_rows: str = "drop") -> Path:
    """An lm run (or a VLM run's LM) -> an HF decoder release in `out`: config.json,
    model.safetensors and the run's release tokenizer.

    `added_rows` is what happens to the vocabulary the run added to its release (a VLM's
    `<image>` and the rows its init grew, `release_rows`): "drop" (the default) writes the
    release's layout back, its vocab_size, embedding rows and tokenizer, so the export is a
    drop-in for the release it came from (the added rows only ever met image positions, whose
    embeddings the visual tokens replace); "keep" writes every row and the tokenizer with the
    added tokens (a release that ships them, as HF's LLaVA checkpoints do)."""
    from vlm_jax.models import lora
    from vlm_jax.models.decoder import LM
    from vlm_jax.models.vocab import drop_vocab, vocab_rows
    from vlm_jax.schema import resolve

    check_added_rows(added_rows)
    safetensors_numpy = common.optional_import("safetensors.numpy", "writing an HF release")
    # A LoRA run exports its adapted model: the adapters merged into their kernels.
    params = lora.merged(params, lora.lora_section(config.get("optim", {})))
    params, lm = lm_part(params, config.model.to_dict())
    if added_rows == "drop":
        rows = release_rows(config, vocab_rows(params))
        params, lm, added = drop_vocab(params, rows), dict(lm, vocab_size=rows), {}
    else:
        added = added_tokens(config)
    lm = resolve("model.lm", lm, LM).to_dict()
    model_type = model_type_of(lm)
    hf = hf_config(lm, model_type)
    _check_expressible(lm, hf)
    common.check_params(params, {"name": "decoder_lm", "lm": lm})
    tensors = common.export_entries(entries(model_type, lm), params)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.array(v, np.float32, order="C") for k, v in tensors.items()}
    safetensors_numpy.save_file(arrays, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    write_tokenizer(config, out, added)
    check_exported_tokenizer(out, lm["vocab_size"], added)
    return out
