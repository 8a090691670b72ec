"""Image (ViT), text and two-tower models: shapes, config validation, invariances, init values."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm_jax.models import MODELS, build_model
from vlm_jax.models.layers import sincos_2d
from vlm_jax.models.two_tower import image_settings

EMBED = 16
IMAGE = 16
TEXT_LEN = 8


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """A two-tower config small enough to init and run in well under a second."""
    config = ml_collections.ConfigDict(
        dict(
            name="two_tower",
            embed_dim=EMBED,
            dtype="float32",
            attention_impl="xla",
            remat=False,
            scan=False,
            image=dict(
                variant=None,
                width=32,
                depth=2,
                num_heads=2,
                mlp_dim=64,
                patch_size=4,
                image_size=IMAGE,
                posemb="learn",
                pool="map",
                dropout=0.0,
            ),
            text=dict(
                vocab_size=50,
                max_len=TEXT_LEN,
                width=32,
                depth=2,
                num_heads=2,
                mlp_dim=64,
                causal=False,
                pool="last",
                pad_id=0,
                eos_id=1,
                dropout=0.0,
            ),
            temperature_init=10.0,
            bias_init=-10.0,
            learn_temperature=True,
            max_logit_scale=100.0,
        )
    )
    for key, value in overrides.items():
        section = config
        *parents, leaf = key.split(".")
        for part in parents:
            section = section[part]
        section[leaf] = value
    return config


def inputs(batch: int = 2, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """images float32[B, 16, 16, 3] in [-1, 1]; tokens int32[B, 8] with trailing pads."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (batch, IMAGE, IMAGE, 3)).astype(np.float32)
    tokens = rng.integers(2, 50, (batch, TEXT_LEN)).astype(np.int32)
    tokens[:, TEXT_LEN - 3 :] = 0
    tokens[:, TEXT_LEN - 4] = 1  # eos
    return jnp.asarray(images), jnp.asarray(tokens)


def init(model, *args):
    return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, *args)


def test_registry_and_contract_outputs():
    assert "two_tower" in MODELS
    model = build_model(tiny_config())
    images, tokens = inputs()
    variables = init(model, images, tokens)
    assert set(variables["params"]) == {"img", "txt", "t", "b"}
    out = model.apply(variables, images, tokens, train=True, rngs={"dropout": jax.random.key(2)})
    assert out["image_emb"].shape == (2, EMBED) and out["image_emb"].dtype == jnp.float32
    assert out["text_emb"].shape == (2, EMBED) and out["text_emb"].dtype == jnp.float32
    assert out["logit_scale"].shape == () and out["logit_bias"].shape == ()
    np.testing.assert_allclose(jnp.linalg.norm(out["image_emb"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(out["text_emb"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        model.apply(variables, images, method="embed_image"), out["image_emb"], atol=1e-6
    )
    np.testing.assert_allclose(
        model.apply(variables, tokens, method="embed_text"), out["text_emb"], atol=1e-6
    )


def test_siglip_and_clip_temperature_and_bias_init():
    images, tokens = inputs()
    siglip = build_model(tiny_config())
    variables = init(siglip, images, tokens)
    np.testing.assert_allclose(nn.unbox(variables["params"]["t"]), math.log(10.0), rtol=1e-6)
    out = siglip.apply(variables, images, tokens)
    np.testing.assert_allclose(out["logit_scale"], 10.0, rtol=1e-5)
    np.testing.assert_allclose(out["logit_bias"], -10.0)

    clip = build_model(tiny_config(temperature_init=1 / 0.07, bias_init=None))
    variables = init(clip, images, tokens)
    assert "b" not in variables["params"]
    out = clip.apply(variables, images, tokens)
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
    assert float(out["logit_bias"]) == 0.0


def test_logit_scale_is_clipped_and_fixed_temperature_has_no_param():
    images, tokens = inputs()
    model = build_model(tiny_config(temperature_init=1000.0, max_logit_scale=100.0))
    out = model.apply(init(model, images, tokens), images, tokens)
    assert float(out["logit_scale"]) == pytest.approx(100.0)
    fixed = build_model(tiny_config(learn_temperature=False))
    variables = init(fixed, images, tokens)
    assert not {"t", "b"} & set(variables["params"])
    out = fixed.apply(variables, images, tokens)
    np.testing.assert_allclose([out["logit_scale"], out["logit_bias"]], [10.0, -10.0], rtol=1e-5)


@pytest.mark.parametrize("pool", ["map", "gap", "cls"])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_image_pools_and_posembs(pool, posemb):
    model = build_model(tiny_config(**{"image.pool": pool, "image.posemb": posemb}))
    images, tokens = inputs()
    variables = init(model, images, tokens)
    emb = model.apply(variables, images, method="embed_image")
    assert emb.shape == (2, EMBED) and bool(jnp.all(jnp.isfinite(emb)))
    img = variables["params"]["img"]
    assert ("cls" in img) == (pool == "cls")
    assert ("map" in img) == (pool == "map")
    assert ("posemb" in img) == (posemb == "learn")


@pytest.mark.parametrize("pool", ["last", "eos", "first", "mean", "map", "last_position"])
def test_text_pools(pool):
    model = build_model(tiny_config(**{"text.pool": pool}))
    images, tokens = inputs()
    emb = model.apply(init(model, images, tokens), tokens, method="embed_text")
    assert emb.shape == (2, EMBED) and bool(jnp.all(jnp.isfinite(emb)))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("image.pool", "avg", "image.pool='avg' is not one of: cls, gap, map"),
        ("image.posemb", "rope", "posemb='rope' is not one of: learn, sincos2d"),
        ("image.variant", "X/16", "variant='X/16' is not one of: mu, Ti, S"),
        ("text.pool", "cls", "text.pool='cls' is not one of: last, eos"),
        ("text.activation", "relu", "activation='relu' is not one of: gelu_tanh"),
        ("dtype", "float16", "dtype='float16' is not one of: float32, bfloat16"),
        ("name", "two_towers", "model='two_towers' is not one of"),
    ],
)
def test_invalid_config_names_valid_choices(key, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model(tiny_config(**{key: value}))


def test_unknown_key_fails():
    config = tiny_config()
    config.image.widht = 8
    with pytest.raises(ValueError, match="model.image.widht is not a known key"):
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
    config = tiny_config(**{"image.variant": variant, "image.image_size": 224})
    settings = image_settings(config)
    assert {k: settings[k] for k in expected} == expected


def test_sincos_posemb_matches_numpy_reference():
    height, width, dim = 3, 4, 16
    quarter = dim // 4
    omega = 1.0 / 10_000.0 ** (np.arange(quarter, dtype=np.float64) / (quarter - 1))
    rows = []
    for y in range(height):
        for x in range(width):
            rows.append(
                np.concatenate(
                    [np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)]
                )
            )
    np.testing.assert_allclose(sincos_2d(height, width, dim), np.stack(rows), atol=1e-6)
