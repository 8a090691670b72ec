"""Orbax checkpoints: train state, per-process Grain iterator state, and run metadata.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. `state` holds params, optimizer state,
step and RNG (restored straight into the sharded layout); `data` holds one JSON file per process
with that process's iterator state; `meta` is JSON (config fingerprint, metrics position, and a
fingerprint of every state array).

Integrity: Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete,
so a save killed mid-write leaves no `<step>` directory. Files damaged later (truncated, deleted,
overwritten) are caught on restore: missing or malformed files make Orbax/TensorStore raise, and
bytes changed inside a compressed array chunk (which TensorStore decodes without complaint) are
caught by the array fingerprints stored in `meta`. `restore_newest_intact` then falls back to the
newest step that restores cleanly and moves the damaged ones aside to `<step>.corrupt`.

Params of another run (init checkpoints, generation, conversion) are read with `load_params`:
the same fallback to the newest intact step, but damaged steps are only logged, never moved
(the run being read is not ours to change).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vlm_jax.checkpoint.integrity import check_params_match
from vlm_jax.config import MissingInput
from vlm_jax.models import posemb
from vlm_jax.sharding import any_process

ITEMS = ("state", "data", "meta")
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step directory still being written
CORRUPT_SUFFIX = ".corrupt"


class DamagedCheckpoint(Exception):
    """A saved step whose arrays do not match the fingerprints written with them."""


class ModelMismatch(ValueError):
    """A checkpoint saved by another model config: every step has it, so no fallback helps."""


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words: uint32[*x.shape] (uint32[*x.shape, 2] for 8-byte dtypes)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = jnp.dtype(f"uint{x.dtype.itemsize * 8}")
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """uint32[2]: sum of the words and sum of the words weighted by position, mod 2**32.

    Any single changed word changes the first sum; swapped or shifted words change the second.
    The linear position is built from iotas, not a reshape, so sharded leaves stay in place.
    """
    words = _words(x)
    position = jnp.zeros(words.shape, jnp.uint32)
    for dim, size in enumerate(words.shape):
        position = position * size + jax.lax.broadcasted_iota(jnp.uint32, words.shape, dim)
    weights = position * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])


_fingerprints = jax.jit(lambda leaves: [_leaf_fingerprint(x) for x in leaves])


def _key_name(key: Any) -> str:
    """'params', '0', 'count': the same for a field, a dict key or an index of that name."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _devices(leaf: Any) -> frozenset[int] | None:
    sharding = getattr(leaf, "sharding", None)
    return None if sharding is None else frozenset(d.id for d in sharding.device_set)


def fingerprint(tree: Any) -> dict[str, str]:
    """{'a/b/kernel' leaf path: 16 hex digits} (cheap: one pass over the arrays, on device).

    Paths do not depend on the container types, so a TrainState and the nested dicts Orbax
    restores it as (`restore_params`) give the same keys. One jit per set of devices the leaves
    live on (`restore_params` puts params on a mesh and the rest on one device), outside any
    context mesh.
    """
    by_devices: dict[Any, list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        by_devices.setdefault(_devices(leaf), []).append(("/".join(map(_key_name, path)), leaf))
    out = {}
    with jax.set_mesh(None):
        for group in by_devices.values():
            values = jax.device_get(_fingerprints([leaf for _, leaf in group]))
            out |= {p: "".join(f"{int(w):08x}" for w in v) for (p, _), v in zip(group, values)}
    return out


def check_fingerprint(state: Any, expected: dict[str, str] | None, where: str) -> None:
    """Raise DamagedCheckpoint naming the leaves of `state` that differ from `expected`."""
    if expected is None:  # saved before fingerprints existed
        return
    got = fingerprint(state)
    bad = sorted(p for p in got.keys() | expected.keys() if got.get(p) != expected.get(p))
    if bad:
        raise DamagedCheckpoint(
            f"{where}: {len(bad)} arrays differ from the fingerprints saved with them: "
            + ", ".join(bad[:5])
            + (", ..." if len(bad) > 5 else "")
        )


def _describe(error: BaseException) -> str:
    """'ValueError: ...Truncated Zstd-compressed stream...': the innermost cause, which names
    the file and the problem (Orbax's outer message often names neither)."""
    for _ in range(10):
        cause = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if cause is None:
            break
        error = cause
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:300]}"


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
        meta = {**meta, "fingerprint": fingerprint(state)}
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
        """Restore state (into the shardings of `abstract_state`) and the iterator in place.

        Raises (Orbax, TensorStore, JSON or DamagedCheckpoint errors) if the step is damaged.
        """
        args = {
            "state": ocp.args.StandardRestore(abstract_state),
            "meta": ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        meta = dict(restored["meta"] or {})
        check_fingerprint(restored["state"], meta.pop("fingerprint", None), str(self._path(step)))
        return restored["state"], meta

    def restore_params(self, step: int | None, abstract_params: Any = None) -> Any:
        """Only the params of a saved train state (for init / fine-tuning / evaluation).

        `abstract_params` (ShapeDtypeStructs with shardings) places them; None restores
        arrays with the saved shapes on the default device. The rest of the state is read onto
        that device too (not into its saved shardings), so a checkpoint saved on other devices,
        e.g. by a multi-host run, restores here.
        """
        step = self.latest_step() if step is None else step
        abstract = self.saved_layout(step)
        if abstract_params is not None:
            try:
                check_params_match(abstract["params"], abstract_params, str(self._path(step)))
            except ValueError as error:
                raise ModelMismatch(str(error)) from None
            abstract["params"] = abstract_params
        args = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        meta = restored["meta"] or {}
        check_fingerprint(restored["state"], meta.get("fingerprint"), str(self._path(step)))
        return restored["state"]["params"]

    def saved_layout(self, step: int | None = None) -> Any:
        """The train state saved at `step` (default: the newest) as ShapeDtypeStructs on the
        default device, read from its metadata only (e.g. a posemb saved at another grid)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise MissingInput(f"no checkpoint in {self.directory} (no saved step)")
        meta_tree = self.manager.item_metadata(step)["state"]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), dict(meta_tree)
        )

    def restore_newest_intact(
        self, abstract_state: Any, data_iterator: Any = None
    ) -> tuple[Any, int, dict] | None:
        """Resume: restore the newest step that restores cleanly -> (state, step, meta).

        Newer damaged steps are logged and moved aside. None if there is no checkpoint at all
        (a save cut off before any step completed counts as none: the run starts fresh). If
        every step is damaged, raises RuntimeError and moves nothing: starting over would
        silently throw away the run, and an error common to all steps (out of memory, another
        model config) is more likely than all of them being damaged.
        """
        damaged = self._interrupted_saves()
        found = self._newest_intact(
            lambda s: self.restore(s, abstract_state, data_iterator), damaged
        )
        if found is not None:
            step, (state, meta) = found
            self._set_aside(damaged, step)
            logging.info("resuming from checkpoint step %d in %s", step, self.directory)
            return state, step, meta
        if self.all_steps():
            raise RuntimeError(self._no_intact_message(damaged))
        self._set_aside(damaged, None)
        return None

    def restore_newest_intact_params(
        self,
        abstract_params: Any = None,
        posemb_towers: Sequence[str] = (),
        resample: posemb.Resample | None = None,
    ) -> tuple[Any, int]:
        """(params, step) of the newest step whose params restore cleanly (`restore_params`).

        Newer damaged steps are logged and left in place. Raises MissingInput if there is
        no step, RuntimeError naming each step's problem if none is intact, and ModelMismatch
        at once if the checkpoint is of another model config.

        `posemb_towers`: top-level names of ViTs (e.g. "img") whose posemb may be saved for
        another image size: it restores as saved and is resampled (`resample`, models/posemb.py)
        into `abstract_params`' shape and sharding; every other param must match.
        """
        layout = abstract_params
        if posemb_towers and abstract_params is not None:
            saved = self.saved_layout()["params"]
            layout = posemb.restore_layout(abstract_params, saved, posemb_towers)
        damaged: dict[int, str] = {}
        found = self._newest_intact(lambda s: self.restore_params(s, layout), damaged)
        if found is None:
            if not self.all_steps():
                raise MissingInput(f"no checkpoint in {self.directory} (no saved step)")
            raise RuntimeError(self._no_intact_message(damaged))
        step, params = found
        for bad, problem in sorted(damaged.items(), reverse=True):
            logging.warning(
                "checkpoint step %d in %s is unusable: %s; loading params of step %d instead",
                bad,
                self.directory,
                problem,
                step,
            )
        if layout is not abstract_params:
            params = posemb.resample_towers(
                params, abstract_params, posemb_towers, resample or posemb.Resample()
            )
        return params, step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _newest_intact(
        self, restore_step: Callable[[int], Any], damaged: dict[int, str]
    ) -> tuple[int, Any] | None:
        """(step, restore_step(step)) for the newest step that restores on every process, or None.

        The problems of the newer steps tried are added to `damaged`. A ModelMismatch is raised
        at once: it is a config error common to all steps, not damage.
        """
        for step in sorted(self.all_steps(), reverse=True):
            try:
                result, problem = restore_step(step), None
            except ModelMismatch:
                raise
            except Exception as error:  # damage surfaces as many error types; all are reported
                result, problem = None, _describe(error)
            if not any_process(problem is not None):  # damaged on one host is damaged
                return step, result
            damaged[step] = problem or "damaged on another process"
        return None

    def _no_intact_message(self, damaged: dict[int, str]) -> str:
        return (
            f"no intact checkpoint in {self.directory} (nothing was moved): "
            + "; ".join(f"step {s}: {p}" for s, p in sorted(damaged.items()))
            + ". Repair or remove the damaged steps, or start in a new workdir."
        )

    def _interrupted_saves(self) -> dict[int, str]:
        """{step: problem} for leftover tmp directories of saves newer than the newest step."""
        newest = self.latest_step()
        found = {}
        for path in self.directory.glob(f"*{TMP_SUFFIX}*"):
            step = path.name.split(".")[0]
            if step.isdigit() and (newest is None or int(step) > newest):
                found[int(step)] = f"its save was cut off mid-write (left {path.name})"
        return found

    def _set_aside(self, damaged: dict[int, str], resumed: int | None) -> None:
        """Log each damaged step and move finished ones to `<step>.corrupt` (Orbax skips it).

        Unfinished saves stay where they are: they are not steps to Orbax, which replaces them
        when it saves that step again.
        """
        finished = set(self.all_steps())  # the same list on every process (read at start-up)
        target = f"step {resumed}" if resumed is not None else "scratch (no complete checkpoint)"
        for step, problem in sorted(damaged.items(), reverse=True):
            moved = f"; moved to {self._move_aside(step).name}" if step in finished else ""
            logging.warning(
                "checkpoint step %d in %s is unusable: %s%s; resuming from %s",
                step,
                self.directory,
                problem,
                moved,
                target,
            )
        if finished & damaged.keys():
            self.manager.reload()

    def _move_aside(self, step: int) -> Path:
        """Rename a step to a free `<step>.corrupt[-n]` (process 0 renames, all processes wait)."""
        path = self._path(step)
        target = path.with_name(path.name + CORRUPT_SUFFIX)
        n = 1
        while target.exists():
            target, n = path.with_name(f"{path.name}{CORRUPT_SUFFIX}-{n}"), n + 1
        if jax.process_index() == 0:
            path.rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint: moved step {step} aside")
        return target

    def _path(self, step: int) -> Path:
        return self.directory / str(step)


def checkpoints_dir(path: str | Path) -> Path:
    """The checkpoints directory of `path`: a run's workdir or its `checkpoints/` itself."""
    directory = Path(path)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise MissingInput(
            f"no checkpoint directory at {str(path)!r}: expected a run's workdir (holding "
            "checkpoints/) or its checkpoints/ directory"
        )
    return directory


def load_params(path: str | Path, abstract_params: Any = None, **resampled) -> Any:
    """The params of the newest intact checkpoint of the run at `path` (workdir or checkpoints/).

    Fingerprints are verified; damaged newer steps are logged and skipped (see
    `Checkpointer.restore_newest_intact_params`, which also takes `resampled`: posemb_towers,
    resample). `abstract_params` as in `restore_params`.
    """
    ckpt = Checkpointer(checkpoints_dir(path), async_save=False)
    try:
        params, step = ckpt.restore_newest_intact_params(abstract_params, **resampled)
    finally:
        ckpt.close()
    logging.info("loaded params of %s step %d", ckpt.directory, step)
    return params
