"""The batch contract between a task and the trainer.

A task states the global batch its train step takes as {name: jax.ShapeDtypeStruct}
(`Task.batch_spec(batch_size)`) and names the keys its training pipeline may add for the host
only (`Task.host_keys`: record ids, the data counters `DataCounters` totals, ...). Init, the
batch shardings and the compiled step are built from the spec. The first host batch of a run
is checked against both (`BatchContract.check`): a missing, mis-shaped or mis-typed model
input, or a key the task does not name, is a ConfigError naming the key, what was expected and
what came. Only the spec's keys go to the devices (`BatchContract.model_batch`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from vlm_jax import sharding
from vlm_jax.config import ConfigError


def describe(shape: tuple[int, ...], dtype) -> str:
    """A dtype and shape as the error messages show them: "int32[16, 24]"."""
    return f"{np.dtype(dtype).name}[{', '.join(str(n) for n in shape)}]"


@dataclasses.dataclass(frozen=True)
class BatchContract:
    """What task `task`'s host batches hold: this process's `rows` rows of the global batch
    `spec` ({key: [batch_size, ...]}), plus (optionally) any of `host_keys`."""

    task: str
    spec: Mapping[str, jax.ShapeDtypeStruct]
    host_keys: tuple[str, ...]
    rows: int

    @property
    def batch_size(self) -> int:
        """The global batch's rows: every model input's leading dim."""
        return next(iter(self.spec.values())).shape[0]

    def shardings(self, mesh: Mesh) -> dict[str, NamedSharding]:
        """The global batch's shardings: split over the mesh's batch axes."""
        return {k: sharding.batch_sharding(mesh, s.ndim) for k, s in self.spec.items()}

    def expected(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of model input `key` in a host batch."""
        want = self.spec[key]
        return (self.rows, *want.shape[1:]), np.dtype(want.dtype)

    def problems(self, host_batch: Mapping[str, np.ndarray]) -> list[str]:
        """Every way `host_batch` breaks the contract, one phrase each; [] if none."""
        problems = []
        for key in self.spec:
            shape, dtype = self.expected(key)
            if key not in host_batch:
                problems.append(f"missing key {key!r} (expected {describe(shape, dtype)})")
                continue
            got = np.asarray(host_batch[key])
            if got.shape != shape or got.dtype != dtype:
                expected, found = describe(shape, dtype), describe(got.shape, got.dtype)
                problems.append(f"key {key!r}: expected {expected}, got {found}")
        for key in sorted(set(host_batch) - set(self.spec) - set(self.host_keys)):
            got = np.asarray(host_batch[key])
            problems.append(f"unexpected key {key!r} ({describe(got.shape, got.dtype)})")
        return problems

    def check(self, host_batch: Mapping[str, np.ndarray]) -> None:
        """Raise a ConfigError listing every way `host_batch` breaks the contract."""
        problems = self.problems(host_batch)
        if problems:
            raise ConfigError(
                f"task {self.task!r}: the training data's first batch does not match the "
                f"task's batch contract: {'; '.join(problems)}. The task takes "
                f"{', '.join(sorted(self.spec))} ({self.rows} rows on this process) and drops "
                f"the host-only keys {', '.join(sorted(self.host_keys))} "
                "(Task.batch_spec, Task.host_keys)"
            )

    def model_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model inputs of a checked host batch: its host-only keys dropped."""
        return {key: host_batch[key] for key in self.spec}
