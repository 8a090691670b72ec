"""The contrastive (CLIP / SigLIP) task: two-tower model, contrastive loss, zero-shot and
retrieval evaluation on held-out splits."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from vlm_jax import sharding
from vlm_jax.config import check_choice
from vlm_jax.data import build_pipeline, build_source, build_tokenizer, load_split
from vlm_jax.data.sources import DATA
from vlm_jax.data.tokenizers import TOKENIZER
from vlm_jax.evaluate import class_embeddings, recall_at_k, unique_texts, zeroshot_accuracy
from vlm_jax.losses import LOSS, build_loss
from vlm_jax.models import MODEL, build_model, flops
from vlm_jax.schema import Schema
from vlm_jax.train.optim import regex_mask
from vlm_jax.train.tasks import TASKS, Task, check_vocab_size

EVAL_TASKS = ("zeroshot", "retrieval")


def check_text_conventions(config, tokenizer) -> None:
    """The text tower must pad, stop and size its inputs as the tokenizer does."""
    text = config.model.text
    if config.tokenizer.max_len > text.max_len:
        raise ValueError(
            f"tokenizer.max_len={config.tokenizer.max_len} exceeds "
            f"model.text.max_len={text.max_len}"
        )
    if tokenizer.pad_id != text.pad_id:
        raise ValueError(
            f"model.text.pad_id={text.pad_id} but the {config.tokenizer.name!r} tokenizer pads "
            f"with {tokenizer.pad_id}"
        )
    if text.pool == "eos" and tokenizer.eos_id != text.eos_id:
        raise ValueError(
            f"model.text.eos_id={text.eos_id} but the {config.tokenizer.name!r} tokenizer's EOS "
            f"is {tokenizer.eos_id} (text pool 'eos' pools at that token)"
        )


@TASKS.register("contrastive")
class ContrastiveTask(Task):
    SCHEMA = Task.SCHEMA | Schema(
        {"model": MODEL, "loss": LOSS, "data": DATA, "tokenizer": TOKENIZER}
    )

    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.tokenizer = build_tokenizer(config.tokenizer)
        check_vocab_size("model.text.vocab_size", config.model.text.vocab_size, self.tokenizer)
        check_text_conventions(config, self.tokenizer)
        for name in config.eval.tasks:  # before any compute, not at the first evaluation
            check_choice("eval.tasks", name, EVAL_TASKS)
        self.model = build_model(config.model)
        self.loss_fn = build_loss(config.loss, mesh)
        replicated = sharding.replicated(mesh)
        self._embed_image = jax.jit(
            functools.partial(self.model.apply, method="embed_image"), out_shardings=replicated
        )
        self._embed_text = jax.jit(
            functools.partial(self.model.apply, method="embed_text"), out_shardings=replicated
        )

    # -- training -------------------------------------------------------------------------
    host_keys = (*Task.host_keys, "label")  # labelled sources' class index (zero-shot)

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        size = self.config.model.image.image_size
        return {
            "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), np.float32),
            "tokens": jax.ShapeDtypeStruct((batch_size, self.config.tokenizer.max_len), np.int32),
        }

    def model_inputs(self, batch):
        return {"images": batch["image"], "tokens": batch["tokens"]}

    def _apply(self, params, images, tokens, rng, train=True):
        return self.model.apply(
            {"params": params}, images, tokens, train=train, rngs={"dropout": rng}
        )

    def loss(self, params, batch, rng, train):
        out = self._apply(params, batch["image"], batch["tokens"], rng, train)
        loss = self.loss_fn(
            out["image_emb"], out["text_emb"], out["logit_scale"], out["logit_bias"]
        )
        return loss, {"logit_scale": out["logit_scale"], "logit_bias": out["logit_bias"]}

    def value_and_grad(self, params, batch, rng):
        chunks = self.config.train.grad_cache_chunks
        if chunks <= 1:
            return super().value_and_grad(params, batch, rng)
        from vlm_jax.train.gradcache import gradcache_value_and_grad

        def apply_fn(p, images, tokens, rngs):
            return self._apply(self.stop_frozen(p), images, tokens, rngs, True)

        return gradcache_value_and_grad(
            apply_fn, self.loss_fn, params, batch, num_chunks=chunks, rngs=rng
        )

    def train_data(self, batch_size, process_index, process_count, seed):
        return build_pipeline(
            self.config,
            self.tokenizer,
            "train",
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
            shuffle=True,
            seed=seed,
            worker_count=self.config.train.worker_count,
        )

    def train_flops_per_example(self) -> float:
        return flops.train_flops_per_example(
            self.config.model, self.frozen_towers(), self.config.tokenizer.max_len
        )

    def frozen_towers(self) -> tuple[str, ...]:
        """Towers ("img", "txt") whose params optim.freeze matches entirely."""
        if not self.config.optim.freeze:
            return ()
        variables = jax.eval_shape(self.init, jax.random.key(0), self.batch_spec(1))
        frozen = regex_mask(nn.unbox(variables["params"]), self.config.optim.freeze)
        return tuple(
            tower for tower in ("img", "txt") if all(jax.tree.leaves(frozen.get(tower, [False])))
        )

    # -- evaluation -----------------------------------------------------------------------
    def _embed_all(self, fn, params, inputs: np.ndarray) -> np.ndarray:
        """Embed `inputs` [N, ...] in fixed-size, batch-sharded chunks: float32[N, E]."""
        chunk = sharding.eval_chunk_size(self.mesh, self.config.eval.batch_size)
        outputs = []
        for start in range(0, len(inputs), chunk):
            part = inputs[start : start + chunk]
            padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), 0)])
            global_part = jax.make_array_from_callback(
                padded.shape,
                sharding.batch_sharding(self.mesh, padded.ndim),
                lambda i, a=padded: a[i],
            )
            outputs.append(np.asarray(fn({"params": params}, global_part))[: len(part)])
        return np.concatenate(outputs)

    @functools.cache  # noqa: B019  (one task per run; the eval sets are small and fixed)
    def _load_split(self, split: str) -> dict[str, np.ndarray]:
        """A whole held-out split as arrays, every good record once."""
        return load_split(
            self.split_config(split), self.tokenizer, split, self.config.eval.batch_size
        )

    def _embed_texts(self, params, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer.batch_encode(texts, self.config.tokenizer.max_len)
        return self._embed_all(self._embed_text, params, tokens)

    def split_config(self, split: str):
        """The config with `eval.data_overrides[split]` applied to its data section (e.g. a
        zero-shot split read from another dataset than the training pairs)."""
        overrides = self.config.eval.data_overrides.get(split)
        if not overrides:
            return self.config
        config = self.config.copy_and_resolve_references()
        with config.unlocked():
            config.data.update(overrides.to_dict())
        return config

    def evaluate(self, params: Any) -> dict[str, float]:
        results = {}
        for name in self.config.eval.tasks:
            results |= getattr(self, f"_eval_{name}")(params)
        return results

    def _eval_zeroshot(self, params) -> dict[str, float]:
        source = build_source(self.split_config("zeroshot").data, "zeroshot")
        data = self._load_split("zeroshot")
        image_emb = self._embed_all(self._embed_image, params, data["image"])
        class_emb = class_embeddings(
            lambda texts: self._embed_texts(params, texts), source.classnames, source.templates
        )
        accuracy = zeroshot_accuracy(image_emb, class_emb, data["label"], ks=(1, 5))
        return {f"zeroshot_{k}": v for k, v in accuracy.items()}

    def _eval_retrieval(self, params) -> dict[str, float]:
        data = self._load_split("val")
        image_emb = self._embed_all(self._embed_image, params, data["image"])
        image_captions = [str(caption) for caption in data["caption"]]
        gallery = unique_texts(image_captions)
        text_emb = self._embed_texts(params, gallery)
        results = {
            f"retrieval_{k}": v
            for k, v in recall_at_k(image_emb, text_emb, image_captions, gallery).items()
        }
        results["retrieval_num_images"] = float(len(image_captions))
        results["retrieval_num_texts"] = float(len(gallery))
        return results
