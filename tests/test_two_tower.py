"""The two-tower model (models.two_tower): its outputs, init values, config validation and
the knobs (scan, remat, dtype, attention, sharding, released-checkpoint layouts) it passes down."""

import math

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

from vlm_jax.models import MODELS, build_model


def test_registry_and_contract_outputs():
    assert "two_tower" in MODELS
    model = build_model(tiny_two_tower_config())
    images, tokens = tower_inputs()
    variables = init_model(model, images, tokens)
    assert set(variables["params"]) == {"img", "txt", "t", "b"}
    out = model.apply(variables, images, tokens, train=True, rngs={"dropout": jax.random.key(2)})
    assert out["image_emb"].shape == (2, TOWER_EMBED) and out["image_emb"].dtype == jnp.float32
    assert out["text_emb"].shape == (2, TOWER_EMBED) and out["text_emb"].dtype == jnp.float32
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
    images, tokens = tower_inputs()
    siglip = build_model(tiny_two_tower_config())
    variables = init_model(siglip, images, tokens)
    np.testing.assert_allclose(nn.unbox(variables["params"]["t"]), math.log(10.0), rtol=1e-6)
    out = siglip.apply(variables, images, tokens)
    np.testing.assert_allclose(out["logit_scale"], 10.0, rtol=1e-5)
    np.testing.assert_allclose(out["logit_bias"], -10.0)

    clip = build_model(tiny_two_tower_config(temperature_init=1 / 0.07, bias_init=None))
    variables = init_model(clip, images, tokens)
    assert "b" not in variables["params"]
    out = clip.apply(variables, images, tokens)
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
    assert float(out["logit_bias"]) == 0.0


def test_logit_scale_is_clipped_and_fixed_temperature_has_no_param():
    images, tokens = tower_inputs()
    model = build_model(tiny_two_tower_config(temperature_init=1000.0, max_logit_scale=100.0))
    out = model.apply(init_model(model, images, tokens), images, tokens)
    assert float(out["logit_scale"]) == pytest.approx(100.0)
    fixed = build_model(tiny_two_tower_config(learn_temperature=False))
    variables = init_model(fixed, images, tokens)
    assert not {"t", "b"} & set(variables["params"])
    out = fixed.apply(variables, images, tokens)
    np.testing.assert_allclose([out["logit_scale"], out["logit_bias"]], [10.0, -10.0], rtol=1e-5)


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
        build_model(tiny_two_tower_config(**{key: value}))


def test_unknown_key_fails():
    config = tiny_two_tower_config()
    config.image.widht = 8
    with pytest.raises(ValueError, match="model.image.widht is not a known key"):
        build_model(config)


@pytest.mark.parametrize("tower", ["image", "text"])
def test_width_not_divisible_by_heads_fails_naming_both(tower):
    config = tiny_two_tower_config(**{f"{tower}.num_heads": 3})
    with pytest.raises(ValueError, match=rf"model.{tower}: width=32 .* num_heads=3"):
        build_model(config)


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
    images, tokens = tower_inputs()
    unrolled = build_model(tiny_two_tower_config())
    params = unboxed_params(unrolled, images, tokens)
    scanned = build_model(tiny_two_tower_config(scan=True))
    stacked = restack(params, depth=2)
    expected_shapes = jax.tree.map(jnp.shape, unboxed_params(scanned, images, tokens))
    assert jax.tree.map(jnp.shape, stacked) == expected_shapes
    out = jax.jit(unrolled.apply)({"params": params}, images, tokens)
    out_scan = jax.jit(scanned.apply)({"params": stacked}, images, tokens)
    for key in ("image_emb", "text_emb"):
        np.testing.assert_allclose(out_scan[key], out[key], atol=1e-5)


def test_remat_gives_identical_outputs_and_gradients():
    images, tokens = tower_inputs()
    plain = build_model(tiny_two_tower_config())
    params = unboxed_params(plain, images, tokens)

    def loss(model, p):
        out = model.apply({"params": p}, images, tokens)
        return jnp.sum(out["image_emb"] @ out["text_emb"].T * out["logit_scale"])

    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
    remat = build_model(tiny_two_tower_config(remat=True))
    value_remat, grads_remat = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
    np.testing.assert_allclose(value_remat, value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_remat, grads)


def test_bfloat16_compute_keeps_float32_params():
    images, tokens = tower_inputs()
    model = build_model(tiny_two_tower_config(dtype="bfloat16"))
    params = unboxed_params(model, images, tokens)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    out = model.apply({"params": params}, images, tokens)
    reference = build_model(tiny_two_tower_config()).apply({"params": params}, images, tokens)
    for key in ("image_emb", "text_emb"):
        assert out[key].dtype == jnp.float32
        np.testing.assert_allclose(out[key], reference[key], atol=0.05)


def test_every_param_has_logical_axis_names():
    images, tokens = tower_inputs()
    for config in (
        tiny_two_tower_config(),
        tiny_two_tower_config(scan=True, **{"image.pool": "cls"}),
    ):
        params = init_model(build_model(config), images, tokens)["params"]
        leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        for leaf in leaves:
            assert isinstance(leaf, nn.Partitioned), leaf
            assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)


@pytest.mark.slow
def test_sharded_equals_unsharded():
    from vlm_jax import sharding

    images, tokens = tower_inputs(batch=4)
    model = build_model(tiny_two_tower_config())
    variables = init_model(model, images, tokens)
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


def test_attention_impl_propagates():
    images, tokens = tower_inputs()
    model = build_model(tiny_two_tower_config(attention_impl="xla"))
    variables = init_model(model, images, tokens)
    auto = build_model(tiny_two_tower_config(attention_impl="auto")).apply(
        variables, images, tokens
    )
    out = model.apply(variables, images, tokens)
    np.testing.assert_allclose(out["text_emb"], auto["text_emb"], atol=1e-6)
    with pytest.raises(ValueError, match="attention_impl='flash' is not one of: auto, cudnn"):
        build_model(tiny_two_tower_config(attention_impl="flash"))
    cudnn = build_model(tiny_two_tower_config(attention_impl="cudnn"))
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
    images, tokens = tower_inputs()
    model = build_model(tiny_two_tower_config(**clip_like))
    params = unboxed_params(model, images, tokens)
    img = params["img"]
    assert "ln_pre" in img and "cls" in img
    assert set(img["embedding"]["conv"]) == {"kernel"}
    assert img["embedding"]["conv"]["kernel"].shape == (4, 4, 3, 32)
    assert set(img["head"]) == {"kernel"} and set(params["txt"]["head"]) == {"kernel"}
    assert img["posemb"].shape == (1, (TOWER_IMAGE // 4) ** 2 + 1, 32)  # cls + patches
    out = model.apply({"params": params}, images, tokens)
    assert bool(jnp.all(jnp.isfinite(out["image_emb"])))


def test_ln_eps_reaches_the_layer_norms():
    images, tokens = tower_inputs()
    model = build_model(tiny_two_tower_config())
    params = unboxed_params(model, images, tokens)
    large_eps = build_model(tiny_two_tower_config(**{"image.ln_eps": 10.0, "text.ln_eps": 10.0}))
    small = model.apply({"params": params}, images, tokens)
    large = large_eps.apply({"params": params}, images, tokens)
    for key in ("image_emb", "text_emb"):
        assert float(jnp.max(jnp.abs(small[key] - large[key]))) > 1e-3


def test_dropout_is_active_only_in_training():
    config = tiny_two_tower_config(**{"image.dropout": 0.2, "text.dropout": 0.2})
    model = build_model(config)
    images, tokens = tower_inputs()
    variables = init_model(model, images, tokens)
    a, b = (
        model.apply(variables, images, tokens, train=True, rngs={"dropout": jax.random.key(s)})
        for s in (1, 2)
    )
    assert float(jnp.max(jnp.abs(a["text_emb"] - b["text_emb"]))) > 1e-4
    eval_a, eval_b = (model.apply(variables, images, tokens) for _ in range(2))
    np.testing.assert_array_equal(eval_a["image_emb"], eval_b["image_emb"])
