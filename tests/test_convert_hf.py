"""HuggingFace CLIP / SigLIP / SigLIP 2 -> vlm_jax parity, offline, and export round trips.

Small random-weight torch models are built from configs here and saved as a release would be
(safetensors or pytorch_model.bin with config.json and preprocessor_config.json); the converted
models must reproduce their image and text embeddings and logits to 1e-4 relative error.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from compile_cache import compilation_cache  # noqa: F401 (autouse: compiles go through the cache)

from vlm_jax.convert import __main__ as convert_cli
from vlm_jax.convert import common, hf
from vlm_jax.convert.torch_compat import ensure_torchvision

VOCAB, MAX_LEN, IMAGE, PATCH = 64, 12, 16, 4
TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def torch():
    ensure_torchvision()
    import torch

    torch.manual_seed(0)
    return torch


def perturb(model, torch) -> None:
    """Random values in every tensor (HF initialises LayerNorms to 1/0 and biases to 0, which
    would hide transposed or swapped weights)."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))


def build_hf(kind: str, torch, vocab_size: int = VOCAB):
    import transformers

    text = dict(TOWER, vocab_size=vocab_size, max_position_embeddings=MAX_LEN)
    vision = dict(TOWER, image_size=IMAGE, patch_size=PATCH)
    if kind == "clip":
        text |= dict(bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0)
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
        model = transformers.CLIPModel(config)
    elif kind == "siglip":
        config = transformers.SiglipConfig(text_config=text, vision_config=vision)
        model = transformers.SiglipModel(config)
    else:
        vision = dict(TOWER, patch_size=PATCH, num_patches=(IMAGE // PATCH) ** 2)
        config = transformers.Siglip2Config(text_config=text, vision_config=vision)
        model = transformers.Siglip2Model(config)
    perturb(model, torch)
    return model.eval()


def save_release(model, directory, kind: str, safetensors: bool = True) -> None:
    model.save_pretrained(directory, safe_serialization=safetensors)
    mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else ([0.5] * 3, [0.5] * 3)
    processor = {"image_mean": mean, "image_std": std, "do_normalize": True}
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))


def inputs(kind: str, seed: int = 0):
    """images float32[B, S, S, 3] in [-1, 1]; tokens int32[B, L] in the source's layout."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (3, IMAGE, IMAGE, 3)).astype(np.float32)
    tokens = rng.integers(2, VOCAB - 2, (3, MAX_LEN)).astype(np.int32)
    lengths = [4, MAX_LEN, 7]
    for row, length in enumerate(lengths):
        if kind == "clip":  # [bos] content eos, pads 0
            tokens[row, 0] = VOCAB - 2
            tokens[row, length - 1] = VOCAB - 1
            tokens[row, length:] = 0
        else:  # SigLIP: content eos, padded with eos (id 1)
            tokens[row, length - 1 :] = 1
    return images, tokens


def hf_outputs(model, kind: str, images, tokens, torch) -> dict[str, np.ndarray]:
    mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else ([0.5] * 3, [0.5] * 3)
    pixels = ((images + 1) / 2 - np.asarray(mean)) / np.asarray(std)  # what HF's processor feeds
    pixels = torch.from_numpy(pixels.astype(np.float32)).permute(0, 3, 1, 2)
    feed = {"input_ids": torch.from_numpy(tokens.astype(np.int64))}
    if kind == "siglip2":  # flattened (row, col, channel) patches and their grid
        grid = IMAGE // PATCH
        patches = pixels.reshape(3, 3, grid, PATCH, grid, PATCH).permute(0, 2, 4, 3, 5, 1)
        feed |= dict(
            pixel_values=patches.reshape(3, grid * grid, -1),
            pixel_attention_mask=torch.ones(3, grid * grid, dtype=torch.long),
            spatial_shapes=torch.tensor([[grid, grid]] * 3),
        )
    else:
        feed["pixel_values"] = pixels
    with torch.no_grad():
        out = model(**feed)
    return {
        "image_emb": out.image_embeds.numpy(),
        "text_emb": out.text_embeds.numpy(),
        "logits": out.logits_per_image.numpy(),
    }


def our_outputs(out_dir, images, tokens) -> dict[str, np.ndarray]:
    from vlm_jax.models import build_model

    params, config = common.load_converted(out_dir)
    model = build_model(config.model)
    out = model.apply({"params": params}, jnp.asarray(images), jnp.asarray(tokens))
    logits = out["logit_scale"] * out["image_emb"] @ out["text_emb"].T + out["logit_bias"]
    return {
        "image_emb": np.asarray(out["image_emb"]),
        "text_emb": np.asarray(out["text_emb"]),
        "logits": np.asarray(logits),
    }


def assert_close(ours: dict, reference: dict) -> None:
    for key, expected in reference.items():
        error = np.abs(ours[key] - expected).max() / np.abs(expected).max()
        assert error <= 1e-4, f"{key}: relative error {error:.2e}"


@pytest.mark.parametrize(
    "kind,safetensors", [("clip", True), ("clip", False), ("siglip", True), ("siglip2", True)]
)
def test_hf_parity(kind, safetensors, tmp_path, torch):
    model = build_hf(kind, torch)
    save_release(model, tmp_path / "release", kind, safetensors)
    convert_cli.main(
        ["--from", "hf", "--src", str(tmp_path / "release"), "--out", str(tmp_path / "out")]
    )
    images, tokens = inputs(kind)
    assert_close(
        our_outputs(tmp_path / "out", images, tokens),
        hf_outputs(model, kind, images, tokens, torch),
    )


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_export_round_trip(kind, tmp_path, torch):
    import transformers

    model = build_hf(kind, torch)
    save_release(model, tmp_path / "release", kind)
    hf.convert(tmp_path / "release", tmp_path / "ours")
    convert_cli.main(
        ["--to", "hf", "--src", str(tmp_path / "ours"), "--out", str(tmp_path / "exported")]
    )
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "exported").eval()
    for name, tensor in model.state_dict().items():  # the exported release equals the original
        np.testing.assert_array_equal(
            reloaded.state_dict()[name].numpy(), tensor.numpy(), err_msg=name
        )
    hf.convert(tmp_path / "exported", tmp_path / "again")
    first, config = common.load_converted(tmp_path / "ours")
    second, config_again = common.load_converted(tmp_path / "again")
    assert config_again.model.to_dict() == config.model.to_dict()
    for path, value in common.flatten(first).items():  # and converting it again is exact
        np.testing.assert_array_equal(common.flatten(second)[path], value, err_msg=path)


def test_missing_and_unexpected_keys_are_named(tmp_path, torch):
    from safetensors.torch import load_file, save_file

    model = build_hf("siglip", torch)
    save_release(model, tmp_path / "release", "siglip")
    weights = tmp_path / "release" / "model.safetensors"
    state = load_file(weights)
    del state["text_model.head.bias"]
    save_file(state, weights)
    with pytest.raises(common.ConversionError, match="missing key 'text_model.head.bias'"):
        hf.convert(tmp_path / "release", tmp_path / "out")
    state["text_model.head.bias"] = torch.zeros(32)
    state["vision_model.extra.weight"] = torch.zeros(3)
    save_file(state, weights)
    with pytest.raises(common.ConversionError, match="unexpected key 'vision_model.extra.weight'"):
        hf.convert(tmp_path / "release", tmp_path / "out")
    del state["vision_model.extra.weight"]
    state["text_model.head.weight"] = torch.zeros(32, 31)
    save_file(state, weights)
    with pytest.raises(common.ConversionError, match="text_model.head.weight.*shape"):
        hf.convert(tmp_path / "release", tmp_path / "out")


@pytest.mark.slow
def test_converted_checkpoint_is_evaluated_and_fine_tuned(tmp_path, torch):
    """The converter's output is an init `train` loads (then evaluates: same params path as
    `evaluate`, which reads checkpoints through the same Checkpointer.restore_params)."""
    from vlm_jax.config import apply_override, load_config
    from vlm_jax.train.trainer import train

    save_release(build_hf("siglip", torch, vocab_size=300), tmp_path / "release", "siglip")
    hf.convert(tmp_path / "release", tmp_path / "ours")
    overrides = {  # a byte tokenizer fits the tiny vocabulary; a small shapes world
        "model.text.pad_id": "0",  # the byte tokenizer's (SigLIP attends to pads anyway)
        "data.image_size": str(IMAGE),
        "data.val_size": "16",
        "data.zeroshot_size": "16",
        "train.batch_size": "8",
        "train.total_steps": "1",
        "train.async_checkpoint": "false",
        "eval.batch_size": "16",
        "init.checkpoint": str(tmp_path / "ours"),
    }
    config = load_config(str(tmp_path / "ours" / "config.py"))
    config.tokenizer = {"name": "bytes", "max_len": MAX_LEN}
    for key, value in overrides.items():
        apply_override(config, key, value)
    config.optim.lr = 0.0  # one step that leaves the weights as loaded
    config.optim.weight_decay = 0.0
    results = train(config, tmp_path / "finetune")
    assert 0 <= results["eval/zeroshot_top1"] <= 1
    loaded, _ = common.load_converted(tmp_path / "ours")
    tuned, _ = common.load_converted(tmp_path / "finetune")
    for path, value in common.flatten(loaded).items():
        np.testing.assert_allclose(common.flatten(tuned)[path], value, err_msg=path)
