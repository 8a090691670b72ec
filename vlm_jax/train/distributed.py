"""Multi-process start-up: `jax.distributed.initialize` from the config or the environment.

Order of precedence: explicit `config.distributed.coordinator_address` (with num_processes and
process_id), then the environment (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID), then cluster auto-detection that JAX itself provides (TPU pods, SLURM) when
`VLM_JAX_DISTRIBUTED=auto`. With none of these the run is single-process.
"""

from __future__ import annotations

import logging
import os

import jax


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
