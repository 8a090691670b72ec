"""Ablation runner bookkeeping: commands, summaries of a run, the mean ± std table."""

import concurrent.futures
import csv
import importlib.util
import json
import os
import signal
import threading
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "ablate_connectors", Path(__file__).parents[1] / "experiments" / "ablate_connectors.py"
)
ablate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablate)


def test_command_carries_cell_seed_and_extra_overrides(tmp_path):
    cmd = ablate.command("vlm_jax.train", "configs/vlm_shapes.py:stage2", tmp_path,
                         "perceiver32/early", 1, ["train.total_steps=7"])  # fmt: skip
    assert cmd[1:3] == ["-m", "vlm_jax.train"]
    assert "--config.model.connector.num_tokens=32" in cmd
    assert "--config.seed=1" in cmd and cmd[-1] == "--config.train.total_steps=7"
    assert ablate.run_dir(tmp_path, "mlp64/xattn", 0).name == "mlp64_xattn__s0"


def test_summarise_and_table(tmp_path):
    rows = [
        {"step": 50, "train/loss": 1.0, "perf/step_time_s": 0.2},
        {"step": 100, "train/loss": 0.5, "perf/step_time_s": 0.4, "eval/acc": 0.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    write_run_config(tmp_path, total_steps=100)
    summary = ablate.summarise(tmp_path)
    assert summary["acc"] == 0.5 and summary["final_train_loss"] == 0.5
    assert abs(summary["step_time_s"] - 0.3) < 1e-9
    results = [
        {"cell": "mlp64/early", "seed": s, "acc": a, "visual_tokens": 64, "step_time_s": 0.1}
        for s, a in ((0, 0.4), (1, 0.6))
    ]
    table = ablate.markdown_table(results, ("text_only", "mlp64/early"))
    lines = table.splitlines()
    assert len(lines) == 3  # header, rule, one cell (text_only has no runs)
    assert lines[2].startswith("| mlp64/early | 2 | 64 | 0.50 ± 0.14 |")  # sample std, ddof=1


def write_run_config(workdir: Path, total_steps: int) -> None:
    """The part of the trainer's config.json the runner reads."""
    (workdir / "config.json").write_text(json.dumps({"train": {"total_steps": total_steps}}))


def finished_rows(acc: float) -> str:
    rows = [{"step": 4, "train/loss": 0.25, "perf/step_time_s": 0.5, "eval/acc": acc}]
    return "\n".join(json.dumps(r) for r in rows)


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # plots of absent metrics
def test_finished_cells_are_kept_and_interrupted_ones_relaunched(tmp_path, monkeypatch):
    """text_only finished earlier (result.json): not relaunched, still in results.csv.
    mlp64/early was interrupted (a checkpoint, no result): relaunched in its own workdir,
    which keeps what it holds, so training resumes there."""
    finished = ablate.run_dir(tmp_path, "text_only", 0)
    finished.mkdir(parents=True)
    old = {"cell": "text_only", "seed": 0, "acc": 0.25, "visual_tokens": 0, "step_time_s": 0.1}
    (finished / "result.json").write_text(json.dumps(old))
    interrupted = ablate.run_dir(tmp_path, "mlp64/early", 0)
    (interrupted / "checkpoints" / "2").mkdir(parents=True)
    launched = []

    def run_logged(cmd, workdir, what):
        launched.append((what, cmd[cmd.index("--workdir") + 1], cmd[2]))
        assert (workdir / "checkpoints" / "2").is_dir()  # not wiped before the relaunch
        (workdir / "metrics.jsonl").write_text(finished_rows(acc=0.75))
        write_run_config(workdir, total_steps=4)

    monkeypatch.setattr(ablate, "_run_logged", run_logged)
    ablate.main(["--out", str(tmp_path), "--cells", "text_only,mlp64/early", "--seeds", "0"])
    assert launched == [("mlp64/early", str(interrupted), "vlm_jax.train")]
    with (tmp_path / "results.csv").open() as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["mlp64/early", "text_only"]
    assert float(rows["text_only"]["acc"]) == 0.25 and float(rows["mlp64/early"]["acc"]) == 0.75
    assert float(rows["mlp64/early"]["final_train_loss"]) == 0.25
    assert json.loads((interrupted / "result.json").read_text())["acc"] == 0.75

    launched.clear()  # a second invocation: both results exist, nothing is launched
    ablate.main(["--out", str(tmp_path), "--cells", "text_only,mlp64/early", "--seeds", "0"])
    assert launched == []


def fake_training(launched: list, reached: dict[str, int], total: int = 4):
    """A stand-in for `python -m vlm_jax.train`: logs up to reached[cell] of `total` steps."""

    def run_logged(cmd, workdir, what):
        launched.append(what)
        rows = [{"step": s, "train/loss": 1.0 / s} for s in range(1, reached.get(what, total))]
        rows.append({"step": reached.get(what, total), "eval/acc": 0.5, "train/loss": 0.1})
        (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        write_run_config(workdir, total)

    return run_logged


def read_csv(path: Path) -> dict[tuple[str, str], dict]:
    with path.open() as f:
        return {(r["cell"], r["seed"]): r for r in csv.DictReader(f)}


@pytest.mark.filterwarnings("ignore:Mean of empty slice")
def test_a_stopped_run_is_not_finished_and_a_failure_does_not_lose_the_others(
    tmp_path, monkeypatch
):
    """A trainer stopped by Ctrl-C / preemption exits 0 at step 2 of 4: no result.json (it is
    resumed next time); the other run's results are still written; the exit names the run."""
    launched = []
    monkeypatch.setattr(ablate, "_run_logged", fake_training(launched, {"mlp64/early": 2}))
    args = ["--out", str(tmp_path), "--cells", "text_only,mlp64/early", "--seeds", "0"]
    with pytest.raises(SystemExit, match=r"mlp64/early seed 0: .*stopped at step 2 of 4"):
        ablate.main(args)
    assert not (ablate.run_dir(tmp_path, "mlp64/early", 0) / "result.json").exists()
    assert list(read_csv(tmp_path / "results.csv")) == [("text_only", "0")]
    monkeypatch.setattr(ablate, "_run_logged", fake_training(launched, {}))
    ablate.main(args)  # the stopped run is relaunched (resumed), the finished one kept
    assert launched == ["text_only", "mlp64/early", "mlp64/early"]
    assert sorted(read_csv(tmp_path / "results.csv")) == [("mlp64/early", "0"), ("text_only", "0")]


@pytest.mark.filterwarnings("ignore:Mean of empty slice")
def test_results_are_kept_per_settings(tmp_path, monkeypatch):
    """Earlier invocations' runs with the same --base/--set join results.csv; a finished run
    is never reused for other settings (the run fails naming both)."""
    launched = []
    monkeypatch.setattr(ablate, "_run_logged", fake_training(launched, {}))
    ablate.main(["--out", str(tmp_path), "--cells", "text_only", "--seeds", "0,1"])
    ablate.main(["--out", str(tmp_path), "--cells", "mlp64/early", "--seeds", "0"])
    assert sorted(read_csv(tmp_path / "results.csv")) == [
        ("mlp64/early", "0"), ("text_only", "0"), ("text_only", "1")
    ]  # fmt: skip
    other = ["--out", str(tmp_path), "--cells", "text_only", "--seeds", "0"]
    with pytest.raises(SystemExit, match=r"finished with .*'set': \[\]\}, not .*total_steps=9"):
        ablate.main([*other, "--set", "train.total_steps=9"])
    assert launched == ["text_only", "text_only", "mlp64/early"]


def _stops_early(signum: int | None, launched: list[str]):
    """A stand-in for the trainer under Ctrl-C / preemption: the signal reaches the whole
    process group (the runner too, when `signum` is set), and the run saves and exits 0
    before its total steps."""

    def run(cmd, workdir, what):
        launched.append(what)
        if signum is not None:
            os.kill(os.getpid(), signum)
        write_run_config(workdir, total_steps=100)
        (workdir / "metrics.jsonl").write_text(json.dumps({"step": 40, "train/loss": 1.0}))

    return run


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt here, however pytest was started: a process launched in
    the background by a non-interactive shell (`pytest &`, nohup, some CI runners) inherits
    SIGINT ignored, and Python then leaves it ignored (that, not the code under test, failed
    these tests in such runs)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_cancels_the_runs_not_started(tmp_path, monkeypatch, ctrl_c_raises):
    """Ctrl-C reaches the runner while a run is training; that run stops on its own (the
    trainer saves and exits), and the runs still queued are never started, whichever thread
    the signal woke and however late the main thread handles it."""
    launched = []
    monkeypatch.setattr(ablate, "_run_logged", _stops_early(signal.SIGINT, launched))
    cells = "text_only,mlp64/early,pool16/early"
    with pytest.raises(KeyboardInterrupt):
        ablate.main(["--out", str(tmp_path), "--cells", cells, "--seeds", "0"])
    assert launched == ["text_only"]
    assert not (tmp_path / "runs" / "text_only__s0" / "result.json").exists()  # resumable


def test_a_run_stopped_by_a_signal_stops_the_grid(tmp_path, monkeypatch):
    """A signal that only the training process got (a scheduler's SIGTERM to it) also stops
    the grid: the stopped run and the runs not started are reported, nothing else launches."""
    launched = []
    monkeypatch.setattr(ablate, "_run_logged", _stops_early(None, launched))
    with pytest.raises(SystemExit) as stopped:
        ablate.main(["--out", str(tmp_path), "--cells", "text_only,mlp64/early", "--seeds", "0"])
    assert launched == ["text_only"]
    assert "stopped at step 40 of 100" in str(stopped.value)
    assert "mlp64/early seed 0: not started" in str(stopped.value)


def test_a_signal_on_a_worker_thread_interrupts_the_main_thread_at_once(ctrl_c_raises):
    """Python runs signal handlers on the main thread only; a SIGINT that the kernel delivered
    to a worker thread must still raise KeyboardInterrupt in the waiting main thread while that
    worker is busy (before, the main thread slept until the next future completed)."""
    go, release = threading.Event(), threading.Event()

    def worker():
        go.wait(timeout=30)  # the main thread is inside pytest.raises
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        return release.wait(timeout=30)  # True only if the main thread released it

    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(worker)
    try:
        with pytest.raises(KeyboardInterrupt):
            go.set()
            list(ablate._as_completed_interruptibly([future]))
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert future.result() is True
