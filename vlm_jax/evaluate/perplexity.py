"""The "perplexity" evaluator: a decoder LM's token-weighted next-token loss and accuracy over
the whole val split (`loss`, `token_acc`; perplexity = exp(loss)).

It reads `task.model` (`apply(variables, tokens, deterministic=True) -> (logits, cache)`),
`task.tokenizer`, `task.mesh` and `task.config` (the data and tokenizer sections, eval).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from vlm_jax import sharding
from vlm_jax.data import load_split
from vlm_jax.evaluate import EVALUATORS, Evaluator
from vlm_jax.losses import next_token_sums


@EVALUATORS.register("perplexity")
class Perplexity(Evaluator):
    """Chunks of eval.batch_size rows (rounded to the data-parallel size); the last chunk is
    filled with all-pad rows, so every chunk has one shape (one compile) and every record counts
    exactly once."""

    def __init__(self, task: Any):
        super().__init__(task)
        self.pad_id = task.tokenizer.pad_id
        self.token_sums = jax.jit(self._token_sums)
        self._tokens: np.ndarray | None = None

    def _token_sums(self, params: Any, tokens: jax.Array) -> tuple[jax.Array, ...]:
        """`next_token_sums` of int32[B, L] tokens; all-pad rows add nothing."""
        logits, _ = self.task.model.apply({"params": params}, tokens, deterministic=True)
        return next_token_sums(logits, tokens, tokens != self.pad_id)

    def __call__(self, params: Any) -> dict[str, float]:
        tokens, mesh = self.val_tokens(), self.task.mesh
        chunk = sharding.eval_chunk_size(mesh, self.settings.batch_size)
        rows = sharding.process_batch_rows(mesh, chunk)
        totals = np.zeros(3)
        for start in range(0, len(tokens), chunk):
            part = _pad_rows(tokens[start : start + chunk], chunk, self.pad_id)
            batch = sharding.global_batch({"tokens": rows.take(part)}, mesh, chunk)
            totals += np.asarray(jax.device_get(self.token_sums(params, batch["tokens"])))
        nll, correct, count = totals
        count = max(count, 1.0)
        return {"loss": float(nll / count), "token_acc": float(correct / count)}

    def val_tokens(self) -> np.ndarray:
        """The val split's tokens int32[N, L], each good record once (loaded on first use)."""
        if self._tokens is None:
            task, batch_size = self.task, self.settings.batch_size
            self._tokens = load_split(task.config, task.tokenizer, "val", batch_size)["tokens"]
        return self._tokens


def _pad_rows(rows: np.ndarray, size: int, pad_id: int) -> np.ndarray:
    """`rows` [n, L] followed by size - n rows of `pad_id`: [size, L]."""
    filler = np.full((size - len(rows), *rows.shape[1:]), pad_id, rows.dtype)
    return np.concatenate([rows, filler])
