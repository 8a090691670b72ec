"""Connectors: token counts, resampler shapes independent of input length, numpy parity."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import erf

from vlm_jax.models import resamplers  # noqa: F401  (registers perceiver, qformer)
from vlm_jax.models.projectors import CONNECTORS, build_connector

OUT = 24
RESAMPLER_SIZES = dict(num_tokens=6, depth=2, width=16, num_heads=2)


def _build(name, **kwargs):
    """The connector `name` with small resampler sizes (a section holds only its own keys)."""
    declared = CONNECTORS.schema(name).keys
    sizes = {key: value for key, value in RESAMPLER_SIZES.items() if key in declared}
    cfg = ml_collections.ConfigDict(dict(name=name, **sizes, **kwargs))
    return build_connector(cfg, OUT, dtype=jnp.float32, attention_impl="xla")


def _features(num_patches, batch=2, dim=12, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, num_patches, dim))


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("linear", {}),
        ("mlp", {}),
        ("pool", {"pool_size": 2, "pool_mode": "avg"}),
        ("pool", {"pool_size": 2, "pool_mode": "merge"}),
        ("perceiver", {}),
        ("qformer", {}),
    ],
)
def test_output_shape_matches_reported_token_count(name, kwargs):
    connector = _build(name, **kwargs)
    features = _features(16)
    variables = connector.init(jax.random.key(0), features)
    out = connector.apply(variables, features)
    assert out.shape == (2, connector.output_tokens(16), OUT)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("name", ["perceiver", "qformer"])
def test_resampler_output_shape_independent_of_input_length(name):
    connector = _build(name)
    variables = connector.init(jax.random.key(0), _features(16))
    for num_patches in (4, 16, 49):
        out = connector.apply(variables, _features(num_patches))
        assert out.shape == (2, 6, OUT)
        assert connector.output_tokens(num_patches) == 6


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _float64_params(connector, features, seed=1) -> dict:
    """The connector's params as float64 numpy, biases made non-zero so that they count."""
    params = nn.unbox(connector.init(jax.random.key(seed), features)["params"])
    rng = np.random.default_rng(seed)
    return {
        layer: {
            name: rng.normal(size=p.shape) if name == "bias" else np.asarray(p, np.float64)
            for name, p in values.items()
        }
        for layer, values in params.items()
    }


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_per_patch_projectors_match_numpy(name):
    connector = _build(name)
    features = _features(9)
    p = _float64_params(connector, features)
    x = np.asarray(features, np.float64)
    if name == "linear":
        expected = x @ p["proj"]["kernel"] + p["proj"]["bias"]
    else:
        hidden = _gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
        expected = hidden @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    got = connector.apply({"params": jax.tree.map(jnp.float32, p)}, features)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["perceiver", "qformer"])
def test_resamplers_read_the_patches_as_a_set(name):
    """The resamplers' keys are the projected patches with no position embedding, so the
    visual tokens do not depend on the patch order, but do depend on every patch."""
    connector = _build(name)
    features = _features(16)
    variables = connector.init(jax.random.key(0), features)
    run = jax.jit(lambda f: connector.apply(variables, f))
    base = run(features)
    order = np.random.default_rng(0).permutation(16)
    np.testing.assert_allclose(run(features[:, order]), base, rtol=1e-5, atol=1e-5)
    changed = run(features.at[:, 7].add(1.0))
    assert float(jnp.min(jnp.max(jnp.abs(changed - base), axis=(1, 2)))) > 1e-3


@pytest.mark.parametrize("mode", ["avg", "merge"])
def test_pool_matches_numpy(mode):
    connector = _build("pool", pool_size=2, pool_mode=mode)
    features = _features(16, batch=1)
    params = nn.unbox(connector.init(jax.random.key(1), features)["params"])
    grid = np.asarray(features, np.float64).reshape(1, 4, 4, 12)
    windows = [grid[:, i : i + 2, j : j + 2].reshape(1, 4, 12) for i in (0, 2) for j in (0, 2)]
    windows = np.stack(windows, 1)  # [1, 4 windows, 4 patches, 12]
    pooled = windows.mean(2) if mode == "avg" else windows.reshape(1, 4, 48)
    mlp = {
        k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in params["mlp"].items()
    }
    hidden = _gelu(pooled @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"])
    expected = hidden @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"]
    got = connector.apply({"params": params}, features)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_pool_rejects_grid_it_cannot_divide():
    connector = _build("pool", pool_size=3)
    with pytest.raises(ValueError, match="pool_size=3"):
        connector.output_tokens(16)


def test_qformer_reads_the_instruction_but_not_its_padding():
    connector = _build("qformer", text_conditioned=True)
    features = _features(16)
    text = jax.random.normal(jax.random.key(2), (2, 5, 10))
    valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    variables = connector.init(jax.random.key(3), features, text_embeds=text, text_valid=valid)
    run = jax.jit(lambda t: connector.apply(variables, features, text_embeds=t, text_valid=valid))
    base = run(text)
    changed_pad = run(text.at[0, 4].add(5.0))
    changed_word = run(text.at[0, 1].add(5.0))
    np.testing.assert_allclose(changed_pad[0], base[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(changed_word[0], base[0], atol=1e-4)


def test_unknown_connector_names_valid_choices():
    with pytest.raises(ValueError, match=r"connector='qformr' is not one of: linear, mlp"):
        _build("qformr")
    assert {"linear", "mlp", "pool", "perceiver", "qformer"} <= set(CONNECTORS.names())
