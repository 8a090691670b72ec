"""Orbax checkpoints: train state, per-process Grain iterator state, and run metadata.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. `state` holds params, optimizer state,
step and RNG (restored straight into the sharded layout); `data` holds one JSON file per process
with that process's iterator state; `meta` is JSON (config fingerprint, metrics position).
Saves are asynchronous where Orbax supports it; a step directory only appears once complete,
so an interrupted save never shadows the previous good checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from vlm_jax.train.integrity import check_params_match

ITEMS = ("state", "data", "meta")


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the items this trainer stores."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=ITEMS,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict, *, force=False) -> bool:
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(
        self, step: int, abstract_state: Any, data_iterator: Any = None
    ) -> tuple[Any, dict]:
        """Restore state (into the shardings of `abstract_state`) and the iterator in place."""
        args = {
            "state": ocp.args.StandardRestore(abstract_state),
            "meta": ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"], dict(restored["meta"] or {})

    def restore_params(self, step: int | None, abstract_params: Any = None) -> Any:
        """Only the params of a saved train state (for init / fine-tuning / evaluation).

        `abstract_params` (ShapeDtypeStructs with shardings) places them; None restores
        arrays with the saved shapes on the default device. The rest of the state is read onto
        that device too (not into its saved shardings), so a checkpoint saved on other devices,
        e.g. by a multi-host run, restores here.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        meta_tree = self.manager.item_metadata(step)["state"]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), dict(meta_tree)
        )
        if abstract_params is not None:
            check_params_match(abstract["params"], abstract_params, f"{self.directory}/{step}")
            abstract["params"] = abstract_params
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return restored["state"]["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
