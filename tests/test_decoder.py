"""Decoder LM: RoPE / RMSNorm parity, KV-cache decoding == full recomputation, gates at init."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.config import load_config
from vlm_jax.models import build_model
from vlm_jax.models.decoder import DecoderLM, RMSNorm, apply_rope

VOCAB = 40


def _lm(**overrides) -> DecoderLM:
    kwargs = dict(vocab_size=VOCAB, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=48)
    kwargs.update(overrides)
    return DecoderLM(**kwargs)


def _tokens(batch=2, length=9, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 1, VOCAB)


def test_rope_matches_float64_reference_and_is_relative():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, 2, 8))
    pos = np.array([[0, 3, 7, 11, 100]])
    half = 4
    freqs = 10_000.0 ** (-np.arange(half) / half)
    ang = pos[..., None] * freqs
    sin, cos = np.sin(ang)[:, :, None], np.cos(ang)[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    expected = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    got = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)
    # q.k depends on the position difference only.
    q, k = jnp.asarray(x[:, :1], jnp.float32), jnp.asarray(x[:, 1:2], jnp.float32)
    dot = lambda a, b: jnp.sum(apply_rope(q, jnp.array([[a]])) * apply_rope(k, jnp.array([[b]])))
    np.testing.assert_allclose(dot(3, 10), dot(50, 57), rtol=1e-4)


def test_rmsnorm_matches_numpy():
    x = np.random.default_rng(1).standard_normal((2, 3, 16)).astype(np.float32)
    norm = RMSNorm()
    params = norm.init(jax.random.key(0), x)
    expected = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(norm.apply(params, x)), expected, rtol=1e-5)


@pytest.mark.parametrize("tie,kv_heads", [(True, 2), (False, 1)])
def test_kv_cache_decoding_equals_full_recomputation(tie, kv_heads):
    """Right-padded prompts of different lengths: prefill once, then one token at a time."""
    lm = _lm(tie_embeddings=tie, num_kv_heads=kv_heads)
    tokens = _tokens(length=9)
    variables = lm.init(jax.random.key(1), tokens)
    assert ("unembed" in variables["params"]) != tie
    prompt_lengths = jnp.array([3, 5])
    full = jax.jit(lambda v, t, p: lm.apply(v, t, prefix_lengths=p)[0])(
        variables, tokens, prompt_lengths
    )
    apply = jax.jit(lambda v, t, c, p: lm.apply(v, t, cache=c, prefix_lengths=p))
    # Prefill the padded prompt block (garbage after each prompt), then rewind the index.
    padded = jnp.where(jnp.arange(5) < prompt_lengths[:, None], tokens[:, :5], 0)
    prefill, cache = apply(variables, padded, lm.init_cache(2, 12), prompt_lengths)
    for b, n in enumerate([3, 5]):
        np.testing.assert_allclose(prefill[b, :n], full[b, :n], rtol=1e-5, atol=1e-5)
    cache = cache.replace(index=prompt_lengths)
    for step in range(4):
        next_tokens = tokens[jnp.arange(2), prompt_lengths + step][:, None]
        logits, cache = apply(variables, next_tokens, cache, None)
        expected = full[jnp.arange(2), prompt_lengths + step]
        np.testing.assert_allclose(logits[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_kv_cache_overflow_with_a_concrete_index_fails():
    """Was: 6 + 4 tokens into an 8-slot cache clamped the write and returned wrong logits."""
    lm = _lm()
    tokens = _tokens(batch=1, length=10)
    variables = lm.init(jax.random.key(1), tokens)
    _, cache = lm.apply(variables, tokens[:, :6], cache=lm.init_cache(1, 8))
    with pytest.raises(ValueError, match=r"overflow: row 0 is at index 6.*end at 10 > max_len=8"):
        lm.apply(variables, tokens[:, 6:], cache=cache)
    with pytest.raises(ValueError, match="10 new tokens do not fit a KV cache of max_len=8"):
        jax.jit(lambda c: lm.apply(variables, tokens, cache=c))(lm.init_cache(1, 8))


def test_kv_cache_overflow_under_jit_gives_nan_logits_for_that_row_only():
    """A traced index cannot be checked at trace time: the overflowed row's logits are NaN
    (never plausible but wrong), the row that fits still equals the full recomputation."""
    lm = _lm()
    tokens = _tokens(batch=2, length=8)
    variables = lm.init(jax.random.key(1), tokens)
    full, _ = lm.apply(variables, tokens)
    apply = jax.jit(lambda c, t: lm.apply(variables, t, cache=c))
    _, cache = apply(lm.init_cache(2, 8), tokens[:, :6])
    cache = cache.replace(index=jnp.array([4, 6]))  # row 1: 6 + 3 > 8
    logits, cache = apply(cache, tokens[:, 4:7])
    np.testing.assert_allclose(logits[0], full[0, 4:7], rtol=1e-5, atol=1e-5)
    assert np.isnan(logits[1]).all()
    logits, _ = apply(cache, tokens[:, :1])  # row 1 stays poisoned; row 0 (7 + 1) still fits
    assert not np.isnan(logits[0]).any() and np.isnan(logits[1]).all()


def test_prefix_lm_is_bidirectional_in_the_prefix_only():
    lm = _lm()
    tokens = _tokens(batch=1, length=8)
    variables = lm.init(jax.random.key(2), tokens)
    run = jax.jit(lambda t: lm.apply(variables, t, prefix_lengths=jnp.array([4]))[0])
    base = run(tokens)
    in_prefix = run(tokens.at[0, 3].set((tokens[0, 3] + 1) % VOCAB))
    after_prefix = run(tokens.at[0, 6].set((tokens[0, 6] + 1) % VOCAB))
    assert not np.allclose(in_prefix[0, 0], base[0, 0])  # position 0 sees position 3
    np.testing.assert_array_equal(after_prefix[0, :6], base[0, :6])  # nothing sees the future


def test_gated_cross_attention_at_init_leaves_lm_logits_unchanged_exactly():
    plain, gated = _lm(), _lm(cross_attention_every=1)
    tokens = _tokens()
    media = jax.random.normal(jax.random.key(3), (2, 5, 32))
    lm_vars = plain.init(jax.random.key(4), tokens)
    gated_vars = gated.init(jax.random.key(5), tokens, media=media)
    params = dict(nn.unbox(gated_vars["params"]))
    params.update(nn.unbox(lm_vars["params"]))  # LM weights from the text model, xattn fresh
    assert {"xattn_0", "xattn_1"} <= set(params)
    expected, _ = plain.apply(lm_vars, tokens)
    got, _ = gated.apply({"params": params}, tokens, media=media)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    # Opening a gate makes the image matter.
    params["xattn_0"] = dict(params["xattn_0"], attn_gate=jnp.float32(1.0))
    opened, _ = gated.apply({"params": params}, tokens, media=media)
    assert not np.allclose(opened, expected)


def test_gradients_match_finite_differences():
    lm = _lm(depth=1, width=16, num_heads=2, num_kv_heads=1, mlp_dim=16)
    tokens = _tokens(batch=1, length=5)
    params = nn.unbox(lm.init(jax.random.key(6), tokens)["params"])

    def loss(p):
        logits, _ = lm.apply({"params": p}, tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[0, :-1, tokens[0, 1:]])

    with jax.default_matmul_precision("highest"):
        grads = jax.grad(loss)(params)
        leaf = params["blocks_0"]["attn"]["query"]["kernel"]
        direction = jax.random.normal(jax.random.key(7), leaf.shape)
        eps = 1e-3
        shift = lambda s: jax.tree_util.tree_map_with_path(
            lambda path, x: x + s * direction if x is leaf else x, params
        )
        numeric = (loss(shift(eps)) - loss(shift(-eps))) / (2 * eps)
        analytic = jnp.sum(grads["blocks_0"]["attn"]["query"]["kernel"] * direction)
    np.testing.assert_allclose(numeric, analytic, rtol=2e-2, atol=1e-4)


def test_cross_attention_decoder_needs_media():
    lm = _lm(cross_attention_every=2)
    with pytest.raises(ValueError, match="needs media"):
        lm.init(jax.random.key(0), _tokens())


def test_remat_gives_identical_outputs_and_gradients():
    tokens = _tokens(batch=1, length=6)
    plain, remat = _lm(depth=1), _lm(depth=1, remat=True)
    params = nn.unbox(plain.init(jax.random.key(8), tokens)["params"])

    def loss(model, p):
        return jnp.sum(model.apply({"params": p}, tokens)[0] ** 2)

    np.testing.assert_allclose(loss(remat, params), loss(plain, params), rtol=1e-6)
    g_plain = jax.grad(lambda p: loss(plain, p))(params)
    g_remat = jax.grad(lambda p: loss(remat, p))(params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_plain, g_remat
    )


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
