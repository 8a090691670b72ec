"""Analytic two-tower FLOPs against XLA's own count of the compiled forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_two_tower_config

from vlm_jax.models import build_model
from vlm_jax.models.flops import (
    block_flops,
    forward_flops_per_example,
    text_flops,
    train_flops_per_example,
)


def xla_forward_flops(config, batch: int) -> float:
    model = build_model(config)
    size = config.image.image_size
    images = jnp.zeros((batch, size, size, 3), jnp.float32)
    tokens = jnp.ones((batch, config.text.max_len), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), images, tokens))["params"]
    compiled = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)).lower(
        params, images, tokens
    )
    return float(compiled.compile().cost_analysis()["flops"])


def test_block_flops_formula():
    # M = 4D: 24*T*D^2 + 4*T^2*D
    assert block_flops(10, 64, 256) == 24 * 10 * 64**2 + 4 * 10**2 * 64


@pytest.mark.parametrize(
    "image",
    [
        {"pool": "map"},
        {"pool": "cls"},
        {"pool": "gap", "stem": "conv", "patch_size": 8, "image_size": 32},
        {"pool": "gap", "head": False, "width": 64, "mlp_dim": 256},  # pooled features = emb
    ],
)
def test_forward_flops_match_xla_cost_analysis(image):
    # Wide enough that matmuls dominate the elementwise work XLA also counts.
    sizes = {"image.width": 128, "image.mlp_dim": 512, "text.width": 128, "text.mlp_dim": 512}
    sizes |= {f"image.{key}": value for key, value in image.items()}
    config = tiny_two_tower_config(embed_dim=64, **sizes)
    batch = 2
    analytic = batch * forward_flops_per_example(config)
    measured = xla_forward_flops(config, batch)
    assert measured == pytest.approx(analytic, rel=0.10), (measured, analytic)


@pytest.mark.parametrize("frozen", [(), ("img",), ("txt",)])
def test_training_flops_match_xla_with_frozen_towers(frozen):
    """3 x forward per trained tower, 1 x for a tower whose params are all stop_gradient'ed
    (what Task.stop_frozen does for optim.freeze), against XLA's count of the gradient."""
    sizes = {"image.width": 128, "image.mlp_dim": 512, "text.width": 128, "text.mlp_dim": 512}
    config = tiny_two_tower_config(embed_dim=64, **sizes)
    model, batch = build_model(config), 2
    size = config.image.image_size
    images = jnp.zeros((batch, size, size, 3), jnp.float32)
    tokens = jnp.ones((batch, config.text.max_len), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), images, tokens))["params"]

    def loss(p):
        p = {k: jax.lax.stop_gradient(v) if k in frozen else v for k, v in p.items()}
        out = model.apply({"params": p}, images, tokens)
        return jnp.sum(out["image_emb"] * out["text_emb"])

    cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    analytic = batch * train_flops_per_example(config, frozen)
    assert cost["flops"] == pytest.approx(analytic, rel=0.10), (cost["flops"], analytic)
    if frozen:  # the frozen tower's 2 x forward of backward is gone
        assert analytic < batch * train_flops_per_example(config) * 0.9


def test_text_flops_use_the_tokenized_length():
    config, half = tiny_two_tower_config(), tiny_two_tower_config().text.max_len // 2
    short = text_flops(config, text_len=half)
    assert short < text_flops(config) and short == text_flops(
        tiny_two_tower_config(**{"text.max_len": half})
    )
