"""Pallas flash attention (forward and custom-VJP backward) against a float64 reference.

On CPU the kernels run in Pallas interpret mode; on a GPU (JAX_PLATFORMS=cuda) the same
tests run the compiled kernels.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from vlm_jax.kernels import ATTENTION_IMPLS, AttentionMask, attention, resolve_impl
from vlm_jax.kernels.flash import BlockSizes, flash_attention
from vlm_jax.models.decoder import DecoderLM
from vlm_jax.models.layers import Encoder
from vlm_jax.models.vit import ViT

TINY_BLOCKS = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def reference(q, k, v, visible, scale, d_out):
    """float64 attention and its (dq, dk, dv); visible: bool[B, 1, Tq, Tk]."""
    q, k, v, d_out = (np.asarray(a, np.float64) for a in (q, k, v, d_out))
    group = q.shape[2] // k.shape[2]
    kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.where(visible, np.einsum("bqhd,bkhd->bhqk", q, kr) * scale, -np.inf)
    row_max = np.max(logits, axis=-1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0))
    denom = weights.sum(-1, keepdims=True)
    p = weights / np.where(denom > 0, denom, 1.0)  # [B, H, Tq, Tk]
    out = np.einsum("bhqk,bkhd->bqhd", p, vr)
    dv = np.einsum("bhqk,bqhd->bkhd", p, d_out)
    dp = np.einsum("bqhd,bkhd->bhqk", d_out, vr)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True)) * scale
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr)
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q)
    fold = lambda g: g.reshape(*k.shape[:3], group, k.shape[3]).sum(3)  # GQA: sum the group
    return out, (dq, fold(dk), fold(dv))


def make_mask(kind, batch, q_len, kv_len, rng):
    """One AttentionMask of the given kind (None: bidirectional, no padding)."""
    sorted_ids = lambda n: jnp.array(np.sort(rng.integers(0, 3, (batch, n)), axis=1))
    valid = jnp.array(rng.random((batch, kv_len)) < 0.7)
    prefix = jnp.array(rng.integers(0, q_len + 1, batch))
    decode_positions = jnp.broadcast_to(kv_len - q_len + jnp.arange(q_len), (batch, q_len))
    masks = {
        "none": lambda: None,
        "causal": lambda: AttentionMask(causal=True),
        "prefix": lambda: AttentionMask(causal=True, prefix_lengths=prefix),
        "segments": lambda: AttentionMask(
            q_segment_ids=sorted_ids(q_len), kv_segment_ids=sorted_ids(kv_len)
        ),
        "padding": lambda: AttentionMask(kv_valid=valid),
        "decode": lambda: AttentionMask(causal=True, q_positions=decode_positions),
        "all": lambda: AttentionMask(
            causal=True,
            prefix_lengths=prefix,
            q_segment_ids=sorted_ids(q_len),
            kv_segment_ids=sorted_ids(kv_len),
            kv_valid=valid,
        ),
    }
    return masks[kind]()


def rel_err(got, want) -> float:
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    assert np.all(np.isfinite(got))
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def check_against_reference(shape, kind, dtype, tol, seed, blocks=TINY_BLOCKS):
    batch, q_len, kv_len, heads, kv_heads, dim = shape
    rng = np.random.default_rng(seed)
    draw = lambda *s: jnp.array(rng.standard_normal(s), dtype)
    q, k, v = (
        draw(batch, q_len, heads, dim),
        draw(batch, kv_len, kv_heads, dim),
        draw(batch, kv_len, kv_heads, dim),
    )
    d_out = draw(batch, q_len, heads, dim)
    mask = make_mask(kind, batch, q_len, kv_len, rng)
    if kind == "decode" and kv_len < q_len:
        pytest.skip("decoding needs at least as many keys as queries")
    visible = (
        np.ones((batch, 1, q_len, kv_len), bool)
        if mask is None
        else np.asarray(mask.dense(batch, q_len, kv_len))
    )
    want_out, want_grads = reference(q, k, v, visible, dim**-0.5, d_out)
    fn = lambda q, k, v: flash_attention(q, k, v, mask, block_sizes=blocks)
    out, vjp = jax.vjp(fn, q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, want_out) <= tol, kind
    for name, got, want in zip(("dq", "dk", "dv"), vjp(d_out), want_grads):
        assert rel_err(got, want) <= tol, (kind, name)


# (batch, q_len, kv_len, heads, kv_heads, head_dim): odd lengths, cross-attention, GQA.
SHAPES = [
    (2, 37, 37, 4, 4, 16),
    (1, 20, 45, 6, 2, 32),
    (2, 33, 17, 3, 1, 8),
    (1, 48, 48, 2, 1, 64),
]
KINDS = ["none", "causal", "prefix", "segments", "padding", "decode", "all"]
FP32_CASES = [(SHAPES[i % len(SHAPES)], kind, i) for i, kind in enumerate(KINDS)]


@pytest.mark.parametrize("shape,kind,seed", FP32_CASES)
def test_float32_matches_float64_reference(shape, kind, seed):
    check_against_reference(shape, kind, jnp.float32, 2e-5, seed)


@pytest.mark.parametrize("shape,kind,seed", [(SHAPES[0], "all", 20), (SHAPES[1], "prefix", 21)])
def test_bfloat16_matches_float64_reference(shape, kind, seed):
    check_against_reference(shape, kind, jnp.bfloat16, 2e-2, seed)


def test_uneven_forward_and_backward_blocks():
    blocks = BlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)
    check_against_reference((1, 40, 50, 4, 2, 16), "all", jnp.float32, 2e-5, 30, blocks)


def test_fully_masked_rows_are_zero_with_zero_gradients():
    rng = np.random.default_rng(3)
    q, k, v = (jnp.array(rng.standard_normal((2, 20, 2, 16)), jnp.float32) for _ in range(3))
    valid = jnp.array(np.arange(20)[None, :] >= np.array([[20], [5]]))  # example 0: no key
    mask = AttentionMask(kv_valid=valid)
    fn = lambda q, k, v: flash_attention(q, k, v, mask, block_sizes=TINY_BLOCKS)
    out, vjp = jax.vjp(fn, q, k, v)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    dq, dk, dv = vjp(jnp.ones_like(out))
    for grad in (dq, dk, dv):
        assert np.all(np.isfinite(np.asarray(grad)))
        np.testing.assert_array_equal(np.asarray(grad[0]), 0.0)


def test_masked_out_blocks_are_skipped():
    """NaNs in key blocks that no query may see never reach the output or gradients.

    A computed-then-masked block would give 0 * NaN = NaN in p @ v; a skipped one gives
    nothing. Keys 32..63 (two whole 16-key blocks) are invalid (padding) and, for the
    causal case, also in the future of queries 0..31.
    """
    rng = np.random.default_rng(4)
    q = jnp.array(rng.standard_normal((1, 32, 2, 16)), jnp.float32)
    kv = rng.standard_normal((2, 1, 64, 2, 16)).astype(np.float32)
    clean_k, clean_v = jnp.array(kv[0, :, :32]), jnp.array(kv[1, :, :32])
    kv[:, :, 32:] = np.nan
    k, v = jnp.array(kv[0]), jnp.array(kv[1])
    valid = jnp.array(np.arange(64)[None, :] < 32)
    for mask in (AttentionMask(kv_valid=valid), AttentionMask(causal=True)):
        fn = lambda q, k, v, mask=mask: flash_attention(q, k, v, mask, block_sizes=TINY_BLOCKS)
        out, vjp = jax.vjp(fn, q, k, v)
        dq, dk, dv = vjp(jnp.ones_like(out))
        clean_mask = AttentionMask(causal=mask.causal)
        want = flash_attention(q, clean_k, clean_v, clean_mask, block_sizes=TINY_BLOCKS)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)
        assert np.all(np.isfinite(np.asarray(dq)))
        np.testing.assert_array_equal(np.asarray(dk[:, 32:]), 0.0)
        np.testing.assert_array_equal(np.asarray(dv[:, 32:]), 0.0)


def test_dispatcher_registers_pallas_and_auto_is_xla_on_cpu():
    assert "pallas" in ATTENTION_IMPLS.names()
    if jax.default_backend() == "cpu":
        assert resolve_impl("auto") == "xla"
    else:
        assert resolve_impl("auto") == "pallas"


def test_dispatcher_pallas_matches_xla():
    rng = np.random.default_rng(5)
    q = jnp.array(rng.standard_normal((2, 24, 4, 32)), jnp.float32)
    k, v = (jnp.array(rng.standard_normal((2, 24, 2, 32)), jnp.float32) for _ in range(2))
    mask = AttentionMask(causal=True, prefix_lengths=jnp.array([3, 10]))
    got = attention(q, k, v, mask, impl="pallas")
    want = attention(q, k, v, mask, impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def assert_same_with_xla_and_pallas(make_model, inputs, **kwargs):
    """Forward outputs and parameter gradients agree between impl="xla" and impl="pallas"."""
    params = make_model("xla").init(jax.random.key(0), *inputs, **kwargs)

    def loss(params, impl):
        out = make_model(impl).apply(params, *inputs, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(jnp.sin(out)), out

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    results = {impl: grad_fn(params, impl) for impl in ("xla", "pallas")}
    (_, xla_out), xla_grads = results["xla"]
    (_, pl_out), pl_grads = results["pallas"]
    np.testing.assert_allclose(np.asarray(pl_out), np.asarray(xla_out), rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(pl_grads), jax.tree.leaves(xla_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_mask", [False, True])
def test_sharded_equals_unsharded_without_gathers(with_mask):
    """Under a (data, fsdp, tensor) mesh the kernel runs per shard (batch x heads)."""
    shape = (2, 1, 2) if len(jax.devices()) >= 4 else (1, 1, 1)  # CPU tests simulate 8
    devices = jax.devices()[: math.prod(shape)]
    mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), (AxisType.Auto,) * 3, devices=devices)
    rules = (("act_batch", ("data", "fsdp")), ("act_heads", "tensor"))
    rng = np.random.default_rng(10)
    q = jnp.array(rng.standard_normal((4, 24, 4, 16)), jnp.float32)
    k, v = (jnp.array(rng.standard_normal((4, 24, 2, 16)), jnp.float32) for _ in range(2))
    prefix = jnp.array([0, 5, 9, 24])
    mask = AttentionMask(causal=True, prefix_lengths=prefix) if with_mask else None

    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask, impl="pallas"), q, k, v)
        return out, vjp(jnp.cos(out))

    want = jax.jit(fwd_bwd)(q, k, v)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharding = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
        args = [jax.device_put(x, sharding) for x in (q, k, v)]
        compiled = jax.jit(fwd_bwd).lower(*args).compile()
        got = compiled(*args)
    assert "all-gather" not in compiled.as_text()
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_encoder_same_with_xla_and_pallas():
    """The shared Encoder stack (2 blocks) with a key-padding mask, 19 tokens."""
    x = jnp.array(np.random.default_rng(6).standard_normal((2, 19, 32)), jnp.float32)
    mask = AttentionMask(kv_valid=jnp.broadcast_to(jnp.arange(19) < 15, (2, 19)))
    make = lambda impl: Encoder(depth=2, num_heads=2, mlp_dim=64, attention_impl=impl)
    assert_same_with_xla_and_pallas(make, (x, mask))


@pytest.mark.slow
def test_vit_same_with_xla_and_pallas():
    """ViT on 25 patches (an odd length) with MAP pooling (1 query attending 25 keys)."""
    images = jnp.array(np.random.default_rng(7).uniform(-1, 1, (2, 20, 20, 3)), jnp.float32)
    make = lambda impl: ViT(
        width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4, pool="map", attention_impl=impl
    )
    assert_same_with_xla_and_pallas(make, (images,))


@pytest.mark.slow
def test_decoder_same_with_xla_and_pallas():
    """GQA decoder with a prefix-LM mask and gated cross-attention over padded media."""
    rng = np.random.default_rng(8)
    tokens = jnp.array(rng.integers(1, 40, (2, 11)), jnp.int32)
    media = jnp.array(rng.standard_normal((2, 5, 32)), jnp.float32)
    make = lambda impl: DecoderLM(
        vocab_size=40,
        width=32,
        depth=1,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=48,
        cross_attention_every=1,
        attention_impl=impl,
    )
    assert_same_with_xla_and_pallas(
        make,
        (tokens,),
        prefix_lengths=jnp.array([4, 0]),
        media=media,
        media_valid=jnp.array([[True] * 5, [True, True, False, False, False]]),
    )


# Custom-call targets the kernels lower to, per platform. Triton's has no serialization
# guarantee, so export must be told that this module is only inspected, never stored.
LOWERED_TARGETS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


@pytest.mark.parametrize(
    "platform,kind,dim",
    [("tpu", "none", 64), ("tpu", "all", 64)]
    + [("cuda", kind, 64) for kind in KINDS]
    + [("cuda", "causal", 128), ("cuda", "causal", 256)],
)
def test_kernels_lower_for_tpu_and_gpu(platform, kind, dim):
    """Forward and backward lower through Mosaic (TPU) and Triton (GPU) from this host.

    CI has neither chip, so this is what guards the compiled paths there: the whole
    Pallas -> Mosaic / Triton IR lowering runs (unsupported ops, layouts and shapes fail
    here); compiling that IR to machine code and running it need the chip.
    """
    batch, length = 2, 197  # odd length, GQA 4 -> 2, bf16
    q = jax.ShapeDtypeStruct((batch, length, 4, dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch, length, 2, dim), jnp.bfloat16)
    mask = make_mask(kind, batch, length, length, np.random.default_rng(9))
    backend = "tpu" if platform == "tpu" else "gpu"
    fn = lambda q, k, v: flash_attention(q, k, v, mask, backend=backend, interpret=False)
    fwd_bwd = lambda q, k, v: jax.vjp(fn, q, k, v)[1](q)
    target = LOWERED_TARGETS[platform]
    unchecked = [jax.export.DisabledSafetyCheck.custom_call(target)]
    export = jax.export.export(jax.jit(fwd_bwd), platforms=[platform], disabled_checks=unchecked)
    exported = export(q, kv, kv)
    module = exported.mlir_module()
    names = ("flash_fwd", "flash_bwd_dkv", "flash_bwd_dq")
    assert module.count(target) >= 3 and all(name in module for name in names)
