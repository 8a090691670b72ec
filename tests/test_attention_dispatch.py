"""The dispatcher's XLA path against a float64 numpy reference, for every mask kind."""

import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.kernels import ATTENTION_IMPLS, AttentionMask, attention


def numpy_attention(q, k, v, visible, scale):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    logits = np.where(visible, logits, -np.inf)
    row_max = np.max(logits, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    w = np.exp(logits - row_max)
    denom = w.sum(-1, keepdims=True)
    p = w / np.where(denom > 0, denom, 1.0)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def _masks(batch, q_len, kv_len, rng):
    seg_q = np.sort(rng.integers(0, 3, (batch, q_len)), axis=1)
    seg_k = seg_q if q_len == kv_len else np.sort(rng.integers(0, 3, (batch, kv_len)), axis=1)
    return {
        "none": None,
        "causal": AttentionMask(causal=True),
        "prefix": AttentionMask(
            causal=True, prefix_lengths=jnp.array(rng.integers(0, q_len, batch))
        ),
        "segments": AttentionMask(q_segment_ids=jnp.array(seg_q), kv_segment_ids=jnp.array(seg_k)),
        "padding": AttentionMask(kv_valid=jnp.array(rng.random((batch, kv_len)) < 0.6)),
    }


@pytest.mark.parametrize("kind", ["none", "causal", "prefix", "segments", "padding"])
@pytest.mark.parametrize("q_len,kv_len,heads,kv_heads", [(7, 7, 4, 4), (5, 9, 4, 2), (9, 9, 6, 1)])
def test_xla_matches_numpy(kind, q_len, kv_len, heads, kv_heads):
    rng = np.random.default_rng(0)
    batch, dim = 3, 8
    q = rng.standard_normal((batch, q_len, heads, dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_len, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_len, kv_heads, dim)).astype(np.float32)
    mask = _masks(batch, q_len, kv_len, rng)[kind]
    visible = (
        np.ones((batch, 1, q_len, kv_len), bool)
        if mask is None
        else np.asarray(mask.dense(batch, q_len, kv_len))
    )
    expected = numpy_attention(q, k, v, visible, dim**-0.5)
    got = attention(jnp.array(q), jnp.array(k), jnp.array(v), mask, impl="xla")
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-5)


def test_fully_masked_rows_are_zero_not_nan():
    q = jnp.ones((1, 3, 2, 4))
    mask = AttentionMask(kv_valid=jnp.zeros((1, 3), bool))
    out = attention(q, q, q, mask, impl="xla")
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_prefix_lm_mask_rule():
    mask = AttentionMask(causal=True, prefix_lengths=jnp.array([2]))
    dense = np.asarray(mask.dense(1, 4, 4))[0, 0]
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(dense, expected)


def test_unknown_impl_names_valid_choices():
    q = jnp.ones((1, 2, 1, 4))
    with pytest.raises(ValueError, match="impl.*'flsh'.*xla"):
        attention(q, q, q, impl="flsh")
    assert "xla" in ATTENTION_IMPLS.names()
