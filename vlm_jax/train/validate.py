"""Up-front config validation: every key and choice is checked before any device work.

The component sections (model, loss, data, tokenizer, init, eval, and their sub-sections such
as model.connector) are resolved against the schemas their components declare
(vlm_jax/schema.py): CONFIG selects the task by `config.task`, the task's SCHEMA names the
sections it reads and the registry that selects each (model.name, model.connector.name,
data.source, eval.tasks, ...). eval.tasks must name evaluators the task accepts. The trainer's
own sections (train, optim and its optim.lora, mesh) and the metric writers
(train.metric_writers, wandb) are checked below.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from vlm_jax.config import ConfigError, check_choice
from vlm_jax.evaluate import EVALUATORS, accepted
from vlm_jax.models.lora import lora_section
from vlm_jax.schema import Schema, Select, resolve
from vlm_jax.train.metrics import METRIC_WRITERS, WANDB, require_packages, writer_names
from vlm_jax.train.numerics import CHOICES as NONFINITE_CHOICES
from vlm_jax.train.optim import OPTIMIZERS, SCHEDULES
from vlm_jax.train.tasks import TASKS

# The whole config: the task's sections; the others (train, optim, ...) are left as given.
CONFIG = Select(TASKS, by="task", base=Schema(open=True))


def resolve_config(config: ml_collections.ConfigDict, unknown: str = "error"):
    """The config with every section its task reads resolved (defaults filled, see
    schema.resolve); raises a ConfigError naming every bad section key."""
    return resolve("", config, CONFIG, unknown)


def resolved_sections(config_json: str) -> dict[str, Any]:
    """A config.json's sections as the code reads them: keys the components declare, defaults
    filled; keys no component declares are dropped (they had no effect: e.g. the other
    connectors' keys that model.connector held before each connector declared its own). The
    text as written if it does not resolve (then the sections are compared as they are)."""
    full = json.loads(config_json)
    try:
        resolved = resolve_config(ml_collections.ConfigDict(full), unknown="drop")
    except (ConfigError, TypeError, ValueError):
        return full
    return json.loads(json.dumps(resolved.to_dict(), default=str))


def check_image_sizes(config: ml_collections.ConfigDict) -> None:
    """model.image.image_size (what the tower is built for) must be data.image_size (what the
    pipeline feeds it): a learned posemb sized for one would not fit the other's patch grid."""
    if "image" not in config.get("model", {}) or "data" not in config:
        return  # a text-only model, or a config without the sections (checked by its task)
    model_size, data_size = config.model.image.image_size, config.data.image_size
    if model_size != data_size:
        raise ValueError(
            f"model.image.image_size={model_size} != data.image_size={data_size}; "
            "set both to the resolution the tower should see"
        )


def check_eval_tasks(config: ml_collections.ConfigDict) -> None:
    """eval.tasks: evaluators the task accepts, each once (checked before anything compiles,
    not at the first evaluation)."""
    if config.get("task") not in TASKS:
        return  # resolve_config names the valid tasks
    task = TASKS.get(config.task)
    try:
        names = task.SCHEMA.keys["eval"].names(config.get("eval"))
    except ConfigError:
        return  # not a tuple of names: resolve_config says so, with the section's other problems
    valid = accepted(config.task, task.evaluators)
    for name in names:
        if name not in valid:
            elsewhere = " (an evaluator of other tasks)" if name in EVALUATORS else ""
            raise ConfigError(
                f"eval.tasks={name!r}{elsewhere} is not one of: {', '.join(valid) or '(none)'} "
                f"(the evaluators task {config.task!r} accepts)"
            )
        check_choice("eval.tasks", name, EVALUATORS.names)
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.tasks={names!r} names an evaluator twice")


def check_metric_writers(config: ml_collections.ConfigDict) -> None:
    """train.metric_writers: a tuple of known names, each once, their packages installed;
    the wandb section resolves (wandb.mode one of WANDB_MODES)."""
    names = writer_names(config)
    for name in names:
        check_choice("train.metric_writers", name, METRIC_WRITERS.names)
    if len(set(names)) != len(names):
        raise ValueError(f"train.metric_writers={names!r} names a writer twice")
    resolve("wandb", config.get("wandb"), WANDB)
    require_packages(names)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the bad value and the valid choices."""
    check_eval_tasks(config)  # first: an evaluator the task lacks, not the keys it would read
    resolved = resolve_config(config)
    check_image_sizes(resolved)
    train = config.train
    positive = ("batch_size", "total_steps", "log_every", "checkpoint_every", "keep_checkpoints")
    for key in (*positive, "worker_buffer_size"):
        if int(train[key]) <= 0:
            raise ValueError(f"train.{key}={train[key]!r} must be a positive integer")
    if train.eval_every < 0:
        raise ValueError(f"train.eval_every={train.eval_every!r} must be >= 0 (0: only at the end)")
    check_choice("train.on_nonfinite", train.on_nonfinite, NONFINITE_CHOICES)
    check_metric_writers(config)
    check_choice("optim.name", config.optim.name, OPTIMIZERS)
    check_choice("optim.schedule", config.optim.schedule, SCHEDULES)
    lora_section(config.optim)
