"""big_vision SigLIP `.npz` -> vlm_jax, offline.

The `.npz` is written here from a random HF SiglipModel, in big_vision's layout (flax names,
kernels [in, out], attention kernels [D, heads, head_dim], MAP head, `t`/`b`), both per-layer
(`encoderblock_{i}`) and scanned (`encoderblock` stacked over depth). Converting it must
reproduce the HF model's embeddings and logits: two independent layouts of the same weights.
"""

import numpy as np
import pytest
from test_convert_hf import assert_close, build_hf, hf_outputs, inputs, our_outputs

from vlm_jax.convert import __main__ as convert_cli
from vlm_jax.convert import common
from vlm_jax.convert.torch_compat import ensure_torchvision

HEADS = 2


@pytest.fixture(scope="module")
def torch():
    ensure_torchvision()
    import torch

    torch.manual_seed(0)
    return torch


def big_vision_block(state: dict, hf: str, heads: int) -> dict[str, np.ndarray]:
    """One HF encoder layer -> big_vision encoderblock params (names relative to the block)."""
    out = {}
    for i, ln in enumerate(("layer_norm1", "layer_norm2")):
        out[f"LayerNorm_{i}/scale"] = state[f"{hf}.{ln}.weight"]
        out[f"LayerNorm_{i}/bias"] = state[f"{hf}.{ln}.bias"]
    attention = "MultiHeadDotProductAttention_0"
    for name in ("query", "key", "value"):
        weight = state[f"{hf}.self_attn.{name[0]}_proj.weight"]
        out[f"{attention}/{name}/kernel"] = weight.T.reshape(weight.shape[1], heads, -1)
        out[f"{attention}/{name}/bias"] = state[f"{hf}.self_attn.{name[0]}_proj.bias"].reshape(
            heads, -1
        )
    weight = state[f"{hf}.self_attn.out_proj.weight"]
    out[f"{attention}/out/kernel"] = weight.T.reshape(heads, -1, weight.shape[0])
    out[f"{attention}/out/bias"] = state[f"{hf}.self_attn.out_proj.bias"]
    for i, fc in enumerate(("fc1", "fc2")):
        out[f"MlpBlock_0/Dense_{i}/kernel"] = state[f"{hf}.mlp.{fc}.weight"].T
        out[f"MlpBlock_0/Dense_{i}/bias"] = state[f"{hf}.mlp.{fc}.bias"]
    return out


def encoder(state: dict, hf: str, ours: str, depth: int, scan: bool) -> dict[str, np.ndarray]:
    blocks = [big_vision_block(state, f"{hf}.layers.{i}", HEADS) for i in range(depth)]
    if scan:
        return {f"{ours}/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]}
    return {f"{ours}/encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()}


def map_head(state: dict) -> dict[str, np.ndarray]:
    hf, out = "vision_model.head", {}
    out["probe"] = state[f"{hf}.probe"]
    width = out["probe"].shape[-1]
    weights = np.split(state[f"{hf}.attention.in_proj_weight"], 3)
    biases = np.split(state[f"{hf}.attention.in_proj_bias"], 3)
    attention = "MultiHeadDotProductAttention_0"
    for name, weight, bias in zip(("query", "key", "value"), weights, biases):
        out[f"{attention}/{name}/kernel"] = weight.T.reshape(width, HEADS, -1)
        out[f"{attention}/{name}/bias"] = bias.reshape(HEADS, -1)
    weight = state[f"{hf}.attention.out_proj.weight"]
    out[f"{attention}/out/kernel"] = weight.T.reshape(HEADS, -1, width)
    out[f"{attention}/out/bias"] = state[f"{hf}.attention.out_proj.bias"]
    out["LayerNorm_0/scale"] = state[f"{hf}.layernorm.weight"]
    out["LayerNorm_0/bias"] = state[f"{hf}.layernorm.bias"]
    for i, fc in enumerate(("fc1", "fc2")):
        out[f"MlpBlock_0/Dense_{i}/kernel"] = state[f"{hf}.mlp.{fc}.weight"].T
        out[f"MlpBlock_0/Dense_{i}/bias"] = state[f"{hf}.mlp.{fc}.bias"]
    return {f"img/MAPHead_0/{k}": v for k, v in out.items()}


def big_vision_npz(model, path, scan: bool) -> None:
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    depth = model.config.vision_config.num_hidden_layers
    params = {
        # HF's conv weight [D, C, p, p] -> flax Conv kernel [p, p, C, D]
        "img/embedding/kernel": state["vision_model.embeddings.patch_embedding.weight"].transpose(
            2, 3, 1, 0
        ),
        "img/embedding/bias": state["vision_model.embeddings.patch_embedding.bias"],
        "img/pos_embedding": state["vision_model.embeddings.position_embedding.weight"][None],
        "img/Transformer/encoder_norm/scale": state["vision_model.post_layernorm.weight"],
        "img/Transformer/encoder_norm/bias": state["vision_model.post_layernorm.bias"],
        "txt/Embed_0/embedding": state["text_model.embeddings.token_embedding.weight"],
        "txt/pos_embedding": state["text_model.embeddings.position_embedding.weight"][None],
        "txt/Encoder_0/encoder_norm/scale": state["text_model.final_layer_norm.weight"],
        "txt/Encoder_0/encoder_norm/bias": state["text_model.final_layer_norm.bias"],
        "txt/head/kernel": state["text_model.head.weight"].T,
        "txt/head/bias": state["text_model.head.bias"],
        "t": state["logit_scale"],
        "b": state["logit_bias"],
    }
    params |= encoder(state, "vision_model.encoder", "img/Transformer", depth, scan)
    params |= encoder(state, "text_model.encoder", "txt/Encoder_0", depth, scan)
    params |= map_head(state)
    np.savez(path, **{f"params/{k}": v for k, v in params.items()})


@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_npz_parity(scan, tmp_path, torch):
    model = build_hf("siglip", torch)
    big_vision_npz(model, tmp_path / "siglip.npz", scan)
    convert_cli.main(
        [
            "--from",
            "big_vision",
            "--src",
            str(tmp_path / "siglip.npz"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    images, tokens = inputs("siglip")
    reference = hf_outputs(model, "siglip", images, tokens, torch)
    assert_close(our_outputs(tmp_path / "o", images, tokens), reference)


def test_big_vision_unexpected_key(tmp_path, torch):
    model = build_hf("siglip", torch)
    big_vision_npz(model, tmp_path / "siglip.npz", scan=False)
    with np.load(tmp_path / "siglip.npz") as data:
        arrays = {k: data[k] for k in data.files}
    np.savez(tmp_path / "bad.npz", **arrays, **{"params/img/extra": np.zeros(2)})
    with pytest.raises(common.ConversionError, match="unexpected key 'img/extra'"):
        convert_cli.main(
            ["--from", "big_vision", "--src", str(tmp_path / "bad.npz"), "--out", str(tmp_path)]
        )
