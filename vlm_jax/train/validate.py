"""Up-front config validation: every choice is checked before any device work."""

from __future__ import annotations

import ml_collections

from vlm_jax.config import check_choice
from vlm_jax.data.records import LONG_CAPTION_CHOICES, ON_ERROR_CHOICES
from vlm_jax.train.numerics import CHOICES as NONFINITE_CHOICES

DTYPES = ("float32", "bfloat16")
ATTENTION_CHOICES = ("auto", "xla", "pallas", "cudnn")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the bad value and the valid choices."""
    from vlm_jax.train.tasks import TASKS

    check_choice("task", config.task, TASKS.names)
    model = config.get("model")
    if model is not None:
        check_choice("model.dtype", model.get("dtype", "float32"), DTYPES)
        check_choice("model.attention_impl", model.get("attention_impl", "auto"), ATTENTION_CHOICES)
    train = config.train
    for key in ("batch_size", "total_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        if int(train[key]) <= 0:
            raise ValueError(f"train.{key}={train[key]!r} must be a positive integer")
    if train.eval_every < 0:
        raise ValueError(f"train.eval_every={train.eval_every!r} must be >= 0 (0: only at the end)")
    check_choice("train.on_nonfinite", train.get("on_nonfinite", "skip"), NONFINITE_CHOICES)
    check_choice("optim.name", config.optim.name, ("adamw",))
    check_choice("optim.schedule", config.optim.schedule, ("cosine", "linear", "constant"))
    data = config.get("data") or {}
    check_choice("data.on_error", data.get("on_error", "skip"), ON_ERROR_CHOICES)
    check_choice("data.long_captions", data.get("long_captions", "truncate"), LONG_CAPTION_CHOICES)
