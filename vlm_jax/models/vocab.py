"""An LM's vocabulary rows: grow them for added tokens, drop them for export, check them.

A released LM has one embedding row (and, untied, one output column) per id of its tokenizer.
The VLM adds special tokens (`<image>`) past that vocabulary, so the imported LM grows by as many
rows, each the mean of the existing ones (a new token starts as an "average" token, neither an
outlier of the softmax nor a copy of one real token). Exporting back to the release's layout drops
them again (or keeps them, for a release that ships the added tokens).

The functions are pure: DecoderLM params (models/decoder.py: `embedder/embedding` float[V, D],
`unembed/kernel` float[D, V] when the embeddings are untied) in, new params out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EMBEDDING = ("embedder", "embedding")  # float[V, D]
UNEMBED = ("unembed", "kernel")  # float[D, V], untied embeddings only


def vocab_rows(lm_params: dict[str, Any]) -> int:
    """V, the embedding rows of DecoderLM params."""
    return lm_params[EMBEDDING[0]][EMBEDDING[1]].shape[0]


def _replace(lm_params: dict[str, Any], path: tuple[str, str], value) -> dict[str, Any]:
    module, name = path
    return {**lm_params, module: {**lm_params[module], name: value}}


def grow_vocab(lm_params: dict[str, Any], added_rows: int) -> dict[str, Any]:
    """V -> V + added_rows embedding rows (and output columns), each new one the mean of the old.

    Computed on the host (numpy arrays out): a restored checkpoint's arrays sit on one device,
    and a jitted op on them inside the trainer's mesh (`jax.set_mesh` over all devices) fails
    with "incompatible devices"; the caller places the grown tables (VLMTask.load_pretrained)."""
    if added_rows < 0:
        raise ValueError(f"added_rows={added_rows}: must be >= 0")
    grown = lm_params
    for path, axis in ((EMBEDDING, 0), (UNEMBED, 1)):  # float[V, D]; untied: float[D, V]
        if path[0] not in lm_params:
            continue
        table = np.asarray(lm_params[path[0]][path[1]])
        mean = table.mean(axis=axis, keepdims=True, dtype=np.float32).astype(table.dtype)
        grown = _replace(grown, path, np.concatenate([table, mean.repeat(added_rows, axis)], axis))
    return grown


def drop_vocab(lm_params: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """Keep the first `vocab_size` embedding rows (and output columns): the release's layout."""
    rows = vocab_rows(lm_params)
    if not 0 < vocab_size <= rows:
        raise ValueError(f"vocab_size={vocab_size}: must be in [1, {rows}] (the embedding rows)")
    embedding = lm_params[EMBEDDING[0]][EMBEDDING[1]]
    dropped = _replace(lm_params, EMBEDDING, embedding[:vocab_size])
    if UNEMBED[0] in lm_params:
        dropped = _replace(dropped, UNEMBED, lm_params[UNEMBED[0]][UNEMBED[1]][:, :vocab_size])
    return dropped


GROW_OR_SWAP = "grow them (vlm_jax.models.vocab.grow_vocab) or use the LM's own tokenizer"


def check_vocab_rows(key: str, rows: int, tokenizer_vocab: int, remedy: str = GROW_OR_SWAP) -> None:
    """Every id the tokenizer emits must have an embedding row (`key` names the rows' source,
    `remedy` what the user can do about too few)."""
    if tokenizer_vocab > rows:
        raise ValueError(
            f"{key}={rows} embedding rows are fewer than the tokenizer's vocabulary "
            f"({tokenizer_vocab} ids): {remedy}"
        )
