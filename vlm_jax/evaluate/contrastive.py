"""The contrastive task's evaluators: zero-shot classification and image <-> text retrieval on
held-out splits, from the task's embedding functions.

They read `task.embed_image` / `task.embed_text` (jitted `(variables, inputs) -> float32[B, E]`,
replicated), `task.tokenizer`, `task.mesh` and `task.config` (data, tokenizer.max_len, eval).
`eval.data_overrides[split]` changes the data section for one split (e.g. a zero-shot split read
from another dataset than the training pairs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from vlm_jax import sharding
from vlm_jax.data import build_source, load_split
from vlm_jax.evaluate import EVALUATORS, Evaluator
from vlm_jax.evaluate.retrieval import recall_at_k, unique_texts
from vlm_jax.evaluate.zeroshot import class_embeddings, zeroshot_accuracy


def split_config(
    config: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict | None
) -> ml_collections.ConfigDict:
    """The config with a split's `eval.data_overrides` applied to its data section."""
    if not overrides:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.update(overrides.to_dict())
    return config


class EmbeddingEvaluator(Evaluator):
    """Embeds a held-out split (loaded once) in fixed-size, batch-sharded chunks."""

    split: str  # the held-out split it reads

    def __init__(self, task: Any):
        super().__init__(task)
        self.config = split_config(task.config, self.settings.data_overrides.get(self.split))
        self._data: dict[str, np.ndarray] | None = None

    def data(self) -> dict[str, np.ndarray]:
        """The whole split as arrays, every good record once (loaded on first use)."""
        if self._data is None:
            batch_size = self.settings.batch_size
            self._data = load_split(self.config, self.task.tokenizer, self.split, batch_size)
        return self._data

    def embed(self, fn: Callable, params: Any, inputs: np.ndarray) -> np.ndarray:
        """`fn` over `inputs` [N, ...], chunk by chunk (the last padded by repetition, so one
        compilation): float32[N, E]."""
        mesh = self.task.mesh
        chunk = sharding.eval_chunk_size(mesh, self.settings.batch_size)
        outputs = []
        for start in range(0, len(inputs), chunk):
            part = inputs[start : start + chunk]
            padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), 0)])
            global_part = jax.make_array_from_callback(
                padded.shape, sharding.batch_sharding(mesh, padded.ndim), lambda i, a=padded: a[i]
            )
            outputs.append(np.asarray(fn({"params": params}, global_part))[: len(part)])
        return np.concatenate(outputs)

    def embed_texts(self, params: Any, texts: list[str]) -> np.ndarray:
        tokens = self.task.tokenizer.batch_encode(texts, self.task.config.tokenizer.max_len)
        return self.embed(self.task.embed_text, params, tokens)


@EVALUATORS.register("zeroshot")
class ZeroShot(EmbeddingEvaluator):
    """zeroshot_top1, zeroshot_top5 on the "zeroshot" split: each image's nearest class, a
    class embedded as its prompts (the source's templates over its classnames) averaged."""

    split = "zeroshot"

    def __call__(self, params: Any) -> dict[str, float]:
        source = build_source(self.config.data, self.split)
        data = self.data()
        image_emb = self.embed(self.task.embed_image, params, data["image"])
        class_emb = class_embeddings(
            lambda texts: self.embed_texts(params, texts), source.classnames, source.templates
        )
        accuracy = zeroshot_accuracy(image_emb, class_emb, data["label"], ks=(1, 5))
        return {f"zeroshot_{k}": v for k, v in accuracy.items()}


@EVALUATORS.register("retrieval")
class Retrieval(EmbeddingEvaluator):
    """retrieval_{i2t,t2i}_r{1,5,10} on the "val" split (evaluate/retrieval.py: identical
    captions are one text), and the gallery's sizes retrieval_num_images, retrieval_num_texts."""

    split = "val"

    def __call__(self, params: Any) -> dict[str, float]:
        data = self.data()
        image_emb = self.embed(self.task.embed_image, params, data["image"])
        image_captions = [str(caption) for caption in data["caption"]]
        gallery = unique_texts(image_captions)
        text_emb = self.embed_texts(params, gallery)
        results = {
            f"retrieval_{k}": v
            for k, v in recall_at_k(image_emb, text_emb, image_captions, gallery).items()
        }
        results["retrieval_num_images"] = float(len(image_captions))
        results["retrieval_num_texts"] = float(len(gallery))
        return results
