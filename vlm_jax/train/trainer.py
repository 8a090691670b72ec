"""The one trainer: build mesh -> task -> sharded state -> jitted step -> `Run.train` loop.

Each piece is a small function; task-specific parts (model, loss, data, evaluators, the batch
contract `Task.batch_spec` / `Task.host_keys`, config keys added since old runs) come from the
task registry (`config.task`). See DESIGN.md for the data flow.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from vlm_jax import sharding
from vlm_jax.checkpoint import Checkpointer, load_params
from vlm_jax.config import MissingInput, config_errors, to_json
from vlm_jax.data.pipeline import close_stream
from vlm_jax.models import lora
from vlm_jax.train import metrics as metrics_lib
from vlm_jax.train import numerics
from vlm_jax.train.batch import BatchContract
from vlm_jax.train.data_counters import DataCounters
from vlm_jax.train.distributed import train_iterator
from vlm_jax.train.optim import build_optimizer
from vlm_jax.train.preemption import StopRequest
from vlm_jax.train.state import TrainState
from vlm_jax.train.tasks import TASKS, Task, posemb_resample
from vlm_jax.train.validate import resolved_sections, validate_config

# Config sections that define the experiment: a workdir holding a run that differs in any of
# these is another experiment's, and is refused (the others only steer logging and saving).
IDENTITY_SECTIONS = ("task", "seed", "model", "loss", "data", "tokenizer", "optim")
# worker_count and data_shards change the data iterator's saved state (Grain's multi-process
# iterator checkpoints per-worker positions), so a run cannot resume with other values.
IDENTITY_TRAIN_KEYS = (
    "batch_size",
    "total_steps",
    "grad_cache_chunks",
    "worker_count",
    "data_shards",
)


# Checkpoint meta key: the metrics row of a step whose evaluation raised. The step is saved
# with it, and a relaunch runs that evaluation first (metrics.jsonl then reads as if
# uninterrupted), instead of losing the training since the last checkpoint.
PENDING_ROW = "pending_row"


def identity(config_json: str) -> dict:
    """The experiment-defining part of a config (as JSON text), its component sections as the
    code reads them (validate.resolved_sections: declared keys, defaults filled); keys added to
    its task's configs after runs existed read as the value the code used then
    (`Task.added_keys`)."""
    full = resolved_sections(config_json)
    added = TASKS.get(full["task"]).added_keys if full.get("task") in TASKS else {}
    for (section, key), value in added.items():
        if isinstance(full.get(section), dict):
            full[section].setdefault(key, value)
    ident = {k: full.get(k) for k in IDENTITY_SECTIONS}
    ident["train"] = {k: full.get("train", {}).get(k) for k in IDENTITY_TRAIN_KEYS}
    return ident


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} (workdir) vs {b!r} (now)"]


def prepare_workdir(workdir: Path, config: ml_collections.ConfigDict, is_primary: bool) -> None:
    """Write config.json; refuse a workdir that holds another experiment's run."""
    path = workdir / "config.json"
    if path.exists():
        differences = _diff(identity(path.read_text()), identity(to_json(config)))
        if differences:
            raise ValueError(
                f"workdir {str(workdir)!r} holds a run of a different experiment; differences: "
                + "; ".join(differences[:8])
                + ". Use a new --workdir (or the same config to resume)."
            )
    if is_primary:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(to_json(config))
        tmp.replace(path)


def param_layout(task: Task, config, mesh: Mesh):
    """(init_fn, abstract params, their shardings) without allocating anything.

    Fully abstract (no concrete key, no dummy array), so it also runs under a mesh of
    compile-only TPU devices (vlm_jax.compile), where jax cannot place an array.
    """
    spec = task.batch_spec(sharding.data_parallel_size(mesh))

    def init_fn(rng):
        batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in spec.items()}  # traced, not made
        return task.init(rng, batch)["params"]

    rng = jax.eval_shape(lambda: jax.random.key(config.seed))
    boxed = jax.eval_shape(init_fn, rng)
    shardings = sharding.logical_shardings(boxed, mesh, config.sharding.rules)
    unboxed = jax.eval_shape(lambda r: nn.unbox(init_fn(r)), rng)
    abstract = abstract_like(unboxed, shardings)
    sharding.check_divisible(abstract)
    return init_fn, abstract, shardings


def sharded_init(task: Task, config, mesh: Mesh):
    """(jitted rng -> params, their shardings): each device computes only its own shards."""
    init_fn, _, shardings = param_layout(task, config, mesh)
    return jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings), shardings


def init_params(task: Task, config, mesh: Mesh) -> tuple[Any, Any]:
    """Initialise params directly into their sharded layout. Returns (params, shardings)."""
    init, shardings = sharded_init(task, config, mesh)
    return init(jax.random.key(config.seed)), shardings


def state_layout(task: Task, config, mesh: Mesh):
    """(abstract TrainState, its shardings, the optimizer, the LR schedule); allocates nothing,
    so vlm_jax.compile lays out the state of a TPU topology with it on a CPU host."""
    _, params, param_shardings = param_layout(task, config, mesh)
    tx, schedule = build_optimizer(config.optim, config.train.total_steps, params)
    replicated = sharding.replicated(mesh)
    opt_abstract = jax.eval_shape(tx.init, params)
    frozen = lambda x: isinstance(x, optax.MaskedNode)  # optim.freeze: no state
    with jax.set_mesh(None):  # tree_map_params runs tx.init on placeholders: concrete arrays
        opt_shardings = optax.tree_map_params(
            tx,
            lambda p, s: p if frozen(p) else s,
            opt_abstract,
            param_shardings,
            transform_non_params=lambda _: replicated,
            is_leaf=frozen,
        )
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))  # uint32[2]
    shardings = TrainState(
        step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated
    )
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params=params,
        opt_state=abstract_like(opt_abstract, opt_shardings),
        rng=jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated),
    )
    return abstract, shardings, tx, schedule


def initial_state(task: Task, config, mesh: Mesh, state_shardings, tx) -> TrainState:
    """A fresh TrainState at step 0 (the config's random init), laid out in `state_shardings`."""
    params, _ = init_params(task, config, mesh)
    opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
    rng = jax.random.key_data(jax.random.key(config.seed + 1))
    state = TrainState(step=jnp.int32(0), params=params, opt_state=opt_state, rng=rng)
    return jax.device_put(state, state_shardings)


def build_state(task: Task, config, mesh: Mesh):
    """A fresh TrainState, its shardings, the optimizer and the LR schedule."""
    _, state_shardings, tx, schedule = state_layout(task, config, mesh)
    return initial_state(task, config, mesh, state_shardings, tx), state_shardings, tx, schedule


def log_state_memory(state) -> None:
    """How the mesh splits the train state: the busiest local device's share and the total."""
    per_device = sharding.bytes_per_device(state)
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    logging.info(
        "train state: %.1f MiB on the busiest device of %d, %.1f MiB in all",
        max(per_device.values()) / 2**20,
        len(per_device),
        total / 2**20,
    )


def make_train_step(task: Task, tx, schedule, state_shardings, batch_shardings, mesh: Mesh):
    """The jitted, buffer-donating train step: (state, batch) -> (state, metrics)."""

    lora_config = lora.lora_section(task.config.optim)

    def step_fn(state: TrainState, batch):
        with lora.adapted(lora_config, train=True):  # LoRA: the adapter path, with its dropout
            (loss, aux), grads = task.value_and_grad(state.params, batch, state.step_rng())
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        out = {f"train/{k}": v for k, v in aux.items()}
        out["train/loss"] = loss
        out["train/grad_norm"] = optax.tree.norm(grads)
        out["train/lr"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        new_state, guard_out = numerics.guard(state, new_state, loss, grads)
        return new_state, out | guard_out

    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def abstract_like(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


class PerfMeter:
    """Step time, examples/s and MFU over the steps since the last report."""

    def __init__(self, batch_size: int, flops_per_example: float | None, config, mesh: Mesh):
        self.batch_size = batch_size
        self.flops = flops_per_example
        kind = mesh.devices.flat[0].device_kind
        peak = metrics_lib.peak_flops_per_device(kind, config.perf.peak_flops_per_device)
        self.peak_total = peak * mesh.devices.size if peak else None
        self.reset(0)

    def reset(self, step: int) -> None:
        self.t0 = time.perf_counter()
        self.step0 = step

    def report(self, step: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.t0
        steps = step - self.step0
        if steps <= 0:
            return {}
        step_time = elapsed / steps
        out = {
            "perf/step_time_s": step_time,
            "perf/examples_per_s": self.batch_size / step_time,
        }
        if self.flops:
            out["perf/model_tflops_per_s"] = self.flops * out["perf/examples_per_s"] / 1e12
            if self.peak_total:
                out["perf/mfu"] = self.flops * out["perf/examples_per_s"] / self.peak_total
        self.reset(step)
        return out


def restore_or_init(
    ckpt: Checkpointer, abstract, state_shardings, data_iter, task: Task, fresh: Callable
):
    """Resume from the newest intact checkpoint into the `abstract` state's layout, else start
    from `fresh()` (the random init, made only then) and optionally load init params.

    -> (state, step or None, the checkpoint's meta dict).
    """
    restored = ckpt.restore_newest_intact(abstract, data_iter)
    if restored is not None:  # damaged newer steps were logged and moved aside
        return restored
    state = fresh()
    if task.config.init.checkpoint:
        path, resampled = task.config.init.checkpoint, posemb_options(task)
        state = state.replace(params=load_init_params(path, state, state_shardings, **resampled))
    return state, None, {}


def load_init_params(path: str, state, state_shardings, **resampled):
    """config.init.checkpoint: the params of the newest intact step of the run at `path` (with
    LoRA: the base params; the fresh adapters are kept); `resampled` (`posemb_options`): a ViT
    posemb saved for another image size is resampled to this one."""
    logging.info("initialising params from %s", path)
    abstract = abstract_like(state.params, state_shardings.params)
    base = load_params(path, lora.split_adapters(abstract)[0], **resampled)
    return lora.join_adapters(base, lora.split_adapters(state.params)[1])


def posemb_options(task: Task) -> dict:
    """`Checkpointer.restore_newest_intact_params`' posemb resampling for the task's ViTs."""
    return {"posemb_towers": task.image_towers, "resample": posemb_resample(task.config)}


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Run (or resume) training; returns the last logged metrics."""
    workdir = Path(workdir)
    with config_errors():
        validate_config(config)
        mesh = sharding.build_mesh(config.mesh.shape)
        is_primary = jax.process_index() == 0
        prepare_workdir(workdir, config, is_primary)
        task = TASKS.get(config.task)(config, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(config.sharding.rules)):
        return _train_loop(config, workdir, mesh, task, is_primary)


def _train_loop(config, workdir: Path, mesh: Mesh, task: Task, is_primary: bool):
    with config_errors():
        data_iter = train_iterator(task, config, mesh)  # first: batch/mesh mismatches fail early
    try:
        return start_run(config, workdir, mesh, task, is_primary, data_iter).train()
    finally:  # also on errors and signals: the workers and their shared memory end with the run
        close_data(data_iter)


def close_data(data_iter) -> None:
    """Stop the training stream's Grain workers and free its shared memory now: left to
    interpreter exit, it leaks (see `pipeline.close_stream`). ConcatShards: every shard."""
    for stream in getattr(data_iter, "iterators", [data_iter]):
        close_stream(stream)


def next_global_batch(data_iter, data_counts: DataCounters, contract: BatchContract, mesh, first):
    """The next global batch (the model's inputs), counting the data counters on the way; the
    `first` host batch of a run is checked against the task's batch contract.

    The host batch (in Grain's shared memory when workers made it) lives only in this frame, so
    no traceback of a later error keeps it, and its memory, alive until exit.
    """
    host_batch = next(data_iter)
    if first:
        contract.check(host_batch)
    data_counts.add(host_batch)
    return sharding.global_batch(contract.model_batch(host_batch), mesh, contract.batch_size)


def batch_contract(task: Task, config, mesh: Mesh) -> BatchContract:
    """The task's batch contract for this process's rows of the config's global batch."""
    rows = sharding.process_batch_rows(mesh, config.train.batch_size)
    spec = task.batch_spec(config.train.batch_size)
    return BatchContract(config.task, spec, task.host_keys, rows.count)


def start_run(config, workdir: Path, mesh: Mesh, task: Task, is_primary: bool, data_iter):
    """The `Run` of `config`: its state built and compiled, then resumed from the newest intact
    checkpoint in `workdir` or initialised (config.init, the task's pretrained towers)."""
    with config_errors():  # sizes and shapes the config got wrong surface while building
        contract = batch_contract(task, config, mesh)
        abstract, state_shardings, tx, schedule = state_layout(task, config, mesh)
        shardings = contract.shardings(mesh)
        step_fn = make_train_step(task, tx, schedule, state_shardings, shardings, mesh)
        ckpt = Checkpointer(
            workdir / "checkpoints",
            keep=config.train.keep_checkpoints,
            async_save=config.train.async_checkpoint,
        )
        fresh = functools.partial(initial_state, task, config, mesh, state_shardings, tx)
        # A resumed run restores into the abstract layout: no random init is made for it.
        state, resumed, meta = restore_or_init(
            ckpt, abstract, state_shardings, data_iter, task, fresh
        )
        if resumed is None:  # init checkpoints that don't fit the config are the config's
            state = state.replace(params=lora.on_base(task.load_pretrained, state.params))
        log_state_memory(state)
    start = resumed or 0
    pending = meta.get(PENDING_ROW)  # the saved step's row, whose evaluation failed
    kept_rows = resumed if pending is None else resumed - 1  # a retry's row is rewritten
    train = config.train
    return Run(
        config=config,
        task=task,
        mesh=mesh,
        contract=contract,
        data_iter=data_iter,
        step_fn=step_fn,
        state=state,
        ckpt=ckpt,
        writer=metrics_lib.MetricWriter(workdir, config, enabled=is_primary, resume_step=kept_rows),
        progress=metrics_lib.Progress(train.total_steps, start, train.batch_size, is_primary),
        perf=PerfMeter(train.batch_size, task.train_flops_per_example(), config, mesh),
        monitor=numerics.NonFiniteMonitor(
            train.on_nonfinite, state.params, meta.get("train/nonfinite_skipped", 0)
        ),
        data_counts=DataCounters(meta, sharding.process_batch_rows(mesh, train.batch_size).start),
        start=start,
        pending=pending,
    )


@dataclasses.dataclass
class Run:
    """A run in progress: its state, and what a step, a log row, an evaluation, a save or a
    stop needs (built by `start_run`). `train()` is the loop."""

    config: ml_collections.ConfigDict
    task: Task
    mesh: Mesh
    contract: BatchContract
    data_iter: Any
    step_fn: Callable  # the jitted train step: (state, batch) -> (state, metrics)
    state: TrainState
    ckpt: Checkpointer
    writer: metrics_lib.MetricWriter
    progress: metrics_lib.Progress
    perf: PerfMeter
    monitor: numerics.NonFiniteMonitor
    data_counts: DataCounters
    start: int  # the step resumed from (0: a fresh run)
    pending: dict | None  # the start step's metrics row, whose evaluation failed before
    step: int = dataclasses.field(init=False)  # the steps done so far
    last: dict = dataclasses.field(default_factory=dict)  # the last row written

    def __post_init__(self):
        self.step = self.start

    def train(self) -> dict[str, float]:
        """Step, log, evaluate and save until train.total_steps or a stop request (SIGTERM,
        Ctrl-C, a preemption notice); returns the last logged metrics."""
        cfg = self.config.train
        self.retry_evaluation()
        with StopRequest() as stop:
            while self.step < cfg.total_steps:
                metrics = self.advance()
                row = self.log(metrics) if self.due(cfg.log_every) else {}
                evaluating = self.due(cfg.eval_every)
                if evaluating:
                    row = self.evaluate(row)
                self.write(row)
                stopping = stop.should_stop(self.step)
                saving = self.due(cfg.checkpoint_every) or stopping
                if saving:
                    self.save()
                if evaluating or saving:  # keep eval and checkpoint time out of perf numbers
                    self.perf.reset(self.step)
                if stopping:
                    self.stop()
                    break
        self.close()
        return self.last

    def due(self, every: int) -> bool:
        """Whether this step logs / evaluates / saves, for `every` steps (0: never, but the
        last step always does)."""
        return self.step == self.config.train.total_steps or bool(every and self.step % every == 0)

    def advance(self) -> dict[str, jax.Array]:
        """One train step on the next batch -> its metrics, on the devices."""
        first = self.step == self.start
        self.state, metrics = self.step_fn(self.state, self.next_batch(first))
        self.step += 1
        self.on_nonfinite(self.monitor.push(self.step, metrics))
        if first:  # exclude compilation from perf numbers
            jax.block_until_ready(metrics)
            self.perf.reset(self.step)
        return metrics

    def next_batch(self, first: bool) -> dict[str, jax.Array]:
        """The next global batch; the run's `first` is checked against the batch contract."""
        return next_global_batch(self.data_iter, self.data_counts, self.contract, self.mesh, first)

    def log(self, metrics: dict[str, jax.Array]) -> dict[str, float]:
        """This step's metrics row: the step's metrics, the run's counters and perf numbers."""
        self.on_nonfinite(self.monitor.flush())
        row = {k: float(v) for k, v in jax.device_get(metrics).items()}
        row |= self.counts()
        row |= self.perf.report(self.step)
        self.progress.update(self.step, row)
        return row

    def evaluate(self, row: dict) -> dict:
        """`row` with the task's held-out metrics. If the evaluation raises, the step is saved
        first with `row` pending (a relaunch evaluates, then goes on) and the error propagates."""
        try:
            return evaluated(self.task, self.state.params, row)
        except Exception:  # keep the trained state
            logging.error("evaluation at step %d failed; saving the step first", self.step)
            self.save(pending_row=row)
            self.ckpt.close()
            raise

    def retry_evaluation(self) -> None:
        """The evaluation of the resumed step that failed before, run first (metrics.jsonl then
        reads as if uninterrupted)."""
        if self.pending is None:
            return
        logging.info("step %d: running the evaluation that failed before", self.start)
        self.last = evaluated(self.task, self.state.params, self.pending)
        self.writer.write(self.start, self.last)

    def write(self, row: dict) -> None:
        if row:
            self.writer.write(self.step, row)
            self.last = row

    def save(self, pending_row: dict | None = None) -> None:
        """Checkpoint this step (with `pending_row`: the row of its failed evaluation)."""
        self.on_nonfinite(self.monitor.flush())
        meta = self.meta() if pending_row is None else self.meta() | {PENDING_ROW: pending_row}
        self.ckpt.save(self.step, self.state, self.data_iter, meta, force=True)

    def stop(self) -> None:
        logging.warning("stopped at step %d; checkpoint saved, resume to continue", self.step)

    def on_nonfinite(self, event: dict) -> None:
        """train.on_nonfinite='stop': save the (guarded, last good) state, then raise."""
        if not event or self.monitor.policy != "stop":
            return
        self.ckpt.save(self.step, self.state, self.data_iter, self.meta(), force=True)
        self.ckpt.close()
        raise self.monitor.error(event, self.step)

    def meta(self) -> dict:
        """The checkpoint meta of this step: the step and the run's counters."""
        return {"step": self.step} | self.counts()

    def counts(self) -> dict:
        """Counters logged in metrics.jsonl and kept in the checkpoint meta across resumes:
        train/nonfinite_skipped, data/bad_records, data/truncated_captions (every process
        calls this together: the data totals are summed over processes)."""
        return {"train/nonfinite_skipped": self.monitor.skipped} | self.data_counts.totals()

    def close(self) -> None:
        self.ckpt.close()
        self.writer.close()
        self.progress.close()


def evaluated(task: Task, params, row: dict) -> dict:
    """`row` with the task's held-out metrics added as eval/<name>."""
    return row | {f"eval/{k}": v for k, v in task.evaluate(params).items()}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Evaluate the newest intact checkpoint in `workdir` (damaged newer steps are logged and
    skipped, as `load_params` does); writes WORKDIR/eval_<step>.json."""
    workdir = Path(workdir)
    with config_errors():
        validate_config(config)
        mesh = sharding.build_mesh(config.mesh.shape)
        task = TASKS.get(config.task)(config, mesh)
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise MissingInput(f"no checkpoints in {str(workdir)!r} (looked in {ckpt_dir})")
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(config.sharding.rules)):
        _, abstract, _ = param_layout(task, config, mesh)
        ckpt = Checkpointer(ckpt_dir, async_save=False)
        try:
            params, step = ckpt.restore_newest_intact_params(abstract, **posemb_options(task))
        finally:
            ckpt.close()
        results = {"step": step} | {f"eval/{k}": v for k, v in task.evaluate(params).items()}
    if jax.process_index() == 0:
        (workdir / f"eval_{step}.json").write_text(json.dumps(results, indent=2))
    return results
