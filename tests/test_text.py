"""The text tower (models.text): pools, padding invariance, causal masking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOWER_EMBED, init_model, tiny_two_tower_config, tower_inputs, unboxed_params

from vlm_jax.models import build_model
from vlm_jax.models.text import TextTransformer


@pytest.mark.parametrize("pool", ["last", "eos", "first", "mean", "map", "last_position"])
def test_text_pools(pool):
    model = build_model(tiny_two_tower_config(**{"text.pool": pool}))
    images, tokens = tower_inputs()
    emb = model.apply(init_model(model, images, tokens), tokens, method="embed_text")
    assert emb.shape == (2, TOWER_EMBED) and bool(jnp.all(jnp.isfinite(emb)))


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
    _, tokens = tower_inputs()
    padded = jnp.pad(tokens, ((0, 0), (0, 4)))  # 4 more pads at the end
    params = unboxed_params(model, padded)
    np.testing.assert_allclose(
        model.apply({"params": params}, padded),
        model.apply({"params": params}, tokens),
        atol=1e-5,
    )


def test_attending_to_pads_changes_outputs_when_mask_pad_is_off():
    model = text_tower(pool="first", mask_pad=False)
    _, tokens = tower_inputs()
    padded = jnp.pad(tokens, ((0, 0), (0, 4)))
    params = unboxed_params(model, padded)
    difference = model.apply({"params": params}, padded) - model.apply({"params": params}, tokens)
    assert float(jnp.max(jnp.abs(difference))) > 1e-3


def test_causal_text_ignores_later_tokens():
    model = text_tower(causal=True)
    _, tokens = tower_inputs()
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
