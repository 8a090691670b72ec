"""VQA / captioning evaluation with grounding probes: the "vqa" and "caption" evaluators.

For the first `eval.num_examples` good held-out records of `eval.split` from the configured
VQA source (the record contract of data/vqa.py; the shapes world's balance the question
types), "vqa" reports

* `acc`, `acc_<type>`: exact match of the greedy answer (KV-cached generation), per question
  type the records name;
* grounding probes: the same questions asked with each example's image swapped for the
  next example's (`swapped_acc...`) and with a blank canvas of the source's `blank_colour`
  (`blank_acc...`). A model that reads the image loses accuracy on both; one that answers from
  the text prior does not;
* `absent_false_yes`: the rate of "yes" to questions of type "absent" (about absent objects:
  hallucination);
* `visual_tokens`: visual tokens per example; `prefill_gflops`: XLA's FLOP count of the
  prefill (vision tower + connector + LM over image and prompt) per example;

and "caption" reports `caption_token_acc`: teacher-forced next-token accuracy on the caption
answers among them. Both read `task.model`, `task.tokenizer` and `task.config`.

The text-only baseline is a model trained with `model.fusion="none"` and evaluated here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax.data import preprocess
from vlm_jax.data.tokenizers import Tokenizer
from vlm_jax.data.vqa import (
    VQAInputs,
    blank_colour,
    encode_example,
    held_out_records,
    question_type_name,
)
from vlm_jax.evaluate import EVAL, EVALUATORS, Evaluator
from vlm_jax.generate import generate
from vlm_jax.schema import Key, Schema, positive, resolve_keys

# eval.* keys of the examples both evaluators read (load_examples).
EXAMPLES = Schema(
    {
        "num_examples": Key(int, 140, "held-out questions evaluated", valid=positive, expect="> 0"),
        "split": Key(str, "val", "the held-out split they come from"),
    }
)
# ... and those the "vqa" evaluator reads beside.
ANSWERS = EXAMPLES | Schema({"max_new_tokens": Key(int, 12, "answer tokens generated")})


def load_examples(config: ml_collections.ConfigDict, tokenizer: Tokenizer, num_examples: int):
    """The first `num_examples` good held-out records as model inputs (numpy), answers (str),
    question type names (str, "" for none) and the source's blank canvas colour."""
    split = resolve_keys("eval", config.eval, EXAMPLES).split
    source, records = held_out_records(config, split, num_examples)
    max_len = config.tokenizer.max_len
    full = [VQAInputs(tokenizer, max_len, config.data.image_size).map(r) for r in records]
    prompts = [encode_example(tokenizer, r["prompt"], None, max_len) for r in records]
    return {
        "image": np.stack([e["image"] for e in full]),  # float32[n, K, S, S, 3]
        "tokens": np.stack([e["tokens"] for e in full]),
        "loss_mask": np.stack([e["loss_mask"] for e in full]),
        "prompt": np.stack([p["tokens"] for p in prompts]),
        "prefix_len": np.stack([p["prefix_len"] for p in prompts]),
        "question_type": np.asarray([question_type_name(source, r) for r in records]),  # str[n]
        "answer": [tokenizer.detokenize(tokenizer.encode(r["answer"])) for r in records],
        "blank_colour": np.asarray(blank_colour(source), np.uint8),  # uint8[3], not per example
    }


def blank_images(like: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """An empty canvas of `colour` (uint8 RGB) shaped `like`, in the model's [-1, 1] range."""
    background = np.broadcast_to(np.asarray(colour, np.uint8), like.shape[-3:])
    return np.broadcast_to(preprocess.to_float(background), like.shape).copy()


def _batched(fn: Callable, arrays: list[np.ndarray], batch_size: int) -> np.ndarray:
    """fn over fixed-size batches (the last one padded by repetition): one compilation."""
    n = len(arrays[0])
    outs = []
    for start in range(0, n, batch_size):
        part = [a[start : start + batch_size] for a in arrays]
        pad = batch_size - len(part[0])
        part = [np.concatenate([p, np.repeat(p[-1:], pad, 0)]) for p in part]
        outs.append(np.asarray(fn(*part))[: batch_size - pad])
    return np.concatenate(outs)


def _exact_match(predictions, answers, types, prefix: str) -> dict[str, float]:
    correct = np.asarray([p == a for p, a in zip(predictions, answers)])
    results = {f"{prefix}acc": float(correct.mean())}
    for name in filter(None, dict.fromkeys(types.tolist())):  # the types present, in order
        results[f"{prefix}acc_{name}"] = float(correct[types == name].mean())
    absent = types == "absent"
    if absent.any():
        results[f"{prefix}absent_false_yes"] = float(
            np.mean([predictions[i] == "yes" for i in np.flatnonzero(absent)])
        )
    return results


def generated_answers(
    model: nn.Module,
    params: Any,
    tokenizer: Tokenizer,
    examples: dict,
    images: np.ndarray,
    max_new_tokens: int,
    batch: int,
) -> list[str]:
    """The greedy answers (KV-cached generation, decoded) to the examples' prompts asked of
    `images` float32[n, K, S, S, 3]."""

    def run(i, t, n):
        return generate(
            model,
            {"params": params},
            jnp.asarray(i),
            jnp.asarray(t),
            jnp.asarray(n),
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            vocab_size=tokenizer.vocab_size,
        )

    outputs = _batched(run, [images, examples["prompt"], examples["prefix_len"]], batch)
    return [tokenizer.decode(row) for row in outputs]


def grounding_probes(model: nn.Module, images: np.ndarray, colour: np.ndarray) -> dict:
    """{metric prefix: images}: the examples' own ("") and, for a model that reads images,
    each one's swapped for the next example's ("swapped_") and a blank canvas ("blank_")."""
    probes = {"": images}
    if model.fusion != "none":
        probes["swapped_"] = np.roll(images, 1, axis=0)
        probes["blank_"] = blank_images(images, colour)
    return probes


def prefill_flops_per_example(model: nn.Module, params: Any, examples: dict, batch: int) -> float:
    """XLA's FLOP count for encoding image + prompt into the KV cache, per example."""
    args = (examples["image"][:batch], examples["prompt"][:batch], examples["prefix_len"][:batch])
    compiled = (
        jax.jit(lambda p, i, t, n: model.apply({"params": p}, i, t, n, 1, method="prefill"))
        .lower(params, *args)
        .compile()
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0)) / batch


def visual_tokens_per_example(model: nn.Module, params: Any, examples: dict) -> int:
    if model.fusion == "none":
        return 0
    shape = jax.eval_shape(
        lambda p: model.apply(
            {"params": p},
            examples["image"][:1],
            examples["tokens"][:1],
            examples["prefix_len"][:1],
            method="encode_images",
        ),
        params,
    ).shape  # [1, K, M, D]
    return int(shape[1] * shape[2])


def evaluate_vqa(
    model: nn.Module,
    params: Any,
    config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    examples: dict | None = None,
) -> dict[str, float]:
    """The "vqa" metrics above. Keys: config.eval's EVAL and ANSWERS."""
    settings = resolve_keys("eval", config.eval, EVAL | ANSWERS)
    if examples is None:
        examples = load_examples(config, tokenizer, settings.num_examples)
    batch = min(settings.batch_size, len(examples["answer"]))
    types, results = examples["question_type"], {}
    for prefix, images in grounding_probes(
        model, examples["image"], examples["blank_colour"]
    ).items():
        predictions = generated_answers(
            model, params, tokenizer, examples, images, settings.max_new_tokens, batch
        )
        results |= _exact_match(predictions, examples["answer"], types, prefix)
    results["visual_tokens"] = float(visual_tokens_per_example(model, params, examples))
    results["prefill_gflops"] = prefill_flops_per_example(model, params, examples, batch) / 1e9
    return results


def caption_token_accuracy(
    model: nn.Module, params: Any, examples: dict, batch: int
) -> dict[str, float]:
    """caption_token_acc: teacher-forced next-token accuracy on the caption answers ({} with
    no caption among the examples)."""
    captions = examples["question_type"] == "caption"
    if not captions.any():
        return {}
    fn = jax.jit(
        lambda i, t, n: jnp.argmax(model.apply({"params": params}, i, t, n)[:, :-1], axis=-1)
    )
    chosen = [examples[k][captions] for k in ("image", "tokens", "prefix_len")]
    predicted = _batched(fn, chosen, batch)  # int[n, L-1] predictions of tokens[:, 1:]
    targets = examples["tokens"][captions][:, 1:]
    weights = examples["loss_mask"][captions][:, 1:]
    return {"caption_token_acc": float(((predicted == targets) * weights).sum() / weights.sum())}


class ExamplesEvaluator(Evaluator):
    """Evaluates on the first eval.num_examples held-out records (loaded on first use)."""

    SCHEMA = EXAMPLES

    def __init__(self, task: Any):
        super().__init__(task)
        self._examples: dict | None = None

    def examples(self) -> dict:
        if self._examples is None:
            task = self.task
            self._examples = load_examples(task.config, task.tokenizer, self.settings.num_examples)
        return self._examples


@EVALUATORS.register("vqa")
class VQA(ExamplesEvaluator):
    SCHEMA = ANSWERS

    def __call__(self, params: Any) -> dict[str, float]:
        task = self.task
        return evaluate_vqa(task.model, params, task.config, task.tokenizer, self.examples())


@EVALUATORS.register("caption")
class Caption(ExamplesEvaluator):
    def __call__(self, params: Any) -> dict[str, float]:
        examples = self.examples()
        batch = min(self.settings.batch_size, len(examples["answer"]))
        return caption_token_accuracy(self.task.model, params, examples, batch)
