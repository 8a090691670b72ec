"""Perplexity evaluators: a decoder LM's token-weighted next-token loss and accuracy over
held-out text (perplexity = exp(loss)).

* "perplexity" (the "lm" task): `loss`, `token_acc` over the whole val split of the run's data,
  or over the texts of `eval.text_path` where it is set;
* "text_perplexity" (a plug-in of the "vlm" task): the text-only guardrail. The VLM's LM alone
  (`params["lm"]` run as the plain decoder: no image, no visual tokens, no cross-attention
  blocks) on the texts of `eval.text_path`: `text_loss`, `text_token_acc`, `text_perplexity`.
  Its text is tokenized exactly as "perplexity" tokenizes the same file, so a VLM run's
  `text_loss` compares with the `loss` of the LM run it started from (the text ability the
  VLM training cost).

A text file is `.jsonl` (one object a line with a "text" str) or plain text (one text a line,
blank lines skipped); each text is one row of tokenizer.max_len tokens ([bos] text eos, pad),
cut to fit as the caption pipeline cuts them.

Both read `task.model` (or the decoder of `task.config.model`), `task.tokenizer`, `task.mesh`
and `task.config` (the data and tokenizer sections, eval).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from vlm_jax import sharding
from vlm_jax.config import MissingInput
from vlm_jax.data import load_split
from vlm_jax.data.tokenizers import Tokenizer
from vlm_jax.evaluate import EVALUATORS, Evaluator
from vlm_jax.losses import next_token_sums
from vlm_jax.models.vlm import build_decoder_lm
from vlm_jax.schema import REQUIRED, Key, Schema

TEXT_DOC = "held-out text: a .jsonl of {'text': ...} or a text file, one text a line"
CROSS_ATTENTION_PREFIX = "xattn_"  # the VLM LM's gated blocks (models/decoder.py)


def read_texts(path: str) -> list[str]:
    """The texts of a .jsonl ({"text": str} a line) or plain text file (one a line)."""
    file = Path(path)
    if not file.is_file():
        raise MissingInput(f"eval.text_path={path!r}: no such file")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if file.suffix != ".jsonl":
        return lines
    texts = []
    for number, line in enumerate(lines, 1):
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(
                f"eval.text_path={path!r} line {number}: not an object with a 'text' str"
            )
        texts.append(row["text"])
    return texts


def text_tokens(path: str, tokenizer: Tokenizer, max_len: int) -> np.ndarray:
    """int32[N, max_len]: the file's texts, one row each."""
    texts = read_texts(path)
    if not texts:
        raise ValueError(f"eval.text_path={path!r} holds no text")
    return tokenizer.batch_encode(texts, max_len)


@EVALUATORS.register("perplexity")
class Perplexity(Evaluator):
    """Chunks of eval.batch_size rows (rounded to the data-parallel size); the last chunk is
    filled with all-pad rows, so every chunk has one shape (one compile) and every record counts
    exactly once."""

    SCHEMA = Schema({"text_path": Key(str, "", f"{TEXT_DOC} ('': the val split)")})
    prefix = ""  # of the metric names

    def __init__(self, task: Any):
        super().__init__(task)
        self.pad_id = task.tokenizer.pad_id
        self.token_sums = jax.jit(self._token_sums)
        self._tokens: np.ndarray | None = None

    @property
    def model(self) -> nn.Module:
        """The decoder: `apply(variables, tokens, deterministic=True) -> (logits, cache)`."""
        return self.task.model

    def lm_params(self, params: Any) -> Any:
        """The decoder's params within the task's."""
        return params

    def _token_sums(self, params: Any, tokens: jax.Array) -> tuple[jax.Array, ...]:
        """`next_token_sums` of int32[B, L] tokens; all-pad rows add nothing."""
        logits, _ = self.model.apply({"params": params}, tokens, deterministic=True)
        return next_token_sums(logits, tokens, tokens != self.pad_id)

    def __call__(self, params: Any) -> dict[str, float]:
        tokens, mesh, params = self.held_out_tokens(), self.task.mesh, self.lm_params(params)
        chunk = sharding.eval_chunk_size(mesh, self.settings.batch_size)
        rows = sharding.process_batch_rows(mesh, chunk)
        totals = np.zeros(3)
        for start in range(0, len(tokens), chunk):
            part = _pad_rows(tokens[start : start + chunk], chunk, self.pad_id)
            batch = sharding.global_batch({"tokens": rows.take(part)}, mesh, chunk)
            totals += np.asarray(jax.device_get(self.token_sums(params, batch["tokens"])))
        nll, correct, count = totals
        count = max(count, 1.0)
        return self.named(nll / count, correct / count)

    def named(self, loss: float, token_acc: float) -> dict[str, float]:
        return {f"{self.prefix}loss": float(loss), f"{self.prefix}token_acc": float(token_acc)}

    def held_out_tokens(self) -> np.ndarray:
        """int32[N, L]: eval.text_path's texts, else the val split's, each good record once
        (loaded on first use)."""
        if self._tokens is None:
            task, path = self.task, self.settings.text_path
            if path:
                self._tokens = text_tokens(path, task.tokenizer, task.config.tokenizer.max_len)
            else:
                split = load_split(task.config, task.tokenizer, "val", self.settings.batch_size)
                self._tokens = split["tokens"]
        return self._tokens


@EVALUATORS.register("text_perplexity")
class TextPerplexity(Perplexity):
    """The "vlm" task's text-only guardrail (module docstring)."""

    SCHEMA = Schema({"text_path": Key(str, REQUIRED, TEXT_DOC)})
    tasks = ("vlm",)
    prefix = "text_"

    def __init__(self, task: Any):
        super().__init__(task)
        self.decoder = build_decoder_lm(task.config.model)  # no cross-attention blocks

    @property
    def model(self) -> nn.Module:
        return self.decoder

    def lm_params(self, params: Any) -> Any:
        lm = params["lm"]
        return {k: v for k, v in lm.items() if not k.startswith(CROSS_ATTENTION_PREFIX)}

    def named(self, loss: float, token_acc: float) -> dict[str, float]:
        return super().named(loss, token_acc) | {"text_perplexity": math.exp(loss)}


def _pad_rows(rows: np.ndarray, size: int, pad_id: int) -> np.ndarray:
    """`rows` [n, L] followed by size - n rows of `pad_id`: [size, L]."""
    filler = np.full((size - len(rows), *rows.shape[1:]), pad_id, rows.dtype)
    return np.concatenate([rows, filler])
