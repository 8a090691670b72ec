"""The "lm" task: text-only decoder pretraining on the shapes world's captions, evaluated by
"perplexity" (vlm_jax/evaluate/perplexity.py); its checkpoint can initialise the VLM's LM
(`init.lm_checkpoint` of the "vlm" task)."""

from __future__ import annotations

import jax
import numpy as np

from vlm_jax.data import build_pipeline, build_tokenizer, worker_options
from vlm_jax.data.sources import DATA
from vlm_jax.data.tokenizers import TOKENIZER
from vlm_jax.evaluate import eval_section
from vlm_jax.losses import next_token_loss
from vlm_jax.models import MODEL
from vlm_jax.models.vlm import build_decoder_lm
from vlm_jax.schema import Schema
from vlm_jax.train.tasks import TASKS, Task, check_vocab_size


@TASKS.register("lm")
class LMTask(Task):
    """Next-token prediction on the shapes world's captions (all non-pad tokens)."""

    evaluators = ("perplexity",)
    SCHEMA = Task.SCHEMA | Schema(
        {"model": MODEL, "data": DATA, "tokenizer": TOKENIZER, "eval": eval_section(evaluators)}
    )

    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.tokenizer = build_tokenizer(config.tokenizer)
        check_vocab_size("model.lm.vocab_size", config.model.lm.vocab_size, self.tokenizer)
        self.model = build_decoder_lm(config.model)

    # build_pipeline's batches are the contrastive task's: their images stay on the host
    host_keys = (*Task.host_keys, "image", "label")

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        length = self.config.tokenizer.max_len
        return {"tokens": jax.ShapeDtypeStruct((batch_size, length), np.int32)}

    def model_inputs(self, batch):
        return {"tokens": batch["tokens"]}

    def loss(self, params, batch, rng, train):
        logits, _ = self.model.apply(
            {"params": params}, batch["tokens"], deterministic=not train, rngs={"dropout": rng}
        )
        weights = batch["tokens"] != self.tokenizer.pad_id
        return next_token_loss(logits, batch["tokens"], weights)

    def train_data(self, batch_size, process_index, process_count, seed):
        return build_pipeline(
            self.config,
            self.tokenizer,
            "train",
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
            seed=seed,
            **worker_options(self.config.train),
        )
