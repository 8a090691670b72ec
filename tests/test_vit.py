"""The image tower (models.vit): pools, position embeddings, stems, size variants."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    TOWER_EMBED,
    TOWER_IMAGE,
    init_model,
    tiny_two_tower_config,
    tower_inputs,
    unboxed_params,
)

from vlm_jax.config import apply_override, load_config
from vlm_jax.models import build_model
from vlm_jax.models.flops import image_flops
from vlm_jax.models.layers import MAPHead
from vlm_jax.models.two_tower import image_settings
from vlm_jax.models.vit import ConvStem, ViT


@pytest.mark.parametrize("pool", ["map", "gap", "cls"])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_image_pools_and_posembs(pool, posemb):
    model = build_model(tiny_two_tower_config(**{"image.pool": pool, "image.posemb": posemb}))
    images, tokens = tower_inputs()
    variables = init_model(model, images, tokens)
    emb = model.apply(variables, images, method="embed_image")
    assert emb.shape == (2, TOWER_EMBED) and bool(jnp.all(jnp.isfinite(emb)))
    img = variables["params"]["img"]
    assert ("cls" in img) == (pool == "cls")
    assert ("map" in img) == (pool == "map")
    assert ("posemb" in img) == (posemb == "learn")


@pytest.mark.parametrize("pool", ["gap", "cls", "map"])
def test_image_pools_pool_the_documented_tokens(pool):
    """The tower's output is the head applied to the mean of the encoder's output tokens (gap),
    to token 0, the cls token (cls), or to the MAP head's output, which ignores token order."""
    model = build_model(tiny_two_tower_config(**{"image.pool": pool}))
    images, tokens = tower_inputs()
    params = unboxed_params(model, images, tokens)
    head = params["img"]["head"]
    head["bias"] = jnp.asarray(np.random.default_rng(0).normal(size=head["bias"].shape))
    _, state = model.apply(
        {"params": params},
        images,
        method="embed_image",
        capture_intermediates=lambda module, _: module.name in ("img", "encoder", "map"),
        mutable=["intermediates"],
    )
    captured = state["intermediates"]["img"]
    output = captured["__call__"][0]  # float[B, E], before the unit-norm
    encoded = np.asarray(captured["encoder"]["__call__"][0], np.float64)  # float[B, T, D]
    assert encoded.shape[1] == (TOWER_IMAGE // 4) ** 2 + (pool == "cls")
    if pool == "gap":
        pooled = encoded.mean(axis=1)
    elif pool == "cls":
        pooled = encoded[:, 0]
    else:
        pooled = np.asarray(captured["map"]["__call__"][0], np.float64)
        map_head = MAPHead(model.img.num_heads, model.img.mlp_dim, attention_impl="xla")
        order = np.random.default_rng(1).permutation(encoded.shape[1])
        shuffled = jnp.asarray(encoded[:, order], jnp.float32)
        np.testing.assert_allclose(
            map_head.apply({"params": params["img"]["map"]}, shuffled), pooled, atol=1e-5
        )
    expected = pooled @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"])
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)


def test_conv_stem_matches_numpy_reference():
    """stem='conv': stride-2 3x3 SAME convs + GELU with doubling channels, then a 1x1 conv; the
    token grid is the patch stem's (patch 4 on 16 px -> 4 x 4 tokens)."""
    model = build_model(tiny_two_tower_config(**{"image.stem": "conv"}))
    images, tokens = tower_inputs()
    variables = nn.meta.unbox(init_model(model, images, tokens))
    stem = variables["params"]["img"]["stem"]
    assert "embedding" not in variables["params"]["img"]
    assert [stem[f"conv{i}"]["kernel"].shape for i in range(2)] == [(3, 3, 3, 16), (3, 3, 16, 32)]
    tokens_out = ConvStem(32, 4).apply({"params": stem}, images)
    x = np.asarray(images, np.float64)
    for i in range(2):
        x = gelu_tanh(conv2d_same_stride2(x, stem[f"conv{i}"]["kernel"]) + stem[f"conv{i}"]["bias"])
    x = x @ np.asarray(stem["proj"]["kernel"], np.float64)[0, 0] + stem["proj"]["bias"]
    np.testing.assert_allclose(tokens_out, x.reshape(2, 16, 32), rtol=1e-4, atol=1e-5)


def conv2d_same_stride2(x: np.ndarray, kernel) -> np.ndarray:
    """x: [B, H, W, C], kernel: [3, 3, C, F] -> [B, H/2, W/2, F]; SAME pads 0 before, 1 after."""
    kernel = np.asarray(kernel, np.float64)
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    height, width = x.shape[1] // 2, x.shape[2] // 2
    out = np.zeros((x.shape[0], height, width, kernel.shape[-1]))
    for dy in range(3):
        for dx in range(3):
            window = padded[:, dy : dy + 2 * height : 2, dx : dx + 2 * width : 2]  # [B, h, w, C]
            out += window @ kernel[dy, dx]
    return out


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def test_conv_stem_needs_a_power_of_two_patch():
    config = tiny_two_tower_config(
        **{"image.stem": "conv", "image.patch_size": 6, "image.image_size": 24}
    )
    with pytest.raises(ValueError, match="stem='conv' needs a power-of-two patch_size >= 2, got 6"):
        build_model(config)


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("B/16", dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)),
        ("So400m/14", dict(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14)),
        ("L/14", dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, patch_size=14)),
        ("mu", dict(width=32, depth=1, mlp_dim=128, num_heads=2, patch_size=4)),
        ("g/14", dict(width=1408, depth=40, mlp_dim=6144, num_heads=16, patch_size=14)),
    ],
)
def test_variants(variant, expected):
    sizes = ("width", "depth", "mlp_dim", "num_heads") + (("patch_size",) if "/" in variant else ())
    unset = {f"image.{key}": None for key in sizes}
    config = tiny_two_tower_config(**{"image.variant": variant, "image.image_size": 224, **unset})
    settings = image_settings(config)
    assert {k: settings[k] for k in expected} == expected


def test_a_size_that_conflicts_with_the_variant_fails_naming_both():
    """`--config.model.image.depth=24` on a "B/16" config used to build depth 12 silently."""
    config = load_config("configs/siglip_b16.py")
    assert image_settings(config.model)["depth"] == 12  # explicit sizes that agree are fine
    apply_override(config, "model.image.depth", "24")
    with pytest.raises(ValueError, match=r"depth=24 conflicts with model.image.variant='B/16'.*12"):
        build_model(config.model)
    with pytest.raises(ValueError, match="depth=24 conflicts"):
        image_flops(config.model)  # the FLOP count reads the same settings
    apply_override(config, "model.image.variant", "")
    assert build_model(config.model).img.depth == 24
    assert image_settings(config.model)["depth"] == 24


def test_unknown_stem_fails():
    """Was: ViT(stem="cnov") built a patch stem."""
    vit = ViT(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4, stem="cnov")
    with pytest.raises(ValueError, match="stem='cnov' is not one of: patch, conv"):
        vit.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
