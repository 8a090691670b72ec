"""The "lm" task: text-only decoder pretraining on the shapes world's captions; its checkpoint
can initialise the VLM's LM (`init.lm_checkpoint` of the "vlm" task)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from vlm_jax import sharding
from vlm_jax.data import build_pipeline, build_tokenizer, load_split
from vlm_jax.data.sources import DATA
from vlm_jax.data.tokenizers import TOKENIZER
from vlm_jax.losses import next_token_loss, next_token_sums
from vlm_jax.models import MODEL
from vlm_jax.models.vlm import build_decoder_lm
from vlm_jax.schema import Schema
from vlm_jax.train.tasks import TASKS, Task, check_vocab_size


@TASKS.register("lm")
class LMTask(Task):
    """Next-token prediction on the shapes world's captions (all non-pad tokens)."""

    SCHEMA = Task.SCHEMA | Schema({"model": MODEL, "data": DATA, "tokenizer": TOKENIZER})

    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.tokenizer = build_tokenizer(config.tokenizer)
        check_vocab_size("model.lm.vocab_size", config.model.lm.vocab_size, self.tokenizer)
        self.model = build_decoder_lm(config.model)
        self._val_tokens: np.ndarray | None = None
        self._eval_sums = jax.jit(self._token_sums)  # one compile: every eval chunk is padded

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
            worker_count=self.config.train.worker_count,
        )

    def _token_sums(self, params, tokens: jax.Array) -> tuple[jax.Array, ...]:
        """`next_token_sums` of int32[B, L] tokens; all-pad rows add nothing."""
        logits, _ = self.model.apply({"params": params}, tokens, deterministic=True)
        return next_token_sums(logits, tokens, tokens != self.tokenizer.pad_id)

    def evaluate(self, params: Any) -> dict[str, float]:
        """Token-weighted loss and accuracy over the whole val split, in chunks of
        eval.batch_size rows (rounded to the data-parallel size); the last chunk is filled with
        all-pad rows, so every chunk has one shape and every record counts exactly once."""
        tokens = self._val_split()
        chunk = sharding.eval_chunk_size(self.mesh, self.config.eval.batch_size)
        rows = sharding.process_batch_rows(self.mesh, chunk)
        totals = np.zeros(3)
        for start in range(0, len(tokens), chunk):
            part = _pad_rows(tokens[start : start + chunk], chunk, self.tokenizer.pad_id)
            batch = sharding.global_batch({"tokens": part[rows]}, self.mesh, chunk)
            totals += np.asarray(jax.device_get(self._eval_sums(params, batch["tokens"])))
        nll, correct, count = totals
        count = max(count, 1.0)
        return {"loss": float(nll / count), "token_acc": float(correct / count)}

    def _val_split(self) -> np.ndarray:
        """The val split's tokens int32[N, L], each good record once (loaded on first use)."""
        if self._val_tokens is None:
            split = load_split(self.config, self.tokenizer, "val", self.config.eval.batch_size)
            self._val_tokens = split["tokens"]
        return self._val_tokens


def _pad_rows(rows: np.ndarray, size: int, pad_id: int) -> np.ndarray:
    """`rows` [n, L] followed by size - n rows of `pad_id`: [size, L]."""
    filler = np.full((size - len(rows), *rows.shape[1:]), pad_id, rows.dtype)
    return np.concatenate([rows, filler])
