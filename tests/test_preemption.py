"""SIGTERM mid-run: the trainer finishes the step, checkpoints, exits 0; a relaunch completes
with every metric row exactly once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_train import TINY

from vlm_jax.train.checkpoint import Checkpointer

STEPS = 30


def launch(workdir):
    overrides = {**TINY, "train.total_steps": str(STEPS), "train.log_every": "1"}
    overrides |= {"train.eval_every": "0", "train.checkpoint_every": "100"}
    argv = [sys.executable, "-m", "vlm_jax.train", "--config", "configs/siglip_shapes.py"]
    argv += ["--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in overrides.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def steps_logged(workdir):
    path = workdir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line)["step"] for line in text.splitlines()]


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_completes(tmp_path):
    proc = launch(tmp_path)
    deadline = time.time() + 240
    while len(steps_logged(tmp_path)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()[-2000:]
    stopped_at = steps_logged(tmp_path)[-1]
    assert stopped_at < STEPS
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    assert ckpt.latest_step() == stopped_at  # saved at the step it stopped on
    ckpt.close()

    proc = launch(tmp_path)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert steps_logged(tmp_path) == list(range(1, STEPS + 1))  # none missing or duplicated
