"""Sequence packing for SFT (`data.packing`): several encoded examples per row.

An example (VQAInputs: "tokens" / "loss_mask" int32[L], "prefix_len", "image" float32[K, S, S,
3] with its images first, the record counters) is added to the row being built while its text
tokens and its images fit the row's budgets, L = tokenizer.max_len text tokens (each `<image>`
one) and K = data.max_images image slots shared by the row's conversations; the first that does
not fit starts the next row (next-fit, in stream order: nothing reordered, nothing dropped, no
conversation cut). A row:

    tokens, loss_mask  int32[L]   the examples one after another, then padding; loss_mask 0 on
                                  each example's first token (it is no earlier token's target)
    segment_ids        int32[L]   1, 2, ... per example, 0 on the padding
    prefix_mask        int32[L]   1 on each example's bidirectional prefix (its prefix_len)
    image              float32[K, S, S, 3]  the examples' images in order, then blank slots
    packed_conversations, padded_tokens  int32  (records.COUNTERS, logged as data/...)
    the examples' own counters, summed

The k-th `<image>` of a row takes slot k (models/vlm.py), so each conversation keeps its own
images; the model restarts positions and keeps attention inside each segment, so every packed
example's logits, loss and gradient are those it gets alone in a row.

Checkpoints: the iterator's state is its input's state before the example that is waiting for
the next row (if any), so a restored iterator re-reads that example and yields exactly the rows
the interrupted one would have (deterministic: rows depend only on the example stream).
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np

from vlm_jax.data.records import COUNTERS, SUBSTITUTE

SUMMED = (*COUNTERS, SUBSTITUTE)


def example_length(example: dict, pad_id: int) -> int:
    """Text tokens of an encoded example: through its last non-pad or supervised token (a
    trailing unsupervised token equal to pad_id, past every target, changes no loss)."""
    used = (example["tokens"] != pad_id) | (example["loss_mask"] > 0)
    return int(np.flatnonzero(used)[-1]) + 1 if used.any() else 0


class RowBuilder:
    """One packed row under construction (module docstring)."""

    def __init__(self, max_len: int, max_images: int, image_token_id: int, pad_id: int):
        self.max_len, self.max_images = max_len, max_images
        self.image_token_id, self.pad_id = image_token_id, pad_id
        self.examples: list[tuple[dict, int, int]] = []  # (example, length, images)
        self.length = self.images = 0

    def measure(self, example: dict) -> tuple[int, int]:
        length = example_length(example, self.pad_id)
        images = int(np.sum(example["tokens"][:length] == self.image_token_id))
        return length, images

    def add(self, example: dict) -> bool:
        """Add `example` if it fits the row's budgets; False (row unchanged) if it does not."""
        length, images = self.measure(example)
        fits = self.length + length <= self.max_len and self.images + images <= self.max_images
        if self.examples and not fits:
            return False
        if not fits:  # alone in a row it must fit: the record check made it so
            raise ValueError(
                f"an example of {length} tokens and {images} images exceeds "
                f"tokenizer.max_len={self.max_len} / data.max_images={self.max_images}"
            )
        self.examples.append((example, length, images))
        self.length += length
        self.images += images
        return True

    def row(self) -> dict[str, np.ndarray]:
        tokens = np.full((self.max_len,), self.pad_id, np.int32)
        loss_mask, segment_ids, prefix_mask = (np.zeros((self.max_len,), np.int32) for _ in "abc")
        first = self.examples[0][0]["image"]
        image = np.repeat(first[-1:], self.max_images, axis=0)  # blank slots: any image will do
        start = slot = 0
        for segment, (example, length, images) in enumerate(self.examples, start=1):
            span = slice(start, start + length)
            tokens[span] = example["tokens"][:length]
            loss_mask[span] = example["loss_mask"][:length]
            loss_mask[start] = 0
            segment_ids[span] = segment
            prefix_mask[start : start + int(example["prefix_len"])] = 1
            image[slot : slot + images] = example["image"][:images]
            start, slot = start + length, slot + images
        row = {
            "image": image,
            "tokens": tokens,
            "loss_mask": loss_mask,
            "segment_ids": segment_ids,
            "prefix_mask": prefix_mask,
            "packed_conversations": np.int32(len(self.examples)),
            "padded_tokens": np.int32(self.max_len - self.length),
        }
        for key in SUMMED:
            if key not in row and any(key in e for e, _, _ in self.examples):
                row[key] = np.int32(sum(int(e.get(key, 0)) for e, _, _ in self.examples))
        return row


class PackedRowsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, budgets: dict[str, int]):
        super().__init__(parent)
        self.budgets = budgets
        self.waiting: tuple[dict, dict] | None = None  # (example, input state before it)

    def __next__(self) -> dict[str, np.ndarray]:
        row = RowBuilder(**self.budgets)
        if self.waiting is not None:
            row.add(self.waiting[0])
            self.waiting = None
        while True:
            state = copy.deepcopy(self._parent.get_state())
            try:
                example = next(self._parent)
            except StopIteration:
                if not row.examples:
                    raise
                return row.row()
            if not row.add(example):
                self.waiting = (example, state)
                return row.row()

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state() if self.waiting is None else self.waiting[1]

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)
        self.waiting = None


class PackedRows(grain.IterDataset):
    """Encoded examples -> packed rows (module docstring); `budgets`: max_len, max_images,
    image_token_id, pad_id."""

    def __init__(self, parent: grain.IterDataset, **budgets: int):
        super().__init__(parent)
        self.budgets = budgets

    def __iter__(self) -> PackedRowsIterator:
        return PackedRowsIterator(self._parent.__iter__(), self.budgets)

    def __str__(self) -> str:
        return f"PackedRows({self.budgets})"
