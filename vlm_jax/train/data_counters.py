"""Totals of the data pipeline's per-record counters (`records.COUNTERS`) for metrics.jsonl.

Every batch carries int32[b] "bad_records" (bad records stepped over to reach each example,
plus those a source dropped up front, e.g. a folder manifest's rows without a file) and
"truncated_captions" (0/1); the batches may be built in Grain worker processes, so the counts
reach the trainer only through them. Totals are summed over the processes that load distinct
rows (processes holding the same rows of a global batch load them both, and count once) and
carried across resumes in the checkpoint meta as "data/<counter>".
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from vlm_jax.data.records import COUNTERS

# Logged by every run (runs before the other counters existed log these); the others once a
# batch carries them (or the resumed checkpoint's meta has them): "truncated_sequences" only
# in runs on conversation sources.
ALWAYS_LOGGED = ("bad_records", "truncated_captions")


class DataCounters:
    def __init__(self, meta: dict, first_row: int):
        self.base = np.asarray([int(meta.get(f"data/{k}", 0)) for k in COUNTERS], np.int64)
        self.local = np.zeros(len(COUNTERS), np.int64)
        self.first_row = first_row  # of this process's rows in the global batch
        self.logged = {k for k in COUNTERS if k in ALWAYS_LOGGED or f"data/{k}" in meta}

    def add(self, host_batch: dict[str, np.ndarray]) -> None:
        for i, key in enumerate(COUNTERS):
            if key in host_batch:
                self.local[i] += int(np.sum(host_batch[key]))
                self.logged.add(key)

    def totals(self) -> dict[str, int]:
        """{"data/bad_records": n, ...} over all processes; call on every process together."""
        summed = self.local
        if jax.process_count() > 1:
            mine = np.concatenate([[self.first_row], self.local])
            gathered = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(mine))
            _, distinct = np.unique(gathered[:, 0], return_index=True)
            summed = gathered[distinct, 1:].sum(0)
        totals = zip(COUNTERS, self.base + summed)
        return {f"data/{k}": int(n) for k, n in totals if k in self.logged}
