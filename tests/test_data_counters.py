"""The trainer's totals of the pipeline's per-record counters."""

from unittest import mock

import numpy as np

from vlm_jax.train import data_counters
from vlm_jax.train.data_counters import DataCounters


def batch(bad: list[int], truncated: list[int], cut: list[int] | None = None) -> dict:
    counters = {"bad_records": np.int32(bad), "truncated_captions": np.int32(truncated)}
    return counters if cut is None else counters | {"truncated_sequences": np.int32(cut)}


def test_totals_add_batches_to_the_resumed_counts():
    counts = DataCounters({"data/bad_records": 5}, first_row=0)
    counts.add(batch([0, 2, 0], [1, 0, 0]))
    counts.add(batch([1, 0, 0], [1, 1, 0], [0, 1, 1]))  # conversations: sequences cut too
    counts.add({"image": np.zeros(3)})  # a task whose batches carry no counters
    assert DataCounters({}, first_row=0).totals() == {  # truncated_sequences: once it is seen
        "data/bad_records": 0,
        "data/truncated_captions": 0,
    }
    assert counts.totals() == {
        "data/bad_records": 8,
        "data/truncated_captions": 3,
        "data/truncated_sequences": 2,
    }


def test_processes_holding_the_same_rows_count_once():
    """Four processes; 0 and 1 hold rows 0.., 2 and 3 hold rows 8.. (replicated pairs)."""
    rows = [[0, 2, 1, 0], [0, 2, 1, 0], [8, 3, 0, 4], [8, 3, 0, 4]]  # first row, 3 counters
    unseen = len(data_counters.COUNTERS) - 3  # the packing counters: zero, and never logged
    gathered = np.asarray([row + [0] * unseen for row in rows])
    counts = DataCounters({}, first_row=0)
    counts.add(batch([2], [1], [0]))
    with (
        mock.patch.object(data_counters.jax, "process_count", return_value=4),
        mock.patch.object(
            data_counters.multihost_utils, "process_allgather", return_value=gathered
        ),
    ):
        assert counts.totals() == {
            "data/bad_records": 5,
            "data/truncated_captions": 1,
            "data/truncated_sequences": 4,
        }
