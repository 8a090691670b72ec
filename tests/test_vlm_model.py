"""VLM fusion: splicing, per-example prefix-LM masks, gates at init, cached generation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.generate import generate
from vlm_jax.models.decoder import DecoderLM
from vlm_jax.models.projectors import MlpProjector
from vlm_jax.models.resamplers import PerceiverResampler
from vlm_jax.models.vlm import VisionLanguageModel, splice_visual_tokens

VOCAB, IMAGE_ID, EOS = 30, 3, 2


class PatchFeatures(nn.Module):
    """A minimal vision tower for these tests: 4x4 patches -> dense features [B, N, 16]."""

    @nn.compact
    def __call__(self, images, train=False):
        b, h, w, c = images.shape
        patches = images.reshape(b, h // 4, 4, w // 4, 4, c).transpose(0, 1, 3, 2, 4, 5)
        return nn.Dense(16)(patches.reshape(b, (h // 4) * (w // 4), 16 * c))


def _model(fusion="early", connector=None, every=1):
    lm = DecoderLM(
        vocab_size=VOCAB,
        width=32,
        depth=2,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=48,
        cross_attention_every=every if fusion == "cross_attention" else 0,
    )
    return VisionLanguageModel(
        lm=lm,
        vision=None if fusion == "none" else PatchFeatures(),
        connector=None if fusion == "none" else (connector or MlpProjector(32)),
        fusion=fusion,
        image_token_id=IMAGE_ID,
    )


def _batch(seed=0):
    """Two examples: '<image> w w w | answer' with prefixes 4 and 6 (image at 0 and 2)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, VOCAB, (2, 9)).astype(np.int32)
    tokens[0, 0] = IMAGE_ID
    tokens[1, 2] = IMAGE_ID
    images = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)  # 4 patches each
    return jnp.asarray(images), jnp.asarray(tokens), jnp.array([4, 6], jnp.int32)


def test_splice_matches_python_loop():
    rng = np.random.default_rng(1)
    text = rng.standard_normal((2, 6, 3))
    flags = np.zeros((2, 6), bool)
    flags[0, [1, 4]] = True
    flags[1, [0, 5]] = True
    visual = rng.standard_normal((2, 2, 3, 3))
    got, ends = splice_visual_tokens(jnp.asarray(text), jnp.asarray(flags), jnp.asarray(visual))
    for b in range(2):
        rows, k = [], 0
        for i in range(6):
            rows += list(visual[b, k]) if flags[b, i] else [text[b, i]]
            k += flags[b, i]
            assert ends[b, i] == len(rows)
        np.testing.assert_allclose(np.asarray(got[b]), np.stack(rows), rtol=1e-6)


@pytest.mark.parametrize("fusion", ["early", "cross_attention"])
def test_prefix_lm_mask_is_per_example(fusion):
    """Changing text token t changes outputs before t iff t lies in that example's prefix."""
    model = _model(fusion)
    images, tokens, prefix = _batch()
    variables = model.init(jax.random.key(0), images, tokens, prefix)
    run = jax.jit(lambda t: model.apply(variables, images, t, prefix))
    base = run(tokens)
    for t in (3, 5):  # in both prefixes / only in example 1's prefix (length 6)
        changed = run(tokens.at[:, t].set(tokens[:, t] % (VOCAB - 5) + 4))
        for b in range(2):
            earlier_changed = not np.allclose(changed[b, :t], base[b, :t], atol=1e-6)
            assert earlier_changed == (t < int(prefix[b])), (fusion, t, b)


def test_image_is_read_bidirectionally_in_early_fusion():
    model = _model("early")
    images, tokens, prefix = _batch()
    variables = model.init(jax.random.key(0), images, tokens, prefix)
    logits = model.apply(variables, images, tokens, prefix)
    other = model.apply(variables, images[::-1], tokens, prefix)
    # Example 1's image sits at text position 2: earlier positions see it (prefix-LM).
    assert not np.allclose(logits[1, :2], other[1, :2], atol=1e-6)


def test_cross_attention_fusion_at_init_equals_the_language_model():
    gated, text_only = _model("cross_attention"), _model("none")
    images, tokens, prefix = _batch()
    gated_vars = gated.init(jax.random.key(0), images, tokens, prefix)
    lm_vars = text_only.init(jax.random.key(1), images, tokens, prefix)
    params = nn.unbox(gated_vars["params"])
    params = dict(params, lm=dict(params["lm"], **nn.unbox(lm_vars["params"])["lm"]))
    got = gated.apply({"params": params}, images, tokens, prefix)
    expected = text_only.apply(lm_vars, images, tokens, prefix)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def _naive_greedy(model, variables, images, prompt, length, steps):
    """Recompute the whole sequence for every new token (no cache).

    The sequence lives in a fixed-size buffer (one compilation); the causal mask keeps the
    unfilled slots after position `n` from affecting the logits at `n - 1`.
    """
    run = jax.jit(lambda t: model.apply(variables, images[None], t, jnp.array([length])))
    seq = np.zeros((1, length + steps), np.int32)
    seq[0, :length] = prompt[:length]
    out = []
    for n in range(length, length + steps):
        out.append(int(jnp.argmax(run(jnp.asarray(seq))[0, n - 1])))
        seq[0, n] = out[-1]
        if out[-1] == EOS:
            break
    return out


@pytest.mark.parametrize(
    "fusion,connector",
    [("early", None), ("cross_attention", None), ("none", None), ("early", "perceiver")],
)
def test_cached_generation_equals_full_recomputation(fusion, connector):
    connector = PerceiverResampler(32, num_tokens=3, width=16, num_heads=2) if connector else None
    model = _model(fusion, connector)
    images, tokens, prefix = _batch(seed=3)
    variables = jax.jit(model.init)(jax.random.key(4), images, tokens, prefix)
    prompt = jnp.where(jnp.arange(9) < prefix[:, None], tokens, 0)[:, :6]
    out = generate(model, variables, images, prompt, prefix, max_new_tokens=5, eos_id=EOS)
    for b in range(2):
        expected = _naive_greedy(model, variables, images[b], prompt[b], int(prefix[b]), 5)
        got = [int(t) for t in out[b]][: len(expected)]
        assert got == expected, (fusion, b)
        assert all(int(t) == 0 for t in out[b][len(expected) :])


def test_sampling_is_seeded_and_top1_equals_greedy():
    model = _model("early")
    images, tokens, prefix = _batch(seed=5)
    variables = model.init(jax.random.key(6), images, tokens, prefix)
    prompt = jnp.where(jnp.arange(9) < prefix[:, None], tokens, 0)[:, :6]
    kwargs = dict(max_new_tokens=4, eos_id=EOS)
    greedy = generate(model, variables, images, prompt, prefix, **kwargs)
    top1 = generate(model, variables, images, prompt, prefix, temperature=1.0, top_k=1, **kwargs)
    np.testing.assert_array_equal(greedy, top1)
    a = generate(
        model, variables, images, prompt, prefix, temperature=2.0, rng=jax.random.key(1), **kwargs
    )
    b = generate(
        model, variables, images, prompt, prefix, temperature=2.0, rng=jax.random.key(1), **kwargs
    )
    np.testing.assert_array_equal(a, b)


def test_bad_fusion_names_valid_choices():
    model = _model("early").clone(fusion="late")
    images, tokens, prefix = _batch()
    with pytest.raises(ValueError, match="fusion='late' is not one of: cross_attention, early"):
        model.init(jax.random.key(0), images, tokens, prefix)


def test_qformer_instruction_mask_uses_the_configured_pad_id():
    """Was: pad id 0 hard-coded, so a tokenizer padding with 7 conditioned the queries on its
    padding. Pads inside the prefix must count as absent: same visual tokens as without them."""
    from vlm_jax.config import load_config
    from vlm_jax.models.resamplers import QFormer
    from vlm_jax.models.vlm import build_vlm

    pad = 7
    model = _model(connector=QFormer(32, num_tokens=4, width=16, text_conditioned=True))
    model = model.clone(pad_id=pad)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 8, 8, 3)), jnp.float32)
    padded = jnp.array([[IMAGE_ID, 5, 6, pad, pad, 9]], jnp.int32)
    unpadded = jnp.array([[IMAGE_ID, 5, 6, 9, 9, 9]], jnp.int32)
    variables = model.init(jax.random.key(0), images, padded, jnp.array([5]))
    encode = lambda t, p: model.apply(variables, images, t, p, method="encode_images")
    np.testing.assert_allclose(
        encode(padded, jnp.array([5])), encode(unpadded, jnp.array([3])), atol=1e-6
    )
    assert not np.allclose(encode(padded, jnp.array([5])), encode(unpadded, jnp.array([5])))

    config = load_config("configs/vlm_shapes.py")
    config.model.pad_id = pad
    assert build_vlm(config.model).pad_id == pad
