"""Preemption, crashes and damaged checkpoints: a run stopped by SIGTERM, killed by SIGKILL
(also in the middle of writing a checkpoint) or relaunched onto damaged checkpoints ends exactly
like an uninterrupted run: the same final params, every metric row once with the same values."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import compile_cache
import jax
import numpy as np
import pytest
from conftest import TINY_CONTRASTIVE as TINY
from test_checkpoint_integrity import largest_file, truncate
from test_train import numeric

from vlm_jax.checkpoint import TMP_SUFFIX, Checkpointer

STEPS = 16
EVERY = 2  # checkpoint_every: a SIGKILL at an odd step loses that step
RUN = {
    **TINY,
    "train.total_steps": str(STEPS),
    "train.log_every": "1",
    "train.eval_every": "0",  # eval rows at the end only
    "train.checkpoint_every": str(EVERY),
    "train.async_checkpoint": "true",  # the default: a save overlaps the next steps
}


class Run:
    """One launch of the training CLI, in its own process group (its data workers go with it),
    logging to `<workdir>.<name>.log`; launches share the compilation cache in `cache` (one
    compiles, the others load its executables)."""

    def __init__(self, workdir: Path, name: str, cache: Path):
        argv = [sys.executable, "-m", "vlm_jax.train", "--config", "configs/siglip_shapes.py"]
        argv += ["--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in RUN.items()]
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
        env |= compile_cache.subprocess_env(cache)
        self.log_path = workdir.with_name(f"{workdir.name}.{name}.log")
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def signal(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)

    def wait(self, returncode: int = 0) -> str:
        """-> the run's log, after checking how it ended."""
        try:
            self.proc.wait(timeout=300)
        finally:
            if self.proc.poll() is None:
                self.signal(signal.SIGKILL)
        log = self.log_path.read_text()
        assert self.proc.returncode == returncode, log[-3000:]
        return log


def rows(workdir: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (a run may be writing the next one)."""
    path = workdir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def logged_up_to(workdir: Path, step: int) -> bool:
    logged = rows(workdir)
    return bool(logged) and logged[-1]["step"] >= step


def saves_in_progress(workdir: Path) -> set[tuple[str, int]]:
    """(name, inode) of Orbax's tmp directories: steps being written (or left by a kill)."""
    found = set()
    directory = workdir / "checkpoints"
    for path in directory.glob(f"*{TMP_SUFFIX}*") if directory.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):  # finished (renamed) since the glob
            found.add((path.name, path.stat().st_ino))
    return found


def freeze_when(run: Run, condition) -> None:
    """SIGSTOP the run at a moment when `condition()` holds (checked again once frozen)."""
    deadline = time.time() + 300
    while True:
        assert run.proc.poll() is None, run.log_path.read_text()[-3000:]
        assert time.time() < deadline, "timed out"
        if condition():
            run.signal(signal.SIGSTOP)
            if condition():
                return
            run.signal(signal.SIGCONT)
        time.sleep(0.002)


def kill(run: Run) -> str:
    run.signal(signal.SIGKILL)
    return run.wait(-signal.SIGKILL)


def checkpoint_steps(workdir: Path) -> list[int]:
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    steps = ckpt.all_steps()
    ckpt.close()
    return sorted(steps)


def final_params(workdir: Path):
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    params = ckpt.restore_params(STEPS)
    ckpt.close()
    return params


def assert_same_run(workdir: Path, reference: Path) -> None:
    """Each step's row exactly once, same values except timings; same final params."""
    assert [r["step"] for r in rows(workdir)] == list(range(1, STEPS + 1))
    assert [numeric(r) for r in rows(workdir)] == [numeric(r) for r in rows(reference)]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
        final_params(workdir),
        final_params(reference),
    )


@pytest.fixture
def launch(tmp_path_factory):
    """Run(...) that cannot outlive the test (a failed assertion may leave one frozen)."""
    runs = []
    cache = compile_cache.session_dir(tmp_path_factory)

    def start(workdir: Path, name: str) -> Run:
        runs.append(Run(workdir, name, cache))
        return runs[-1]

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.signal(signal.SIGKILL)
            run.proc.wait()


@pytest.mark.slow
def test_kills_at_random_steps_and_damaged_checkpoints_match_an_uninterrupted_run(tmp_path, launch):
    """SIGTERM, SIGKILL between saves, SIGKILL mid-save, then the two newest intact steps
    damaged: each relaunch resumes from the newest intact step, and the run ends as if never
    interrupted. The reference run goes alongside (it shares nothing with the other)."""
    uninterrupted = launch(tmp_path / "uninterrupted", "launch")
    rng = random.Random(7)  # which steps get the signals; the same every time
    workdir = tmp_path / "run"

    sigterm_at = rng.randint(2, 4)
    run = launch(workdir, "1-sigterm")
    freeze_when(run, lambda: logged_up_to(workdir, sigterm_at))
    run.signal(signal.SIGTERM)
    run.signal(signal.SIGCONT)  # finish the step, checkpoint it, exit 0
    run.wait()
    stopped_at = rows(workdir)[-1]["step"]
    assert checkpoint_steps(workdir)[-1] == stopped_at < STEPS

    run = launch(workdir, "2-sigkill")
    kill_at = stopped_at + rng.randint(1, 3)
    kill_at += (1 - kill_at) % EVERY  # just after a checkpoint step: steps are lost
    freeze_when(run, lambda: logged_up_to(workdir, kill_at) and not saves_in_progress(workdir))
    log = kill(run)  # between saves
    assert f"resuming from checkpoint step {stopped_at} " in log
    resumed_at = checkpoint_steps(workdir)[-1]
    assert resumed_at < rows(workdir)[-1]["step"]  # steps to redo

    def cut_off_saves() -> list[str]:  # new ones of step >= resumed_at + 3 * EVERY
        new = saves_in_progress(workdir) - left_before
        return [name for name, _ in new if int(name.split(".")[0]) >= resumed_at + 3 * EVERY]

    left_before = saves_in_progress(workdir)
    run = launch(workdir, "3-sigkill-mid-save")
    freeze_when(run, cut_off_saves)  # two steps saved, the third being written
    cut_off = cut_off_saves()[0]  # "<step>.orbax-checkpoint-tmp"
    log = kill(run)
    assert f"resuming from checkpoint step {resumed_at} " in log
    *_, intact, older, newest = checkpoint_steps(workdir)  # Orbax keeps 3
    checkpoints = workdir / "checkpoints"
    truncate(checkpoints / str(newest) / "data" / "process_0-of-1.json")  # iterator state
    largest_file(checkpoints / str(older) / "state").unlink()  # an array chunk

    log = launch(workdir, "4-completes").wait()
    assert f"checkpoint step {cut_off.split('.')[0]} in" in log and f"left {cut_off}" in log
    assert f"checkpoint step {newest} in" in log and "JSONDecodeError" in log
    assert f"moved to {older}.corrupt; resuming from step {intact}" in log
    assert (checkpoints / f"{newest}.corrupt").is_dir()  # set aside, not deleted
    uninterrupted.wait()
    assert_same_run(workdir, tmp_path / "uninterrupted")


def test_ctrl_c_stops_after_the_step_and_a_second_ctrl_c_interrupts():
    """SIGINT (Ctrl-C) and SIGTERM set the stop flag the loop reads after each step; a second
    Ctrl-C aborts at once (KeyboardInterrupt); the previous handlers come back on exit."""
    from vlm_jax.train.preemption import StopRequest

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for first in (signal.SIGINT, signal.SIGTERM):
        with StopRequest() as stop:
            assert not stop.should_stop(1)
            os.kill(os.getpid(), first)
            assert stop.should_stop(2)  # the loop saves and stops after this step
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert {sig: signal.getsignal(sig) for sig in before} == before
