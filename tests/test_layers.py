"""Shared layers (models.layers): attention head checks, 2-D sin-cos embeddings, MLP activations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models.layers import MultiHeadAttention, sincos_2d


def test_attention_with_width_not_divisible_by_heads_fails():
    """Was: head_dim = 32 // 3 = 10, so 3 heads covered 30 of 32 dims without a word."""
    attention = MultiHeadAttention(num_heads=3, attention_impl="xla")
    with pytest.raises(ValueError, match="width=32 is not divisible by num_heads=3"):
        attention.init(jax.random.key(0), jnp.zeros((1, 4, 32)))


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
