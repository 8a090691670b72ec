"""Shared building blocks: dense layers with logical axes, attention, MLP, encoder stacks.

Logical axis names used on weights (mapped to mesh axes by the config's rule table):
  embed, mlp, heads, kv_heads, head_dim, vocab, layers, (None for tiny dims).
Activation names: act_batch, act_length, act_embed, act_mlp, act_heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.kernels import AttentionMask, attention

Dtype = Any
default_kernel_init = nn.initializers.xavier_uniform()
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Dtype:
    """The config's `model.dtype` string -> a jnp dtype (params stay float32 regardless)."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype={name!r} is not one of: {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def check_heads(where: str, width: int, num_heads: int) -> int:
    """width // num_heads, failing (not silently truncating the heads) when it is not whole."""
    if num_heads <= 0 or width % num_heads:
        raise ValueError(
            f"{where}: width={width} is not divisible by num_heads={num_heads} "
            "(the heads would silently drop width % num_heads dims)"
        )
    return width // num_heads


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names (a no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, tuple(names))


def logical_dense(
    features: int,
    names: tuple[str | None, str | None],
    *,
    dtype: Dtype,
    use_bias: bool = True,
    kernel_init=default_kernel_init,
    name: str | None = None,
) -> nn.Dense:
    """nn.Dense whose kernel [in, out] and bias [out] carry logical axis names."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_bias=use_bias,
        kernel_init=nn.with_logical_partitioning(kernel_init, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)),
        name=name,
    )


def layer_norm(dtype: Dtype, name: str | None = None, eps: float = 1e-6) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of GELU (its released weights were trained with it)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": quick_gelu,
}


def activation_fn(name: str):
    """The activation called `name`; released checkpoints differ here, so it is a config key."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not one of: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MlpBlock(nn.Module):
    """Transformer MLP: x[B, T, D] -> Dense(mlp_dim) -> activation -> Dense(D)."""

    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout: float = 0.0
    activation: str = "gelu_tanh"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        width = x.shape[-1]
        h = logical_dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        h = activation_fn(self.activation)(h)
        h = nn.Dropout(self.dropout)(h, deterministic)
        return logical_dense(width, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class HeadsDense(nn.Module):
    """Dense over the last `in_dims` input dims to `features` dims (e.g. [B,T,D] -> [B,T,H,hd]).

    Like nn.DenseGeneral (same param names, shapes and Xavier fans), but the kernel is created
    in its final shape: DenseGeneral initialises a flat kernel and reshapes the boxed value,
    which applies the N-d logical constraint to a 2-d array and fails under a mesh.
    `names`: logical names of the kernel's in dims then feature dims.
    """

    features: tuple[int, ...]
    names: tuple[str | None, ...]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    in_dims: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.in_dims :]
        n_in, n_out = len(in_shape), len(self.features)
        init = nn.initializers.xavier_uniform(
            in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out))
        )
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, self.names),
            (*in_shape, *self.features),
            jnp.float32,
        )
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n_in)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.names[n_in:]),
                self.features,
                jnp.float32,
            )
            y = y + bias.astype(self.dtype)
        return y


class MultiHeadAttention(nn.Module):
    """Multi-head (optionally grouped-query) attention through the kernel dispatcher.

    inputs_q: [B, Tq, D]; inputs_kv: [B, Tk, Dkv] (defaults to inputs_q) -> [B, Tq, D].
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    out_features: int | None = None
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    use_bias: bool = True

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None = None,
        mask: AttentionMask | None = None,
    ) -> jax.Array:
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        width = inputs_q.shape[-1]
        head_dim = self.head_dim or check_heads("MultiHeadAttention", width, self.num_heads)
        kv_heads = self.num_kv_heads or self.num_heads

        def project(x, heads, names, name):
            return HeadsDense((heads, head_dim), names, self.use_bias, self.dtype, name=name)(x)

        q = project(inputs_q, self.num_heads, ("embed", "heads", "head_dim"), "query")
        k = project(inputs_kv, kv_heads, ("embed", "kv_heads", "head_dim"), "key")
        v = project(inputs_kv, kv_heads, ("embed", "kv_heads", "head_dim"), "value")
        q = constrain(q, ("act_batch", "act_length", "act_heads", None))
        out = attention(q, k, v, mask, impl=self.attention_impl)  # [B, Tq, H, hd]
        return HeadsDense(
            (self.out_features or width,),
            ("heads", "head_dim", "embed"),
            self.use_bias,
            self.dtype,
            in_dims=2,
            name="out",
        )(out)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)); x + MLP(LN(x)). x: [B, T, D]."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout: float = 0.0
    attention_impl: str = "auto"
    activation: str = "gelu_tanh"
    ln_eps: float = 1e-6

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: AttentionMask | None = None, deterministic: bool = True
    ) -> jax.Array:
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        h = layer_norm(self.dtype, name="ln_attn", eps=self.ln_eps)(x)
        h = MultiHeadAttention(
            self.num_heads, dtype=self.dtype, attention_impl=self.attention_impl, name="attn"
        )(h, mask=mask)
        x = x + nn.Dropout(self.dropout)(h, deterministic)
        h = layer_norm(self.dtype, name="ln_mlp", eps=self.ln_eps)(x)
        h = MlpBlock(
            self.mlp_dim,
            dtype=self.dtype,
            dropout=self.dropout,
            activation=self.activation,
            name="mlp",
        )(h, deterministic)
        return x + nn.Dropout(self.dropout)(h, deterministic)


class Encoder(nn.Module):
    """A stack of `depth` EncoderBlocks with optional remat and scan over layers.

    With `scan=True` the block weights are stacked on a leading "layers" axis, so compile
    time does not grow with depth. x: [B, T, D] -> [B, T, D] (final LayerNorm applied).
    """

    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout: float = 0.0
    attention_impl: str = "auto"
    remat: bool = False
    scan: bool = False
    activation: str = "gelu_tanh"
    ln_eps: float = 1e-6

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: AttentionMask | None = None, deterministic: bool = True
    ) -> jax.Array:
        block_cls = EncoderBlock
        if self.remat:
            block_cls = nn.remat(block_cls, static_argnums=(3,))
        kwargs = dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dtype=self.dtype,
            dropout=self.dropout,
            attention_impl=self.attention_impl,
            activation=self.activation,
            ln_eps=self.ln_eps,
        )
        if self.scan:
            scanned = nn.scan(
                lambda module, carry, _: (module(carry, mask, deterministic), None),
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(block_cls(**kwargs, name="blocks"), x, None)
        else:
            for i in range(self.depth):
                x = block_cls(**kwargs, name=f"block_{i}")(x, mask, deterministic)
        return layer_norm(self.dtype, name="ln_final", eps=self.ln_eps)(x)


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over tokens. x[B,T,D] -> [B,D]."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    activation: str = "gelu_tanh"
    ln_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, mask: AttentionMask | None = None) -> jax.Array:
        width = x.shape[-1]
        probe = self.param(
            "probe",
            nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, None, "embed")),
            (1, 1, width),
            jnp.float32,
        )
        probe = jnp.tile(probe, (x.shape[0], 1, 1)).astype(self.dtype)
        h = MultiHeadAttention(
            self.num_heads, dtype=self.dtype, attention_impl=self.attention_impl, name="attn"
        )(probe, x, mask=mask)
        y = layer_norm(self.dtype, name="ln", eps=self.ln_eps)(h)
        h = h + MlpBlock(self.mlp_dim, dtype=self.dtype, activation=self.activation, name="mlp")(y)
        return h[:, 0]


def sincos_2d(height: int, width: int, dim: int, temperature: float = 10_000.0) -> jax.Array:
    """Fixed 2-D sin-cos position embedding: float32[height * width, dim] (MoCo v3 / big_vision)."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got dim={dim}")
    y, x = jnp.mgrid[:height, :width]
    omega = 1.0 / temperature ** (jnp.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1))
    y = y.reshape(-1)[:, None] * omega[None, :]
    x = x.reshape(-1)[:, None] * omega[None, :]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
