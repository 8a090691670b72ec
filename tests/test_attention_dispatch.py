"""The dispatcher's XLA path against a float64 numpy reference, for every mask kind; the mask
rule itself against a per-(b, i, j) loop over the documented rule."""

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


def loop_visibility(mask: AttentionMask | None, batch: int, q_len: int, kv_len: int) -> np.ndarray:
    """bool[B, 1, Tq, Tk] from the rule in mask.py's docstring, one (b, i, j) at a time; written
    apart from `AttentionMask.dense` so that the mask the kernels share is checked, not echoed."""
    visible = np.ones((batch, 1, q_len, kv_len), bool)
    if mask is None:
        return visible
    field = lambda name: None if getattr(mask, name) is None else np.asarray(getattr(mask, name))
    prefix, q_seg, kv_seg, kv_valid = map(
        field, ("prefix_lengths", "q_segment_ids", "kv_segment_ids", "kv_valid")
    )
    q_pos, kv_pos = field("q_positions"), field("kv_positions")
    for b in range(batch):
        for i in range(q_len):
            for j in range(kv_len):
                qp = i if q_pos is None else int(q_pos[b, i])
                kp = j if kv_pos is None else int(kv_pos[b, j])
                ok = True
                if mask.causal:
                    ok = kp <= qp or (prefix is not None and kp < int(prefix[b]))
                if q_seg is not None:
                    ok = ok and q_seg[b, i] == kv_seg[b, j]
                if kv_valid is not None:
                    ok = ok and bool(kv_valid[b, j])
                visible[b, 0, i, j] = ok
    return visible


def _masks(batch, q_len, kv_len, rng):
    seg_q = np.sort(rng.integers(0, 3, (batch, q_len)), axis=1)
    seg_k = seg_q if q_len == kv_len else np.sort(rng.integers(0, 3, (batch, kv_len)), axis=1)
    prefix = jnp.array(rng.integers(0, q_len, batch))
    kv_valid = jnp.array(rng.random((batch, kv_len)) < 0.6)
    # Decoding with a KV cache: the queries are the last Tq of the Tk positions.
    decode_positions = jnp.broadcast_to(jnp.arange(kv_len - q_len, kv_len), (batch, q_len))
    segments = dict(q_segment_ids=jnp.array(seg_q), kv_segment_ids=jnp.array(seg_k))
    return {
        "none": None,
        "causal": AttentionMask(causal=True),
        "prefix": AttentionMask(causal=True, prefix_lengths=prefix),
        "segments": AttentionMask(**segments),
        "padding": AttentionMask(kv_valid=kv_valid),
        "decode": AttentionMask(causal=True, q_positions=decode_positions),
        "combined": AttentionMask(
            causal=True,
            prefix_lengths=prefix,
            kv_valid=kv_valid,
            q_positions=decode_positions,
            **segments,
        ),
    }


MASK_KINDS = ["none", "causal", "prefix", "segments", "padding", "decode", "combined"]


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("q_len,kv_len,heads,kv_heads", [(7, 7, 4, 4), (5, 9, 4, 2), (9, 9, 6, 1)])
def test_xla_matches_numpy(kind, q_len, kv_len, heads, kv_heads):
    rng = np.random.default_rng(0)
    batch, dim = 3, 8
    q = rng.standard_normal((batch, q_len, heads, dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_len, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_len, kv_heads, dim)).astype(np.float32)
    mask = _masks(batch, q_len, kv_len, rng)[kind]
    expected = numpy_attention(q, k, v, loop_visibility(mask, batch, q_len, kv_len), dim**-0.5)
    got = attention(jnp.array(q), jnp.array(k), jnp.array(v), mask, impl="xla")
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", MASK_KINDS[1:])
def test_dense_mask_matches_the_documented_rule(kind):
    """`AttentionMask.dense` against the rule evaluated per (b, i, j) on seeded random cases:
    square and Tq < Tk (decoding), and for causal kinds arbitrary per-example positions."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        batch, q_len = 3, int(rng.integers(1, 8))
        kv_len = q_len + int(rng.integers(0, 5))
        mask = _masks(batch, q_len, kv_len, rng)[kind]
        if seed >= 4 and mask.causal:
            mask = mask.replace(
                q_positions=jnp.array(rng.integers(0, 12, (batch, q_len))),
                kv_positions=jnp.array(rng.integers(0, 12, (batch, kv_len))),
            )
        expected = loop_visibility(mask, batch, q_len, kv_len)
        np.testing.assert_array_equal(np.asarray(mask.dense(batch, q_len, kv_len)), expected)


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
