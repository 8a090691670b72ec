"""Gradient cache: chunked embedding + re-run gives exactly the plain step's loss and grads."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_two_tower_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vlm_jax import sharding
from vlm_jax.losses import build_loss
from vlm_jax.models import build_model
from vlm_jax.train.gradcache import gradcache_value_and_grad

# conftest's tiny two-tower model, smaller still: 8-pixel images of 4 patches, 6 tokens.
TOWER_SIZES = {
    "embed_dim": 8,
    "image.width": 16,
    "image.depth": 1,
    "image.mlp_dim": 32,
    "image.image_size": 8,
    "text.width": 16,
    "text.depth": 1,
    "text.mlp_dim": 32,
    "text.vocab_size": 32,
    "text.max_len": 6,
}


class TinyTwoTower(nn.Module):
    """A seconds-to-compile stand-in for the two-tower contract, with dropout."""

    dropout: float = 0.0

    @nn.compact
    def __call__(self, images, tokens, train: bool = False):
        def normalise(x):
            return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

        drop = nn.Dropout(self.dropout, deterministic=not train)
        image = nn.Dense(8)(drop(jnp.tanh(nn.Dense(16)(images.reshape(len(images), -1)))))
        text = nn.Dense(8)(drop(jnp.mean(nn.Embed(32, 16)(tokens), axis=1)))
        scale = self.param("t", nn.initializers.constant(jnp.log(10.0)), ())
        bias = self.param("b", nn.initializers.constant(-10.0), ())
        return dict(
            image_emb=normalise(image),
            text_emb=normalise(text),
            logit_scale=jnp.exp(scale),
            logit_bias=bias,
        )


def setup(batch: int, model: nn.Module | None = None):
    """(apply_fn, params, batch) for `model`, by default the tiny stand-in."""
    model = model or TinyTwoTower()
    keys = jax.random.split(jax.random.key(0), 3)
    images = jax.random.uniform(keys[0], (batch, 8, 8, 3), minval=-1, maxval=1)
    tokens = jax.random.randint(keys[1], (batch, 6), 2, 32)
    init = jax.jit(lambda k: model.init({"params": k, "dropout": k}, images, tokens))
    params = nn.meta.unbox(init(keys[2]))["params"]

    def apply_fn(p, images, tokens, rngs):
        rngs = None if rngs is None else {"dropout": rngs}
        return model.apply({"params": p}, images, tokens, train=rngs is not None, rngs=rngs)

    return apply_fn, params, {"image": images, "tokens": tokens}


def plain_value_and_grad(apply_fn, loss_fn, params, batch, rngs=None):
    """((loss, {logit_scale, logit_bias}), grads) of the plain, unchunked step."""

    def loss(p):
        out = apply_fn(p, batch["image"], batch["tokens"], rngs)
        metrics = {k: out[k] for k in ("logit_scale", "logit_bias")}
        return loss_fn(out["image_emb"], out["text_emb"], *metrics.values()), metrics

    return jax.value_and_grad(loss, has_aux=True)(params)


def assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
    for have, expected in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(have), np.asarray(expected), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "name,num_chunks,model",
    [
        ("sigmoid", 4, build_model(tiny_two_tower_config(**TOWER_SIZES))),  # the real two-tower
        ("softmax", 3, TinyTwoTower()),
    ],
    ids=["sigmoid-two_tower", "softmax-tiny"],
)
def test_gradcache_equals_plain_step(name, num_chunks, model):
    apply_fn, params, batch = setup(batch=12, model=model)
    loss_fn = build_loss(ml_collections.ConfigDict(dict(name=name)))
    want = jax.jit(lambda p, b: plain_value_and_grad(apply_fn, loss_fn, p, b))(params, batch)
    step = jax.jit(
        lambda p, b: gradcache_value_and_grad(apply_fn, loss_fn, p, b, num_chunks=num_chunks)
    )
    got = step(params, batch)
    assert_trees_close(got, want)  # loss, logged scale and bias, and every gradient
    assert float(jnp.abs(got[1]["t"])) > 0  # the temperature gradient flows through the cache


def test_gradcache_with_sharded_batch_and_chunked_loss():
    """The trainer's setting: batch sharded over 8 devices, ring loss, 2 chunks of 8."""
    mesh = sharding.build_mesh((8, 1, 1))
    apply_fn, params, batch = setup(batch=16)
    plain_loss = build_loss(ml_collections.ConfigDict(dict(name="sigmoid")))
    ring_loss = build_loss(
        ml_collections.ConfigDict(dict(name="sigmoid", chunked=True, tile_size=1)), mesh
    )
    want = jax.jit(lambda p, b: plain_value_and_grad(apply_fn, plain_loss, p, b))(params, batch)
    sharded = {
        k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()
    }
    params = jax.device_put(params, NamedSharding(mesh, P()))
    step = jax.jit(lambda p, b: gradcache_value_and_grad(apply_fn, ring_loss, p, b, num_chunks=2))
    assert_trees_close(step(params, sharded), want, rtol=2e-5, atol=2e-6)


def test_gradcache_dropout_uses_the_same_masks_in_both_passes():
    """With dropout, the gradient equals the plain gradient of the same per-chunk masks:
    the loss computed from embeddings re-made with fold_in(rng, chunk) keys."""
    apply_fn, params, batch = setup(batch=8, model=TinyTwoTower(dropout=0.5))
    loss_fn = build_loss(ml_collections.ConfigDict(dict(name="softmax")))
    rng = jax.random.key(7)

    def per_chunk_masks_loss(p):
        outs = [
            apply_fn(p, batch["image"][k::2], batch["tokens"][k::2], jax.random.fold_in(rng, k))
            for k in range(2)
        ]
        merged = {
            key: jnp.stack([o[key] for o in outs], 1).reshape(8, -1)
            for key in ("image_emb", "text_emb")
        }
        return loss_fn(
            merged["image_emb"],
            merged["text_emb"],
            *(outs[0][k] for k in ("logit_scale", "logit_bias")),
        )

    want = jax.jit(jax.value_and_grad(per_chunk_masks_loss))(params)
    want = ((want[0], {"logit_scale": jnp.exp(params["t"]), "logit_bias": params["b"]}), want[1])
    step = jax.jit(
        lambda p, b: gradcache_value_and_grad(apply_fn, loss_fn, p, b, num_chunks=2, rngs=rng)
    )
    got = step(params, batch)
    assert_trees_close(got, want)


def test_num_chunks_must_divide_the_batch():
    apply_fn, params, batch = setup(batch=6)
    loss_fn = build_loss(ml_collections.ConfigDict(dict(name="sigmoid")))
    with pytest.raises(ValueError, match="num_chunks=4 .* batch size 6"):
        gradcache_value_and_grad(apply_fn, loss_fn, params, batch, num_chunks=4)
