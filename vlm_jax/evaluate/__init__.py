"""Evaluators by name: `config.eval.tasks` lists the ones a run evaluates with, in order.

EVALUATORS holds "zeroshot" and "retrieval" (contrastive.py: the contrastive task's
embeddings), "vqa" and "caption" (vqa.py: generated answers with grounding probes, caption
token accuracy), "perplexity" (perplexity.py: the LM's token-weighted loss, on the val split or
a text file) and three plug-ins of the "vlm" task: "text_perplexity" (perplexity.py: the
text-only guardrail, the VLM's LM alone on a text file), "vqa_file" and "pope" (vqa_file.py:
VQA soft accuracy and POPE yes/no probing from question files, scored by answers.py). An
evaluator is an `Evaluator` subclass: built once per run with its task (the model, tokenizer,
mesh and config it reads), called with the params at each evaluation, returning metrics named
without the "eval/" prefix. It declares the `eval.*` keys it reads beside EVAL's shared ones
as its `SCHEMA`.

A task accepts the evaluators its `evaluators` class attribute names (in default order) and any
registered evaluator whose `tasks` names the task (a plug-in for an existing task):

    @EVALUATORS.register("mean_norm")
    class MeanNorm(Evaluator):
        tasks = ("contrastive",)
        def __call__(self, params):
            return {"mean_norm": ...}

`vlm_jax.train.validate` fails on a name the task does not accept before anything compiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from vlm_jax.evaluate.retrieval import recall_at_k, unique_texts
from vlm_jax.evaluate.zeroshot import class_embeddings, class_prompts, zeroshot_accuracy
from vlm_jax.registry import Registry
from vlm_jax.schema import EMPTY, Key, Schema, Select, positive, resolve_keys

EVALUATORS = Registry(
    "evaluator",
    modules=(
        "vlm_jax.evaluate.contrastive",
        "vlm_jax.evaluate.perplexity",
        "vlm_jax.evaluate.vqa",
        "vlm_jax.evaluate.vqa_file",
    ),
)
# config.eval keys of every task, whichever evaluators run.
EVAL = Schema(
    {
        "batch_size": Key(int, 256, "rows per evaluation chunk", valid=positive, expect="> 0"),
        "data_overrides": Key(
            dict, {}, 'per-split changes to the data section, {"zeroshot": {"source": ...}}'
        ),
    }
)


class Evaluator:
    """Held-out metrics of one kind for `task`'s model (see the module docstring)."""

    SCHEMA: ClassVar[Schema] = EMPTY  # the eval.* keys it reads beside EVAL's
    tasks: ClassVar[tuple[str, ...]] = ()  # tasks that accept it beyond those that name it

    def __init__(self, task: Any):
        self.task = task
        self.settings = resolve_keys("eval", task.config.eval, EVAL | self.SCHEMA)

    def __call__(self, params: Any) -> dict[str, float]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class EvalSection(Select):
    """config.eval: EVAL's keys, `tasks` (the evaluators to run, in order; `default`: the
    task's) and the keys of every evaluator `tasks` names."""

    def selector(self) -> Key:
        return Key(tuple, self.default, f"{self.registry.kind}s to run, in order")

    def schema_for(self, section: Mapping | None) -> Schema:
        names = (section or {}).get(self.by, self.default)
        names = (names,) if isinstance(names, str) else names  # a str fails as a type error
        schema = self.base | Schema({self.by: self.selector()})
        for name in names if isinstance(names, tuple | list) else ():
            if isinstance(name, str) and name in self.registry:
                schema = schema | self.registry.schema(name)
        return schema

    def names(self, section: Mapping | None) -> tuple[str, ...]:
        """The evaluator names `section` lists (the default where it lists none)."""
        given = {self.by: section[self.by]} if section and self.by in section else {}
        return tuple(resolve_keys("eval", given, Schema({self.by: self.selector()}))[self.by])


def eval_section(default: Sequence[str]) -> EvalSection:
    """The eval section of a task whose default evaluators are `default`."""
    return EvalSection(EVALUATORS, by="tasks", base=EVAL, default=tuple(default))


def accepted(task: str, declared: Sequence[str]) -> list[str]:
    """The evaluators task `task` accepts: `declared` (its `evaluators`), then the registered
    ones whose `tasks` name it."""
    plugins = [n for n in EVALUATORS.names() if task in EVALUATORS.get(n).tasks]
    return [*declared, *(n for n in plugins if n not in declared)]


__all__ = [
    "EVAL",
    "EVALUATORS",
    "EvalSection",
    "Evaluator",
    "accepted",
    "class_embeddings",
    "class_prompts",
    "eval_section",
    "recall_at_k",
    "unique_texts",
    "zeroshot_accuracy",
]
