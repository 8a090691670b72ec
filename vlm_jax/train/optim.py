"""Optimizer from config: AdamW, warmup + decay schedule, clipping, decay mask, freezing.

Parameters are addressed by their path joined with "/" (e.g. "img/block_0/attn/query/kernel").
`optim.freeze` is a tuple of regexes: matching params are frozen (zero update, no optimizer
state; `Task.stop_frozen` also keeps their backward pass out of the compiled step). With LoRA
(`optim.lora.rank > 0`, models/lora.py) every param but the adapters and those `optim.lora.train`
names is frozen the same way (`frozen_mask`, the one place that says what is frozen). Weight
decay applies to params whose path matches `optim.decay_regex` (default: every matrix
"kernel", "embedding" and position embedding; not biases, norms, temperature).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import ml_collections
import optax

from vlm_jax.models import lora as lora_lib

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw",)  # optim.name


def param_paths(params) -> object:
    """A tree like `params` whose leaves are "a/b/c" path strings."""

    def path_str(path, _):
        return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)

    return jax.tree_util.tree_map_with_path(path_str, params)


def regex_mask(params, patterns: Sequence[str]) -> object:
    """bool tree: True where the param path fully matches any of `patterns`."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree.map(lambda p: any(c.fullmatch(p) for c in compiled), param_paths(params))


def frozen_mask(params, optim: ml_collections.ConfigDict) -> object:
    """bool tree: True for the params that do not train (optim.freeze; with LoRA, also every
    param that is neither an adapter nor named by optim.lora.train)."""
    frozen = regex_mask(params, optim.freeze)
    lora = lora_lib.lora_section(optim)
    if not lora_lib.enabled(lora):
        return frozen
    trained = regex_mask(params, [lora_lib.ADAPTER_REGEX, *lora.train])
    return jax.tree.map(lambda f, t: f or not t, frozen, trained)


def has_frozen(optim: ml_collections.ConfigDict) -> bool:
    """Whether the config freezes anything (then the optimizer state is split by `frozen_mask`)."""
    return bool(optim.freeze) or lora_lib.enabled(lora_lib.lora_section(optim))


def build_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    warmup = min(optim.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = optim.lr * optim.end_lr_fraction
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_fraction)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(optim.lr, end, decay_steps)
    elif optim.schedule == "constant":
        decay = optax.constant_schedule(optim.lr)
    else:
        raise ValueError(f"optim.schedule={optim.schedule!r} is not one of: {', '.join(SCHEDULES)}")
    warmup_fn = optax.linear_schedule(0.0, optim.lr, max(warmup, 1))
    return optax.join_schedules([warmup_fn, decay], [warmup])


def build_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int, params
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The full transformation for `params` and the learning-rate schedule (for logging)."""
    schedule = build_schedule(optim, total_steps)
    decay_mask = regex_mask(params, [optim.decay_regex])
    steps = []
    if optim.grad_clip_norm:
        steps.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    steps.append(
        optax.adamw(
            schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=decay_mask,
        )
    )
    tx = optax.chain(*steps)
    if has_frozen(optim):
        frozen = frozen_mask(params, optim)
        labels = jax.tree.map(lambda f: "frozen" if f else "trained", frozen)
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
