"""The contrastive (CLIP / SigLIP) task: two-tower model, contrastive loss; its embedding
functions serve the zero-shot and retrieval evaluators (vlm_jax/evaluate/contrastive.py)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np

from vlm_jax import sharding
from vlm_jax.data import build_pipeline, build_tokenizer, worker_options
from vlm_jax.data.sources import DATA
from vlm_jax.data.tokenizers import TOKENIZER
from vlm_jax.evaluate import eval_section
from vlm_jax.losses import LOSS, batch_ids, build_loss, hard_negatives
from vlm_jax.models import MODEL, build_model, flops
from vlm_jax.schema import Schema, resolve
from vlm_jax.train.optim import frozen_mask, has_frozen
from vlm_jax.train.tasks import TASKS, Task, check_vocab_size


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
    evaluators = ("zeroshot", "retrieval")
    image_towers = ("img",)
    SCHEMA = Task.SCHEMA | Schema(
        {
            "model": MODEL,
            "loss": LOSS,
            "data": DATA,
            "tokenizer": TOKENIZER,
            "eval": eval_section(evaluators),
        }
    )

    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.tokenizer = build_tokenizer(config.tokenizer)
        check_vocab_size("model.text.vocab_size", config.model.text.vocab_size, self.tokenizer)
        check_text_conventions(config, self.tokenizer)
        self.model = build_model(config.model)
        self.loss_fn = build_loss(config.loss, mesh)
        loss_config = resolve("loss", config.loss, LOSS)
        self.positives, self.hard_negatives = loss_config.positives, hard_negatives(loss_config)
        # (variables, images float32[B, S, S, 3] | tokens int32[B, L]) -> float32[B, E],
        # replicated: what the evaluators embed held-out splits with
        replicated = sharding.replicated(mesh)
        self.embed_image = jax.jit(
            functools.partial(self.model.apply, method="embed_image"), out_shardings=replicated
        )
        self.embed_text = jax.jit(
            functools.partial(self.model.apply, method="embed_text"), out_shardings=replicated
        )

    # -- training -------------------------------------------------------------------------
    host_keys = (*Task.host_keys, "label")  # labelled sources' class index (zero-shot)

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        size = self.config.model.image.image_size
        spec = {
            "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), np.float32),
            "tokens": jax.ShapeDtypeStruct((batch_size, self.config.tokenizer.max_len), np.int32),
        }
        if self.positives == "same_label":  # the loss's positives: pairs sharing a label
            spec["label"] = jax.ShapeDtypeStruct((batch_size,), np.int32)
        return spec

    def model_inputs(self, batch):
        return {"images": batch["image"], "tokens": batch["tokens"]}

    def _apply(self, params, images, tokens, rng, train=True):
        return self.model.apply(
            {"params": params}, images, tokens, train=train, rngs={"dropout": rng}
        )

    def _loss_fn(self, batch):
        """The loss with the batch's pair ids (duplicate-aware targets, hard-negative guard)."""
        return functools.partial(
            self.loss_fn, **batch_ids(self.positives, self.hard_negatives, batch)
        )

    def loss(self, params, batch, rng, train):
        out = self._apply(params, batch["image"], batch["tokens"], rng, train)
        loss = self._loss_fn(batch)(
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
            apply_fn, self._loss_fn(batch), params, batch, num_chunks=chunks, rngs=rng
        )

    def train_data(self, batch_size, process_index, process_count, seed):
        batches = build_pipeline(
            self.config,
            self.tokenizer,
            "train",
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
            shuffle=True,
            seed=seed,
            **worker_options(self.config.train),
        )
        return batches.map(self._int32_labels) if self.positives == "same_label" else batches

    def _int32_labels(self, batch):
        """loss.positives="same_label" needs each train record's label, as the device's int32."""
        if "label" not in batch:
            raise ValueError(
                f"loss.positives='same_label' but data.source={self.config.data.source!r} gives "
                "its train records no 'label' (use 'same_caption' or 'diagonal', or a source "
                "with labels: a folder whose train.jsonl has a label column)"
            )
        return batch | {"label": np.asarray(batch["label"], np.int32)}

    def train_flops_per_example(self) -> float:
        return flops.train_flops_per_example(
            self.config.model, self.frozen_towers(), self.config.tokenizer.max_len
        )

    def frozen_towers(self) -> tuple[str, ...]:
        """Towers ("img", "txt") whose params are all frozen (`optim.frozen_mask`)."""
        if not has_frozen(self.config.optim):
            return ()
        variables = jax.eval_shape(self.init, jax.random.key(0), self.batch_spec(1))
        frozen = frozen_mask(nn.unbox(variables["params"]), self.config.optim)
        return tuple(
            tower for tower in ("img", "txt") if all(jax.tree.leaves(frozen.get(tower, [False])))
        )
