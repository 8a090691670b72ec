"""Image (ViT), text and two-tower models: shapes, config validation, invariances, init values."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm_jax.config import apply_override, load_config
from vlm_jax.models import MODELS, build_model
from vlm_jax.models.flops import image_flops
from vlm_jax.models.layers import MAPHead, MultiHeadAttention, sincos_2d
from vlm_jax.models.text import TextTransformer
from vlm_jax.models.two_tower import image_settings
from vlm_jax.models.vit import ConvStem, ViT

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


@pytest.mark.parametrize("pool", ["gap", "cls", "map"])
def test_image_pools_pool_the_documented_tokens(pool):
    """The tower's output is the head applied to the mean of the encoder's output tokens (gap),
    to token 0, the cls token (cls), or to the MAP head's output, which ignores token order."""
    model = build_model(tiny_config(**{"image.pool": pool}))
    images, tokens = inputs()
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
    assert encoded.shape[1] == (IMAGE // 4) ** 2 + (pool == "cls")
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
    model = build_model(tiny_config(**{"image.stem": "conv"}))
    images, tokens = inputs()
    variables = nn.meta.unbox(init(model, images, tokens))
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
    config = tiny_config(**{"image.stem": "conv", "image.patch_size": 6, "image.image_size": 24})
    with pytest.raises(ValueError, match="stem='conv' needs a power-of-two patch_size >= 2, got 6"):
        build_model(config)


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
        ("image.stem", "cnn", "image.stem='cnn' is not one of: patch, conv"),
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
    sizes = ("width", "depth", "mlp_dim", "num_heads") + (("patch_size",) if "/" in variant else ())
    unset = {f"image.{key}": None for key in sizes}
    config = tiny_config(**{"image.variant": variant, "image.image_size": 224, **unset})
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


@pytest.mark.parametrize("tower", ["image", "text"])
def test_width_not_divisible_by_heads_fails_naming_both(tower):
    config = tiny_config(**{f"{tower}.num_heads": 3})
    with pytest.raises(ValueError, match=rf"model.{tower}: width=32 .* num_heads=3"):
        build_model(config)


def test_attention_with_width_not_divisible_by_heads_fails():
    """Was: head_dim = 32 // 3 = 10, so 3 heads covered 30 of 32 dims without a word."""
    attention = MultiHeadAttention(num_heads=3, attention_impl="xla")
    with pytest.raises(ValueError, match="width=32 is not divisible by num_heads=3"):
        attention.init(jax.random.key(0), jnp.zeros((1, 4, 32)))


def test_unknown_stem_fails():
    """Was: ViT(stem="cnov") built a patch stem."""
    vit = ViT(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4, stem="cnov")
    with pytest.raises(ValueError, match="stem='cnov' is not one of: patch, conv"):
        vit.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


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


def unboxed_params(model, *args):
    return nn.unbox(init(model, *args)["params"])


def restack(params: dict, depth: int) -> dict:
    """Unrolled encoder params (block_0 .. block_{n-1}) -> the scanned layout (blocks [n, ...])."""
    out = {}
    for key, value in params.items():
        if key == "encoder":
            blocks = [value[f"block_{i}"] for i in range(depth)]
            value = {k: v for k, v in value.items() if not k.startswith("block_")}
            value["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
        elif isinstance(value, dict):
            value = restack(value, depth)
        out[key] = value
    return out


def test_scan_equals_unrolled_with_restacked_weights():
    images, tokens = inputs()
    unrolled = build_model(tiny_config())
    params = unboxed_params(unrolled, images, tokens)
    scanned = build_model(tiny_config(scan=True))
    stacked = restack(params, depth=2)
    expected_shapes = jax.tree.map(jnp.shape, unboxed_params(scanned, images, tokens))
    assert jax.tree.map(jnp.shape, stacked) == expected_shapes
    out = jax.jit(unrolled.apply)({"params": params}, images, tokens)
    out_scan = jax.jit(scanned.apply)({"params": stacked}, images, tokens)
    for key in ("image_emb", "text_emb"):
        np.testing.assert_allclose(out_scan[key], out[key], atol=1e-5)


def test_remat_gives_identical_outputs_and_gradients():
    images, tokens = inputs()
    plain = build_model(tiny_config())
    params = unboxed_params(plain, images, tokens)

    def loss(model, p):
        out = model.apply({"params": p}, images, tokens)
        return jnp.sum(out["image_emb"] @ out["text_emb"].T * out["logit_scale"])

    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
    remat = build_model(tiny_config(remat=True))
    value_remat, grads_remat = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
    np.testing.assert_allclose(value_remat, value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_remat, grads)


def test_bfloat16_compute_keeps_float32_params():
    images, tokens = inputs()
    model = build_model(tiny_config(dtype="bfloat16"))
    params = unboxed_params(model, images, tokens)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    out = model.apply({"params": params}, images, tokens)
    reference = build_model(tiny_config()).apply({"params": params}, images, tokens)
    for key in ("image_emb", "text_emb"):
        assert out[key].dtype == jnp.float32
        np.testing.assert_allclose(out[key], reference[key], atol=0.05)


def test_every_param_has_logical_axis_names():
    images, tokens = inputs()
    for config in (tiny_config(), tiny_config(scan=True, **{"image.pool": "cls"})):
        params = init(build_model(config), images, tokens)["params"]
        leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        for leaf in leaves:
            assert isinstance(leaf, nn.Partitioned), leaf
            assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)


@pytest.mark.slow
def test_sharded_equals_unsharded():
    from vlm_jax import sharding

    images, tokens = inputs(batch=4)
    model = build_model(tiny_config())
    variables = init(model, images, tokens)
    expected = model.apply({"params": nn.unbox(variables["params"])}, images, tokens)

    mesh = sharding.build_mesh((2, 2, 2))
    rules = sharding.DEFAULT_RULES
    shardings = sharding.logical_shardings(variables["params"], mesh, rules)
    params = jax.device_put(nn.unbox(variables["params"]), shardings)
    fc1 = params["img"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    batch = sharding.batch_sharding(mesh, 4)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))(
            params,
            jax.device_put(images, batch),
            jax.device_put(tokens, sharding.batch_sharding(mesh, 2)),
        )
    for key in expected:
        np.testing.assert_allclose(out[key], expected[key], atol=1e-5)


def text_tower(**overrides) -> TextTransformer:
    settings = dict(
        vocab_size=50, max_len=12, width=32, depth=2, num_heads=2, mlp_dim=64, out_dim=None
    )
    return TextTransformer(**(settings | overrides), attention_impl="xla")


def token_outputs(model, params, tokens) -> tuple[jax.Array, jax.Array]:
    """(pooled float[B, D], final-LN token outputs float[B, L, D]) of a text tower."""
    pooled, state = model.apply(
        {"params": params},
        tokens,
        capture_intermediates=lambda module, _: module.name == "encoder",
        mutable=["intermediates"],
    )
    return pooled, state["intermediates"]["encoder"]["__call__"][0]


@pytest.mark.parametrize("pool", ["last", "eos", "first", "mean", "map"])
@pytest.mark.parametrize("causal", [False, True])
def test_text_padding_invariance(pool, causal):
    model = text_tower(pool=pool, causal=causal)
    _, tokens = inputs()
    padded = jnp.pad(tokens, ((0, 0), (0, 4)))  # 4 more pads at the end
    params = unboxed_params(model, padded)
    np.testing.assert_allclose(
        model.apply({"params": params}, padded),
        model.apply({"params": params}, tokens),
        atol=1e-5,
    )


def test_attending_to_pads_changes_outputs_when_mask_pad_is_off():
    model = text_tower(pool="first", mask_pad=False)
    _, tokens = inputs()
    padded = jnp.pad(tokens, ((0, 0), (0, 4)))
    params = unboxed_params(model, padded)
    difference = model.apply({"params": params}, padded) - model.apply({"params": params}, tokens)
    assert float(jnp.max(jnp.abs(difference))) > 1e-3


def test_causal_text_ignores_later_tokens():
    model = text_tower(causal=True)
    _, tokens = inputs()
    params = unboxed_params(model, tokens)
    changed = tokens.at[:, 3].set(7)
    _, before = token_outputs(model, params, tokens)
    _, after = token_outputs(model, params, changed)
    np.testing.assert_allclose(after[:, :3], before[:, :3], atol=1e-6)
    assert float(jnp.max(jnp.abs(after[:, 3] - before[:, 3]))) > 1e-3
    bidirectional = text_tower(causal=False)
    _, before = token_outputs(bidirectional, params, tokens)
    _, after = token_outputs(bidirectional, params, changed)
    assert float(jnp.max(jnp.abs(after[:, 0] - before[:, 0]))) > 1e-3


def test_text_pools_select_the_documented_positions():
    tokens = jnp.array([[5, 1, 6, 1, 7, 0, 0, 0], [5, 6, 7, 8, 9, 10, 11, 12]], jnp.int32)
    expected_index = {
        "first": [0, 0],
        "last": [4, 7],
        "last_position": [7, 7],
        "eos": [1, 7],  # first eos; a row without eos falls back to its last non-pad token
    }
    params = unboxed_params(text_tower(), tokens)
    for pool, index in expected_index.items():
        pooled, states = token_outputs(text_tower(pool=pool), params, tokens)
        np.testing.assert_allclose(pooled, states[jnp.arange(2), jnp.array(index)], atol=1e-6)
    pooled, states = token_outputs(text_tower(pool="mean"), params, tokens)
    np.testing.assert_allclose(pooled[0], states[0, :5].mean(0), atol=1e-6)
    np.testing.assert_allclose(pooled[1], states[1].mean(0), atol=1e-6)


def test_attention_impl_propagates():
    images, tokens = inputs()
    model = build_model(tiny_config(attention_impl="xla"))
    variables = init(model, images, tokens)
    auto = build_model(tiny_config(attention_impl="auto")).apply(variables, images, tokens)
    out = model.apply(variables, images, tokens)
    np.testing.assert_allclose(out["text_emb"], auto["text_emb"], atol=1e-6)
    with pytest.raises(ValueError, match="attention_impl='flash' is not one of: auto, cudnn"):
        build_model(tiny_config(attention_impl="flash"))
    cudnn = build_model(tiny_config(attention_impl="cudnn"))
    with pytest.raises(ValueError, match="impl='cudnn' needs a GPU"):
        cudnn.apply(variables, images, tokens)  # the name reached the dispatcher


def test_released_checkpoint_knobs_shape_the_params():
    clip_like = {
        "image.pool": "cls",
        "image.ln_pre": True,
        "image.patch_bias": False,
        "image.head_bias": False,
        "image.activation": "quick_gelu",
        "image.ln_eps": 1e-5,
        "text.head_bias": False,
        "text.pool": "eos",
        "text.causal": True,
    }
    images, tokens = inputs()
    model = build_model(tiny_config(**clip_like))
    params = unboxed_params(model, images, tokens)
    img = params["img"]
    assert "ln_pre" in img and "cls" in img
    assert set(img["embedding"]["conv"]) == {"kernel"}
    assert img["embedding"]["conv"]["kernel"].shape == (4, 4, 3, 32)
    assert set(img["head"]) == {"kernel"} and set(params["txt"]["head"]) == {"kernel"}
    assert img["posemb"].shape == (1, (IMAGE // 4) ** 2 + 1, 32)  # cls + patches
    out = model.apply({"params": params}, images, tokens)
    assert bool(jnp.all(jnp.isfinite(out["image_emb"])))


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "quick_gelu"])
def test_mlp_activation_matches_float64_reference(activation):
    from scipy.special import erf

    from vlm_jax.models.layers import MlpBlock

    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    block = MlpBlock(16, activation=activation)
    params = nn.unbox(block.init(jax.random.key(0), x)["params"])
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = x.astype(np.float64) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    reference_act = {
        "gelu_tanh": lambda u: 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3))),
        "gelu": lambda u: 0.5 * u * (1 + erf(u / np.sqrt(2))),
        "quick_gelu": lambda u: u / (1 + np.exp(-1.702 * u)),
    }[activation]
    expected = reference_act(h) @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    np.testing.assert_allclose(block.apply({"params": params}, x), expected, atol=1e-5)


def test_ln_eps_reaches_the_layer_norms():
    images, tokens = inputs()
    model = build_model(tiny_config())
    params = unboxed_params(model, images, tokens)
    large_eps = build_model(tiny_config(**{"image.ln_eps": 10.0, "text.ln_eps": 10.0}))
    small = model.apply({"params": params}, images, tokens)
    large = large_eps.apply({"params": params}, images, tokens)
    for key in ("image_emb", "text_emb"):
        assert float(jnp.max(jnp.abs(small[key] - large[key]))) > 1e-3


def test_dropout_is_active_only_in_training():
    config = tiny_config(**{"image.dropout": 0.2, "text.dropout": 0.2})
    model = build_model(config)
    images, tokens = inputs()
    variables = init(model, images, tokens)
    a, b = (
        model.apply(variables, images, tokens, train=True, rngs={"dropout": jax.random.key(s)})
        for s in (1, 2)
    )
    assert float(jnp.max(jnp.abs(a["text_emb"] - b["text_emb"]))) > 1e-4
    eval_a, eval_b = (model.apply(variables, images, tokens) for _ in range(2))
    np.testing.assert_array_equal(eval_a["image_emb"], eval_b["image_emb"])


@pytest.mark.parametrize(
    "lm, message",
    [
        (dict(width=96, num_heads=5, head_dim=None), r"model.lm: width=96 .* num_heads=5"),
        (dict(num_kv_heads=3), r"num_heads=4 is not a multiple of num_kv_heads=3"),
    ],
)
def test_lm_head_counts_are_checked_when_the_model_is_built(lm, message):
    config = load_config("configs/vlm_shapes.py")
    config.model.lm.update(lm)
    with pytest.raises(ValueError, match=message):
        build_model(config.model)
