"""LoRA (Hu et al. 2021): low-rank adapters on the dense kernels that `optim.lora.targets` names.

A Dense kernel W[in, out] whose param path ("lm/blocks_0/attn/query/kernel") fully matches the
regex gets two params beside it, `lora_a` A[in, r] (Kaiming-uniform, as PEFT) and `lora_b`
B[r, out] (zeros), and its layer computes

    y = x @ W + (alpha / r) * dropout(x) @ A @ B

(a HeadsDense kernel W[*in, *out] the same with A[*in, r], B[r, *out]). B = 0 makes the model
at init the base model exactly. With `optim.lora.rank > 0` every other param is frozen
(optim.freeze's mechanism: zero update, no optimizer state, no weight gradients) except those
`optim.lora.train` names (e.g. a VLM's connector).

Why an interceptor (`nn.intercept_methods` around the Dense / HeadsDense calls), not merged
weights in the loss: dropout acts on the adapter's input, so the adapter path must exist in the
forward pass; and with W frozen the backward pass needs only x's gradient and A's and B's, never
the [in, out] gradient of W + (alpha / r) A B, which is LoRA's memory saving. The models stay
unaware of LoRA (any Dense or HeadsDense, scanned or rematerialised, can be adapted).

The adapters are ordinary params of the train state, so sharding (their logical axes follow the
kernel's), checkpoints and resume treat them as any other. Evaluation, generation and export use
`merged(params, lora)`: W + (alpha / r) A B in place of W, no adapter path left (the same
function without dropout).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models.layers import HeadsDense
from vlm_jax.schema import Key, Schema, resolve

ADAPTER_A, ADAPTER_B = "lora_a", "lora_b"  # the adapter params' names, beside the kernel
ADAPTER_REGEX = rf".*/({ADAPTER_A}|{ADAPTER_B})"  # their paths
ADAPTABLE = (nn.Dense, HeadsDense)  # the layers `in_dims` knows


def _valid_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _check(path: str, section: dict) -> None:
    if section["rank"] > 0 and not section["targets"]:
        raise ValueError(
            f"{path}.rank={section['rank']} needs {path}.targets, a regex over kernel paths "
            "(e.g. 'lm/.*/attn/(query|value)/kernel')"
        )


LORA = Schema(
    {
        "rank": Key(int, 0, "adapter rank r (0: no LoRA)", valid=lambda r: r >= 0, expect=">= 0"),
        "alpha": Key(
            float,
            16.0,
            "the adapter's output is scaled by alpha / rank",
            valid=lambda a: a > 0,
            expect="> 0",
        ),
        "dropout": Key(
            float,
            0.0,
            "dropout rate on the adapter's input (training only)",
            valid=lambda p: 0 <= p < 1,
            expect="a rate in [0, 1)",
        ),
        "targets": Key(
            str,
            "",
            "regex fully matching the param paths of the kernels to adapt",
            valid=_valid_regex,
            expect="a valid regular expression",
        ),
        "train": Key(
            tuple,
            (),
            "regexes over param paths that train in full beside the adapters (e.g. the connector)",
            valid=lambda ps: all(isinstance(p, str) and _valid_regex(p) for p in ps),
            expect="a tuple of valid regular expressions",
        ),
    },
    doc="optim.lora: low-rank adapters; everything else frozen",
    check=_check,
)


# optim.lora of the runs from before LoRA (the defaults: rank 0) as their config.json would
# read it, tuples as JSON lists (Task.added_keys)
OFF = {
    name: list(key.default) if isinstance(key.default, tuple) else key.default
    for name, key in LORA.keys.items()
}


def lora_section(optim: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """optim.lora resolved (defaults filled; configs from before LoRA: rank 0)."""
    return resolve("optim.lora", optim.get("lora"), LORA)


def enabled(lora: ml_collections.ConfigDict) -> bool:
    return lora.rank > 0


def in_dims(module: nn.Module) -> int:
    """How many leading kernel dims the layer contracts with its input (the rest: outputs)."""
    return module.in_dims if isinstance(module, HeadsDense) else 1


class Adapters:
    """The interceptor: adds the adapter path to the calls of the targeted layers.

    `train` turns on dropout (its key from the "dropout" RNG stream the tasks' losses pass).
    While initialising, it records every adaptable kernel's path, for `check`.
    """

    def __init__(self, lora: ml_collections.ConfigDict, train: bool = False):
        self.lora = lora
        self.pattern = re.compile(lora.targets)
        self.train = train
        self.adaptable: dict[str, None] = {}  # ordered set

    def __call__(self, next_fun: Callable, args, kwargs, context) -> Any:
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, ADAPTABLE):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        path = "/".join(module.path) + "/kernel"
        if module.is_initializing():
            self.adaptable[path] = None
        if not self.pattern.fullmatch(path):
            return y
        (x,) = (*args, *kwargs.values())  # both layers take one input
        return y + self.delta(module, x).astype(y.dtype)

    def delta(self, module: nn.Module, x: jax.Array) -> jax.Array:
        """(alpha / r) * dropout(x) @ A @ B: x[..., *in] -> [..., *out]."""
        a, b = adapter_params(module, self.lora.rank)
        rate = self.lora.dropout
        if self.train and rate > 0:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
        dtype = jnp.result_type(x.dtype, module.dtype or x.dtype)
        h = jnp.tensordot(x.astype(dtype), a.astype(dtype), axes=in_dims(module))  # [..., r]
        return jnp.tensordot(h, b.astype(dtype), axes=1) * scale(self.lora)

    def check(self, params: Any) -> None:
        """Fail when the targets regex adapted no kernel, naming the kernels it could adapt."""
        if split_adapters(nn.unbox(params))[1]:
            return
        shown = ", ".join(list(self.adaptable)[:12])
        more = f", ... ({len(self.adaptable)} in all)" if len(self.adaptable) > 12 else ""
        raise ValueError(
            f"optim.lora.targets={self.lora.targets!r} matches no kernel of a LoRA-adaptable "
            f"layer ({', '.join(c.__name__ for c in ADAPTABLE)}); their paths: "
            f"{shown or '(none)'}{more}"
        )


def adapter_params(module: nn.Module, rank: int) -> tuple[jax.Array, jax.Array]:
    """The layer's (A float32[*in, r], B float32[r, *out]), created at init with the kernel's
    logical axis names (the rank axis unsharded)."""
    kernel = module.get_variable("params", "kernel")
    shape = jnp.shape(nn.unbox(kernel))
    n_in = in_dims(module)
    names = kernel.names if isinstance(kernel, nn.LogicallyPartitioned) else (None,) * len(shape)
    # PEFT's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    a_init = nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1
    )
    a = module.param(
        ADAPTER_A,
        nn.with_logical_partitioning(a_init, (*names[:n_in], None)),
        (*shape[:n_in], rank),
        jnp.float32,
    )
    b = module.param(
        ADAPTER_B,
        nn.with_logical_partitioning(nn.initializers.zeros, (None, *names[n_in:])),
        (rank, *shape[n_in:]),
        jnp.float32,
    )
    return nn.unbox(a), nn.unbox(b)


def scale(lora: ml_collections.ConfigDict) -> float:
    return lora.alpha / lora.rank


@contextlib.contextmanager
def adapted(lora: ml_collections.ConfigDict, train: bool = False) -> Iterator[Adapters | None]:
    """Inside: model init / apply with the adapters (None and no change without LoRA)."""
    if not enabled(lora):
        yield None
        return
    adapters = Adapters(lora, train)
    with nn.intercept_methods(adapters):
        yield adapters


def split_adapters(params: Any) -> tuple[Any, Any]:
    """params -> (base params without the adapters, the adapters: {..: {lora_a, lora_b}} of the
    adapted layers, nested as in params)."""
    if not isinstance(params, dict):
        return params, None
    base, adapters = {}, {}
    for key, value in params.items():
        if key in (ADAPTER_A, ADAPTER_B):
            adapters[key] = value
            continue
        base[key], sub = split_adapters(value)
        if sub:
            adapters[key] = sub
    return base, adapters


def join_adapters(base: Any, adapters: Any) -> Any:
    """The inverse of `split_adapters`."""
    if not adapters:
        return base
    out = dict(base)
    for key, value in adapters.items():
        out[key] = value if key in (ADAPTER_A, ADAPTER_B) else join_adapters(base[key], value)
    return out


def on_base(fn: Callable[[Any], Any], params: Any) -> Any:
    """`params` with `fn` applied to their base part (the adapters kept): e.g. loading
    pretrained weights, which have no adapters, into a LoRA run."""
    base, adapters = split_adapters(params)
    return join_adapters(fn(base), adapters)


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, factor: float) -> jax.Array:
    """W + factor * A B. W[*lead, *in, *out], A[*lead, *in, r], B[*lead, r, *out]; `lead`: the
    stacked layers of a scanned stack (their count follows from the three ranks)."""
    lead = a.ndim + b.ndim - 2 - kernel.ndim
    lead_shape = kernel.shape[:lead]
    a2 = a.reshape(*lead_shape, -1, a.shape[-1])  # [*lead, in, r]
    b2 = b.reshape(*lead_shape, b.shape[lead], -1)  # [*lead, r, out]
    delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape)
    return (kernel + factor * delta).astype(kernel.dtype)


def merge_lora(params: Any, adapters: Any, lora: ml_collections.ConfigDict) -> Any:
    """Base `params` with every adapted kernel replaced by W + (alpha / r) A B (for evaluation
    and export; pure, the inputs unchanged). `adapters` as `split_adapters` returns them,
    `lora` the optim.lora section."""
    if not adapters:
        return params
    if ADAPTER_A in adapters:
        kernel = merged_kernel(
            params["kernel"], adapters[ADAPTER_A], adapters[ADAPTER_B], scale(lora)
        )
        return dict(params, kernel=kernel)
    return dict(params, **{k: merge_lora(params[k], v, lora) for k, v in adapters.items()})


def merged(params: Any, lora: ml_collections.ConfigDict) -> Any:
    """A train state's params (adapters included) as the base model's params with the adapters
    merged in; unchanged without LoRA."""
    if not enabled(lora):
        return params
    return merge_lora(*split_adapters(params), lora)
