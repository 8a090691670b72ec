"""Task plug-ins for the one trainer.

A task turns a config into a model, its loss and its data, and names the evaluators it accepts
(`evaluators`: EVALUATORS names, vlm_jax/evaluate; `config.eval.tasks` picks among them, by
default all of them in that order). The trainer owns
everything else (mesh, sharded init, optimizer, jit, checkpoints, logging, signals). One file
per task in this package; it registers with `@TASKS.register("name")`, and its module name in
TASKS' `modules` below is the one line to add (imported on the first TASKS lookup). Select a task
with `config.task = "name"`. A task's `SCHEMA` names the config sections it reads, each a
`Select` of the registry whose component it names (model.name, data.source, ...) or a fixed
`Schema`; `vlm_jax.train.validate` resolves them before anything compiles.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax import lax
from jax.sharding import Mesh

from vlm_jax.data.records import COUNTERS, SUBSTITUTE
from vlm_jax.evaluate import EVALUATORS, Evaluator, eval_section
from vlm_jax.models import lora, posemb
from vlm_jax.models.vocab import check_vocab_rows
from vlm_jax.registry import Registry
from vlm_jax.schema import Key, Schema, resolve
from vlm_jax.train.optim import frozen_mask, has_frozen

TASKS = Registry(
    "task",
    modules=(
        "vlm_jax.train.tasks.contrastive",
        "vlm_jax.train.tasks.lm",
        "vlm_jax.train.tasks.vlm",
    ),
)
# config.init: where a fresh run's params come from (the trainer reads `checkpoint`), and how a
# ViT's learned posemb saved for another image size is resampled to this one (models/posemb.py).
INIT = Schema(
    {
        "checkpoint": Key(str, "", "a workdir (or checkpoints dir) to initialise from"),
        "posemb_resample": Key(
            str,
            "bicubic",
            "how a posemb saved at another image size is resampled",
            choices=posemb.RESAMPLE_METHODS,
        ),
        "posemb_antialias": Key(bool, True, "widen the resampling kernel when the grid shrinks"),
    }
)


def posemb_resample(config: ml_collections.ConfigDict) -> posemb.Resample:
    """config.init's posemb resampling (defaults filled for configs that predate its keys)."""
    init = resolve("init", config.get("init"), INIT, unknown="drop")  # the task's own keys too
    return posemb.Resample(init.posemb_resample, init.posemb_antialias)


def check_vocab_size(key: str, vocab_size: int, tokenizer) -> None:
    """The model's embedding table (config `key`) must hold every id the tokenizer emits."""
    needed = tokenizer.vocab_size
    check_vocab_rows(key, vocab_size, needed, remedy=f"set {key} to at least {needed}")


class Task:
    """Base class: subclasses set `self.model` and implement the methods below."""

    model: nn.Module
    # Keys of `train_data`'s batches that stay on the host (the batch contract: see
    # vlm_jax.train.batch): each record's id, the data counters DataCounters totals and the
    # substitute flag. They may be absent; the trainer drops them before the step.
    host_keys: ClassVar[tuple[str, ...]] = ("id", *COUNTERS, SUBSTITUTE)
    # Config keys added after runs of the task existed: (section, key) -> the value the code
    # used for runs whose config.json lacks the key (they resume; other values are refused).
    added_keys: ClassVar[dict[tuple[str, str], Any]] = {("optim", "lora"): lora.OFF}
    # The evaluators it accepts (EVALUATORS names), the default eval.tasks in this order; its
    # SCHEMA's "eval" is `eval_section(evaluators)`. Plug-in evaluators may add themselves
    # (`Evaluator.tasks`).
    evaluators: ClassVar[tuple[str, ...]] = ()
    # Top-level param names of the model's ViTs: a checkpoint whose posemb was saved for another
    # image size loads with it resampled (init.posemb_resample; init, fine-tuning, evaluation).
    image_towers: ClassVar[tuple[str, ...]] = ()
    # The config sections the task reads, beside the trainer's (train, optim, mesh, ...).
    SCHEMA = Schema({"init": INIT, "eval": eval_section(evaluators)})

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
        self.config = config
        self.mesh = mesh

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch the train step takes, {name: [batch_size, ...]}: the model inputs
        init, the shardings and the compiled step are built from (nothing is allocated)."""
        raise NotImplementedError

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
        """Model variables (boxed with logical partitioning metadata), with the adapters that
        optim.lora adds (models/lora.py)."""
        with lora.adapted(lora.lora_section(self.config.optim)) as adapters:
            variables = self.model.init({"params": rng, "dropout": rng}, **self.model_inputs(batch))
        if adapters is not None:
            adapters.check(variables["params"])
        return variables

    def model_inputs(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        raise NotImplementedError

    def loss(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array, train: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar loss (mean over the global batch) and metrics to log as train/..."""
        raise NotImplementedError

    def value_and_grad(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array
    ) -> tuple[tuple[jax.Array, dict[str, jax.Array]], Any]:
        """((loss, metrics), grads); override for schemes such as gradient caching.

        Frozen params (optim.freeze) get zero gradients without a backward pass through
        them: see `stop_frozen`.
        """
        loss = lambda p: self.loss(self.stop_frozen(p), batch, rng, True)
        return jax.value_and_grad(loss, has_aux=True)(params)

    def stop_frozen(self, params: Any) -> Any:
        """`params` with `lax.stop_gradient` on the frozen leaves (optim.freeze; with LoRA every
        param but the adapters and optim.lora.train: `optim.frozen_mask`).

        Call it on the params inside the differentiated function. Their gradients are then
        symbolic zeros, so XLA never builds the backward pass of a frozen tower (a frozen
        vision tower costs its forward only) and the zero update of the optimizer's
        freeze is not paid for with a full gradient computation.
        """
        if not has_frozen(self.config.optim):
            return params
        frozen = frozen_mask(params, self.config.optim)
        return jax.tree.map(lambda p, f: lax.stop_gradient(p) if f else p, params, frozen)

    def train_data(
        self, batch_size: int, process_index: int, process_count: int, seed: int
    ) -> Iterable[dict[str, np.ndarray]]:
        """Per-process training batches; its iterator must support get_state/set_state."""
        raise NotImplementedError

    def evaluate(self, params: Any) -> dict[str, float]:
        """Held-out metrics of the evaluators config.eval.tasks names, run in that order and
        merged; keys without the "eval/" prefix. `params`: a train state's (LoRA adapters are
        merged into their kernels first, so the evaluators see a plain model)."""
        params = lora.merged(params, lora.lora_section(self.config.optim))
        results = {}
        for evaluator in self.built_evaluators.values():
            results |= evaluator(params)
        return results

    @functools.cached_property
    def built_evaluators(self) -> dict[str, Evaluator]:
        """{name: evaluator} of config.eval.tasks, built at the first evaluation (each loads
        its held-out data on its first call)."""
        names = self.SCHEMA.keys["eval"].names(self.config.get("eval"))
        return {name: EVALUATORS.get(name)(self) for name in names}

    def load_pretrained(self, params: Any) -> Any:
        """Params of a fresh run after init (not on resume): e.g. towers from other runs."""
        return params

    def train_flops_per_example(self) -> float | None:
        """Model FLOPs of one training example (forward + backward), for MFU; None if unknown."""
        return None
