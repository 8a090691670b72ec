"""Multi-process start-up and per-process data.

Start-up (`maybe_initialize_distributed`), in order of precedence: an explicit
`config.distributed.coordinator_address` (with num_processes and process_id), then the
environment (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), then the cluster
auto-detection JAX itself provides (TPU pods, SLURM, ...) when `VLM_JAX_DISTRIBUTED=auto`.
With none of these the run is single-process.

Data: the global batch is split into `train.data_shards` row blocks (0: as many as there are
distinct blocks of rows held by the processes). Shard s reads record block s of the split
(the pipeline's process_index=s of data_shards), so a run with a fixed `data_shards` sees the
same global batches on any number of processes; each process loads only the shards whose rows
its devices hold (`sharding.process_batch_rows`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from vlm_jax import sharding


def maybe_initialize_distributed(config) -> None:
    dist = config.distributed
    address = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if address:
        num = dist.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
        pid = (
            dist.process_id if dist.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
        )
        if num <= 0 or pid < 0:
            raise ValueError(
                f"distributed.coordinator_address={address!r} needs num_processes > 0 and "
                f"process_id >= 0 (got {num}, {pid})"
            )
        jax.distributed.initialize(address, num_processes=num, process_id=pid)
    elif os.environ.get("VLM_JAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
    else:
        return
    logging.info(
        "distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def data_shard_plan(
    mesh: Mesh, global_batch_size: int, data_shards: int = 0
) -> tuple[list[int], int, int]:
    """(the shards this process loads, in its rows' order; the number of shards; rows per
    shard). Shard i holds global rows [i * rows, (i + 1) * rows); by default the shards are as
    large as the process's row spans allow (one per process when its rows are contiguous)."""
    rows = sharding.process_batch_rows(mesh, global_batch_size)
    return shard_plan(rows, global_batch_size, data_shards)


def shard_plan(
    rows: sharding.BatchRows, global_batch_size: int, data_shards: int = 0
) -> tuple[list[int], int, int]:
    """`data_shard_plan` for this process's rows of the batch (`sharding.process_batch_rows`)."""
    bounds = [bound for span in rows.spans for bound in span]
    fewest = global_batch_size // math.gcd(*bounds)  # shards whose blocks tile every span
    count = data_shards or fewest
    per_shard = global_batch_size // count if global_batch_size % count == 0 else 0
    if not per_shard or any(bound % per_shard for bound in bounds):
        spans = ", ".join(f"[{start}, {stop})" for start, stop in rows.spans)
        raise ValueError(
            f"train.data_shards={data_shards} must divide the batch size {global_batch_size} "
            f"into blocks that tile this process's rows {spans} (e.g. a multiple of "
            f"{fewest}, or 0)"
        )
    shards = [i for start, stop in rows.spans for i in range(start // per_shard, stop // per_shard)]
    return shards, count, per_shard


class ConcatShards:
    """Several shard iterators in lock-step, their batches concatenated in shard order.

    Checkpointable like one Grain iterator (`grain.checkpoint.CheckpointHandler` stores the
    bytes of `get_state()` per process).
    """

    def __init__(self, iterators: list[Iterator]):
        self.iterators = iterators

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(it) for it in self.iterators]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self) -> bytes:
        return json.dumps([it.get_state() for it in self.iterators]).encode()

    def set_state(self, state: bytes) -> None:
        states = json.loads(state)
        if len(states) != len(self.iterators):
            raise ValueError(
                f"data state holds {len(states)} shards but this process loads "
                f"{len(self.iterators)}; resume with the same train.data_shards and mesh"
            )
        for it, shard_state in zip(self.iterators, states):
            it.set_state(shard_state)

    def start_prefetch(self) -> None:
        for it in self.iterators:
            it.start_prefetch()


def train_iterator(task, config, mesh: Mesh) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of every global training batch (see the module docstring)."""
    mine = sharding.process_batch_rows(mesh, config.train.batch_size)
    shards, count, rows = shard_plan(mine, config.train.batch_size, config.train.data_shards)
    logging.info(
        "data: process %d loads rows %s of each batch of %d (data shards %s of %d)",
        jax.process_index(),
        ", ".join(f"[{start}, {stop})" for start, stop in mine.spans),
        config.train.batch_size,
        shards,
        count,
    )
    streams = [iter(task.train_data(rows, s, count, config.seed)) for s in shards]
    return streams[0] if len(streams) == 1 else ConcatShards(streams)
