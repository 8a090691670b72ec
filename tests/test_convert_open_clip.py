"""open_clip CLIP -> vlm_jax parity, offline: small random-weight ViT CLIPs built from model
configs here (OpenAI quick-GELU and LAION GELU layouts), saved as open_clip releases are."""

import json

import numpy as np
import pytest
from test_convert_hf import CLIP_MEAN, CLIP_STD, assert_close, our_outputs

from vlm_jax.convert import __main__ as convert_cli

IMAGE, VOCAB, CONTEXT = 16, 64, 12
# Scaled-down B/32, B/16 and L/14 layouts: same structure, differing patch size, width, heads.
LAYOUTS = {
    "B-32-quickgelu": dict(patch_size=8, width=32, head_width=16, quick_gelu=True),
    "B-16": dict(patch_size=4, width=32, head_width=16, quick_gelu=False),
    "L-14": dict(patch_size=4, width=48, head_width=16, quick_gelu=False),
}


@pytest.fixture(scope="module")
def open_clip():
    from vlm_jax.convert.torch_compat import import_open_clip

    return import_open_clip()


def model_config(layout: dict) -> dict:
    vision = dict(
        image_size=IMAGE,
        layers=2,
        width=layout["width"],
        head_width=layout["head_width"],
        patch_size=layout["patch_size"],
        mlp_ratio=2.0,
    )
    text = dict(context_length=CONTEXT, vocab_size=VOCAB, width=32, heads=2, layers=2)
    return dict(embed_dim=24, vision_cfg=vision, text_cfg=text, quick_gelu=layout["quick_gelu"])


def build_release(open_clip, layout: dict, directory):
    """A random CLIP saved like an open_clip hub release: open_clip_config.json + weights."""
    import torch

    torch.manual_seed(0)
    config = model_config(layout)
    model = open_clip.CLIP(**config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    directory.mkdir()
    torch.save(model.state_dict(), directory / "open_clip_pytorch_model.bin")
    preprocess = {"mean": CLIP_MEAN, "std": CLIP_STD}
    release = {"model_cfg": config, "preprocess_cfg": preprocess}
    (directory / "open_clip_config.json").write_text(json.dumps(release))
    return model


def clip_inputs(seed: int = 0):
    """images in [-1, 1]; tokens [sot] content [eot] 0... with eot the largest id (argmax)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (3, IMAGE, IMAGE, 3)).astype(np.float32)
    tokens = rng.integers(1, VOCAB - 2, (3, CONTEXT)).astype(np.int32)
    for row, length in enumerate([3, CONTEXT, 8]):
        tokens[row, 0], tokens[row, length - 1], tokens[row, length:] = VOCAB - 2, VOCAB - 1, 0
    return images, tokens


def reference(model, images, tokens):
    import torch

    pixels = ((images + 1) / 2 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    pixels = torch.from_numpy(pixels.astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        image_emb = model.encode_image(pixels, normalize=True).numpy()
        text_emb = model.encode_text(torch.from_numpy(tokens.astype(np.int64)), normalize=True)
        scale = model.logit_scale.exp().item()
    text_emb = text_emb.numpy()
    return {"image_emb": image_emb, "text_emb": text_emb, "logits": scale * image_emb @ text_emb.T}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_open_clip_parity(open_clip, name, tmp_path):
    model = build_release(open_clip, LAYOUTS[name], tmp_path / "release")
    convert_cli.main(
        ["--from", "open_clip", "--src", str(tmp_path / "release"), "--out", str(tmp_path / "out")]
    )
    images, tokens = clip_inputs()
    assert_close(our_outputs(tmp_path / "out", images, tokens), reference(model, images, tokens))
