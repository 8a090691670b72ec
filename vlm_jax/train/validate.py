"""Up-front config validation: every choice is checked before any device work."""

from __future__ import annotations

import ml_collections

from vlm_jax.config import check_choice
from vlm_jax.data.records import LONG_CAPTION_CHOICES, ON_ERROR_CHOICES
from vlm_jax.models.layers import COMPUTE_DTYPES
from vlm_jax.models.two_tower import attention_choices
from vlm_jax.train.metrics import METRIC_WRITERS, WANDB_MODES
from vlm_jax.train.numerics import CHOICES as NONFINITE_CHOICES


def check_image_sizes(config: ml_collections.ConfigDict) -> None:
    """model.image.image_size (what the tower is built for) must be data.image_size (what the
    pipeline feeds it): a learned posemb sized for one would not fit the other's patch grid."""
    model_size = (config.get("model") or {}).get("image", {}).get("image_size")
    data_size = (config.get("data") or {}).get("image_size")
    if model_size is not None and data_size is not None and model_size != data_size:
        raise ValueError(
            f"model.image.image_size={model_size} != data.image_size={data_size}; "
            "set both to the resolution the tower should see"
        )


def check_metric_writers(config: ml_collections.ConfigDict) -> None:
    """train.metric_writers: known names, each once; wandb.mode one of WANDB_MODES."""
    names = config.train.get("metric_writers", ("jsonl", "tensorboard"))
    for name in names:
        check_choice("train.metric_writers", name, METRIC_WRITERS.names)
    if len(set(names)) != len(names):
        raise ValueError(f"train.metric_writers={tuple(names)!r} names a writer twice")
    check_choice("wandb.mode", (config.get("wandb") or {}).get("mode", ""), WANDB_MODES)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the bad value and the valid choices."""
    from vlm_jax.train.tasks import TASKS

    check_choice("task", config.task, TASKS.names)
    model = config.get("model")
    if model is not None:
        check_choice("model.dtype", model.get("dtype", "float32"), tuple(COMPUTE_DTYPES))
        check_choice("model.attention_impl", model.get("attention_impl", "auto"), attention_choices)
    check_image_sizes(config)
    train = config.train
    for key in ("batch_size", "total_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        if int(train[key]) <= 0:
            raise ValueError(f"train.{key}={train[key]!r} must be a positive integer")
    if train.eval_every < 0:
        raise ValueError(f"train.eval_every={train.eval_every!r} must be >= 0 (0: only at the end)")
    check_choice("train.on_nonfinite", train.get("on_nonfinite", "skip"), NONFINITE_CHOICES)
    check_metric_writers(config)
    check_choice("optim.name", config.optim.name, ("adamw",))
    check_choice("optim.schedule", config.optim.schedule, ("cosine", "linear", "constant"))
    data = config.get("data") or {}
    check_choice("data.on_error", data.get("on_error", "skip"), ON_ERROR_CHOICES)
    check_choice("data.long_captions", data.get("long_captions", "truncate"), LONG_CAPTION_CHOICES)
