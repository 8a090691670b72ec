"""Chunked (tiled ring) contrastive losses on 8 CPU devices: same values and gradients as the
plain losses, and per-device temp memory bounded by the tile, not by the global batch."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vlm_jax import sharding
from vlm_jax.losses import build_loss

ARGNUMS = (0, 1, 2, 3)


def loss_config(name: str, chunked: bool, tile_size: int = 1024, batch_axes=("data", "fsdp")):
    return ml_collections.ConfigDict(
        dict(name=name, chunked=chunked, tile_size=tile_size, batch_axes=batch_axes)
    )


def sharded_inputs(mesh, batch_axes, batch: int, dim: int, seed: int = 0):
    image, text = jax.random.normal(jax.random.key(seed), (2, batch, dim))
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    rows = NamedSharding(mesh, P(batch_axes))
    return jax.device_put(image, rows), jax.device_put(text, rows)


# (mesh shape over (data, fsdp, tensor), batch axes, tile size); b_local = 48 / ring size.
CASES = [
    ((8, 1, 1), ("data", "fsdp"), 4),  # b_local 6, tile does not divide it
    ((2, 4, 1), ("data", "fsdp"), 3),  # two-axis ring, tile divides b_local
    ((2, 2, 2), ("data", "fsdp"), 5),  # tensor axis replicates the loss
    ((4, 1, 2), ("data",), 7),  # ring over one axis, tile > b_local / 2
    ((1, 8, 1), ("fsdp",), 64),  # tile larger than b_local: one tile per block
]


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
@pytest.mark.parametrize("mesh_shape,batch_axes,tile_size", CASES)
def test_chunked_equals_plain(name, mesh_shape, batch_axes, tile_size):
    mesh = sharding.build_mesh(mesh_shape)
    image, text = sharded_inputs(mesh, batch_axes, batch=48, dim=16)
    scale, bias = jnp.float32(7.0), jnp.float32(-3.0)
    plain = build_loss(loss_config(name, chunked=False))
    chunked = build_loss(loss_config(name, True, tile_size, batch_axes), mesh)
    expected = jax.jit(jax.value_and_grad(plain, ARGNUMS))(image, text, scale, bias)
    got = jax.jit(jax.value_and_grad(chunked, ARGNUMS))(image, text, scale, bias)
    for want, have in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(have), np.asarray(want), rtol=2e-5, atol=2e-6)


@settings(max_examples=8, deadline=None)
@given(
    name=st.sampled_from(["sigmoid", "softmax"]),
    batch=st.integers(1, 23),
    tile_size=st.integers(1, 24),
    scale=st.floats(0.5, 20.0),
    bias=st.floats(-10.0, 10.0),
)
def test_single_device_tiles_equal_plain_for_any_tile_size(name, batch, tile_size, scale, bias):
    """Padding of the last tile (any batch, any tile) never changes the value or gradients."""
    image, text = jax.random.normal(jax.random.key(batch), (2, batch, 4))
    plain = build_loss(loss_config(name, chunked=False))
    chunked = build_loss(loss_config(name, True, tile_size))
    expected = jax.jit(jax.value_and_grad(plain, ARGNUMS))(image, text, scale, bias)
    got = jax.jit(jax.value_and_grad(chunked, ARGNUMS))(image, text, scale, bias)
    for want, have in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(have), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_chunked_loss_output_is_replicated_scalar_under_jit():
    mesh = sharding.build_mesh((8, 1, 1))
    image, text = sharded_inputs(mesh, ("data", "fsdp"), batch=16, dim=8)
    loss_fn = build_loss(loss_config("sigmoid", True, 2), mesh)
    value = jax.jit(loss_fn)(image, text, 10.0, -10.0)
    assert value.shape == () and value.dtype == jnp.float32


def test_unknown_batch_axis_is_rejected():
    mesh = sharding.build_mesh((8, 1, 1))
    with pytest.raises(ValueError, match=r"batch_axes=\('dta',\).*'data'"):
        build_loss(loss_config("sigmoid", True, batch_axes=("dta",)), mesh)


def compiled_temp_bytes(loss_fn, mesh, batch: int, dim: int) -> int:
    """Per-device temp memory of the compiled loss + gradient, from abstract inputs only."""
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    step = jax.jit(jax.value_and_grad(loss_fn, ARGNUMS))
    return step.lower(emb, emb, scalar, scalar).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
def test_chunked_memory_is_bounded_by_the_tile(name):
    """Naive: >= one b_local x B float32 logit matrix per device, so 16x for 4x the batch.
    Chunked: a few tile x tile buffers plus O(b_local x E) embeddings and their gradients."""
    mesh = sharding.build_mesh((8, 1, 1))
    dim, tile, devices = 8, 64, 8
    naive = build_loss(loss_config(name, False), mesh)
    chunked = build_loss(loss_config(name, True, tile), mesh)
    for batch in (4096, 16384):
        b_local = batch // devices
        naive_bytes = compiled_temp_bytes(naive, mesh, batch, dim)
        chunked_bytes = compiled_temp_bytes(chunked, mesh, batch, dim)
        assert naive_bytes >= b_local * batch * 4
        assert chunked_bytes <= 8 * tile * tile * 4 + 16 * b_local * dim * 4
        assert chunked_bytes < b_local * batch * 4 / 50


def test_siglip_64k_batch_compiles_under_64mib_per_device():
    """The issue's target: B = 65,536 pairs of 256-d embeddings on 8 devices, loss + grad."""
    mesh = sharding.build_mesh((8, 1, 1))
    loss_fn = build_loss(loss_config("sigmoid", True, 1024), mesh)
    assert compiled_temp_bytes(loss_fn, mesh, 65536, 256) < 64 * 2**20
