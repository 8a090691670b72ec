"""Single-device contrastive losses against a float64 numpy reference and finite differences."""

import jax
import ml_collections
import numpy as np
import pytest

from vlm_jax.losses import LOSSES, build_loss


def reference_loss(name: str, image, text, scale: float, bias: float) -> float:
    """float64 numpy: SigLIP sums the B x B log-losses / B; CLIP averages the two CEs."""
    logits = scale * image @ text.T
    if name == "sigmoid":
        labels = 2 * np.eye(len(image)) - 1
        return float(np.sum(np.logaddexp(0.0, -labels * (logits + bias))) / len(image))

    def cross_entropy(rows):
        top = rows.max(axis=1, keepdims=True)
        lse = np.log(np.sum(np.exp(rows - top), axis=1)) + top[:, 0]
        return np.mean(lse - np.diagonal(rows))

    return float((cross_entropy(logits) + cross_entropy(logits.T)) / 2)


def embeddings(seed: int, batch: int, dim: int):
    rng = np.random.default_rng(seed)
    image, text = rng.normal(size=(2, batch, dim))
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    return image, text


def finite_difference_grads(name, image, text, scale, bias, eps=1e-5):
    """Central differences of the float64 reference w.r.t. every input."""
    args = [image, text, np.float64(scale), np.float64(bias)]
    grads = []
    for index, arg in enumerate(args):
        grad = np.zeros_like(arg)
        for pos in np.ndindex(arg.shape):
            shifted = []
            for sign in (1, -1):
                moved = [np.array(a, copy=True) for a in args]
                moved[index][pos] += sign * eps
                shifted.append(reference_loss(name, *moved))
            grad[pos] = (shifted[0] - shifted[1]) / (2 * eps)
        grads.append(grad)
    return grads


LOSS_CONFIGS = [
    dict(name="sigmoid", chunked=False),
    dict(name="softmax", chunked=False),
    dict(name="sigmoid", chunked=True, tile_size=3),  # single-device tiles, 7 % 3 != 0
    dict(name="softmax", chunked=True, tile_size=3),
]


@pytest.mark.parametrize("loss_config", LOSS_CONFIGS, ids=lambda c: str(c))
@pytest.mark.parametrize("seed,batch,scale,bias", [(0, 7, 10.0, -10.0), (1, 16, 3.0, 0.5)])
def test_value_matches_float64_reference(loss_config, seed, batch, scale, bias):
    image, text = embeddings(seed, batch, 8)
    loss_fn = build_loss(ml_collections.ConfigDict(loss_config))
    value = loss_fn(image.astype(np.float32), text.astype(np.float32), scale, bias)
    expected = reference_loss(loss_config["name"], image, text, scale, bias)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_config", LOSS_CONFIGS, ids=lambda c: str(c))
def test_gradients_match_finite_differences(loss_config):
    image, text = embeddings(2, 5, 4)
    scale, bias = 4.0, -1.5
    loss_fn = build_loss(ml_collections.ConfigDict(loss_config))
    grads = jax.grad(loss_fn, argnums=(0, 1, 2, 3))(
        image.astype(np.float32), text.astype(np.float32), np.float32(scale), np.float32(bias)
    )
    expected = finite_difference_grads(loss_config["name"], image, text, scale, bias)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_softmax_ignores_bias():
    image, text = embeddings(3, 6, 4)
    loss_fn = build_loss(ml_collections.ConfigDict(dict(name="softmax")))
    values = [loss_fn(image, text, 5.0, bias) for bias in (0.0, -10.0)]
    np.testing.assert_allclose(values[0], values[1], rtol=1e-6)
    assert float(jax.grad(loss_fn, argnums=3)(image, text, 5.0, 3.0)) == 0.0


def test_perfect_pairs_give_a_small_loss():
    image = np.eye(8, 16)  # orthonormal: negatives have zero similarity
    for name in ("sigmoid", "softmax"):
        loss_fn = build_loss(ml_collections.ConfigDict(dict(name=name)))
        assert float(loss_fn(image, image, 100.0, -10.0)) < 0.05


def test_unknown_loss_names_the_valid_ones():
    assert {"sigmoid", "softmax"} <= set(LOSSES.names())
    with pytest.raises(ValueError, match="sigmod.*sigmoid, softmax"):
        build_loss(ml_collections.ConfigDict(dict(name="sigmod")))


def test_bad_tile_size_is_rejected():
    with pytest.raises(ValueError, match="tile_size=0"):
        build_loss(ml_collections.ConfigDict(dict(name="sigmoid", chunked=True, tile_size=0)))
