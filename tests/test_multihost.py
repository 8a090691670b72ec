"""Two processes on localhost (2 x 4 CPU devices) train exactly like one process with 8, also
when one of them is preempted (SIGTERM) mid-run and both are relaunched."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import compile_cache
import jax
import numpy as np
import pytest
from test_sharding import TINY, assert_close_except_key_bias

from vlm_jax.checkpoint import Checkpointer
from vlm_jax.config import apply_override, load_config
from vlm_jax.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
STEPS = 24
# Mesh (2, 2, 2) over 2 processes: `data` splits the batch between the processes, `fsdp` and
# `tensor` within each. data_shards=2 makes the one-process run read the same global batches.
RUN = {
    **TINY,
    "mesh.shape": "(2, 2, 2)",
    "train.data_shards": "2",
    "train.total_steps": str(STEPS),
    "train.log_every": "1",
    "train.checkpoint_every": "100",
    "train.async_checkpoint": "false",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# A pod host's chips sit at several places of the batch (v5p-64: tests/test_compile_tpu.py);
# on CPU the same layout comes from a mesh over the devices of both processes interleaved.
INTERLEAVE = (
    "import jax, runpy, vlm_jax.sharding as s\n"
    "build = s.build_mesh\n"
    "def interleaved(shape, devices=None):\n"
    "    per = [[d for d in jax.devices() if d.process_index == p] for p in (0, 1)]\n"
    "    mine = [d for pair in zip(*per) for d in pair]\n"
    "    return build(shape, devices if devices is not None else mine)\n"
    "s.build_mesh = interleaved\n"
    "runpy.run_module('vlm_jax.train', run_name='__main__')\n"
)


def start_process(
    process_id: int, port: int, workdir: Path, cache: Path, run: dict = RUN, interleave=False
) -> subprocess.Popen:
    """Process `process_id` of a 2-process run; the relaunch loads the executables the first
    launch compiled from `cache` (process 0 writes them, both read). `interleave`: the mesh
    alternates the two processes' devices (each holds every other block of rows)."""
    env = os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        **compile_cache.subprocess_env(cache),
    }
    overrides = run | {
        "distributed.coordinator_address": f"localhost:{port}",
        "distributed.num_processes": "2",
        "distributed.process_id": str(process_id),
    }
    entry = ["-c", INTERLEAVE] if interleave else ["-m", "vlm_jax.train"]
    args = [sys.executable, *entry, "--config", "configs/siglip_shapes.py"]
    args += ["--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in overrides.items()]
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def losses(workdir: Path) -> list[tuple[int, float]]:
    path = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [(row["step"], row["train/loss"]) for row in rows]


def preempt_after(process: subprocess.Popen, workdir: Path, rows: int) -> None:
    """SIGTERM to `process` once `rows` steps are logged (run in a thread)."""
    deadline = time.time() + 300
    while len(losses(workdir)) < rows and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)


def wait_all(processes: list[subprocess.Popen]) -> list[str]:
    try:
        outputs = [p.communicate(timeout=600)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-4000:]
    return outputs


def final_params(workdir: Path):
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    params = ckpt.restore_params(STEPS)
    ckpt.close()
    return jax.tree.map(np.asarray, params)


@pytest.mark.slow
def test_two_processes_match_one_process_through_a_preemption(tmp_path, tmp_path_factory):
    two, cache = tmp_path / "two_processes", compile_cache.session_dir(tmp_path_factory)
    port = free_port()
    processes = [start_process(i, port, two, cache) for i in range(2)]
    preempt = threading.Thread(target=preempt_after, args=(processes[1], two, 3))
    preempt.start()
    try:
        config = load_config(str(REPO / "configs/siglip_shapes.py"))
        for key, value in RUN.items():
            apply_override(config, key, value)
        one = tmp_path / "one_process"
        train(config, one)  # the uninterrupted reference, while the two processes run
    finally:
        preempt.join()
    # Only process 1 got SIGTERM; JAX's preemption service stops both at the same step.
    for output in wait_all(processes):
        assert "preemption sync point reached" in output, output[-4000:]
    stopped_at = checkpoint_steps(two)[-1]
    assert 3 <= stopped_at < STEPS
    assert_both_processes_saved(two, stopped_at)
    port = free_port()
    wait_all([start_process(i, port, two, cache) for i in range(2)])  # resumes, to the end

    expected = losses(one)
    assert [step for step, _ in expected] == list(range(1, STEPS + 1))
    got = losses(two)  # written by process 0 only: one row per step
    assert [step for step, _ in got] == [step for step, _ in expected]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-5)
    assert checkpoint_steps(two) == [stopped_at, STEPS]
    assert_both_processes_saved(two, STEPS)
    assert_close_except_key_bias(final_params(two), final_params(one))


@pytest.mark.slow
def test_processes_whose_rows_interleave_match_one_process(tmp_path, tmp_path_factory):
    """Each process holds rows [0, 2), [4, 6), [8, 10), [12, 14) (or the others) of a batch of
    16, as a pod host does: it loads exactly those rows, and the run equals one process with
    8 devices reading the same 8 data shards."""
    run = RUN | {"mesh.shape": "(8, 1, 1)", "train.data_shards": "8", "train.total_steps": "6"}
    two, cache = tmp_path / "two_processes", compile_cache.session_dir(tmp_path_factory)
    port = free_port()
    processes = [start_process(i, port, two, cache, run, interleave=True) for i in range(2)]
    config = load_config(str(REPO / "configs/siglip_shapes.py"))
    for key, value in run.items():
        apply_override(config, key, value)
    one = tmp_path / "one_process"
    train(config, one)  # while the two processes run
    outputs = wait_all(processes)
    for output, rows, shards in zip(
        outputs,
        ("[0, 2), [4, 6), [8, 10), [12, 14)", "[2, 4), [6, 8), [10, 12), [14, 16)"),
        ("[0, 2, 4, 6]", "[1, 3, 5, 7]"),
    ):
        assert f"loads rows {rows} of each batch of 16 (data shards {shards} of 8)" in output
    expected, got = losses(one), losses(two)
    assert [step for step, _ in got] == [step for step, _ in expected] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-5)


def checkpoint_steps(workdir: Path) -> list[int]:
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    steps = ckpt.all_steps()
    ckpt.close()
    return sorted(steps)


def assert_both_processes_saved(workdir: Path, step: int) -> None:
    """Each process stored its own data-iterator state in the step's checkpoint."""
    data_dir = workdir / "checkpoints" / str(step) / "data"
    assert sorted(f.name for f in data_dir.glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]


def dry_run(script: str, *args: str) -> list[list[str]]:
    """The commands a launcher would run, each split into its arguments."""
    result = subprocess.run(
        [str(REPO / "scripts" / script), *args],
        env=os.environ | {"DRY_RUN": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    return [shlex.split(line) for line in result.stdout.splitlines()]


TRAIN_FLAGS = ["--config", "configs/siglip_shapes.py", "--workdir", "gs://b/run"]
TRAIN_FLAGS += ["--config.mesh.shape=(-1, 1, 4)"]


def test_tpu_pod_launcher_setup_copies_the_checkout_then_installs():
    mkdir, copy, install, train = dry_run(
        "launch_tpu_pod.sh", "pod", "us-central2-b", "--setup", "--", *TRAIN_FLAGS
    )
    assert mkdir[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert copy[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
    sources = [arg for arg in copy[6:-1] if not arg.startswith("--")]
    assert [Path(s).name for s in sources] == ["setup.py", "vlm_jax", "configs"]
    assert all(Path(s).exists() for s in sources)  # no bare TPU name among the sources
    assert copy[-1] == "pod:~/vlm_jax/" and "--worker=all" in copy
    assert "pip install -q -e '.[tpu]'" in install[-1] and train[5] == "pod"


def test_tpu_pod_launcher_runs_the_trainer_on_every_worker():
    (command,) = dry_run("launch_tpu_pod.sh", "pod", "us-central2-b", "--", *TRAIN_FLAGS)
    assert command[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    assert "--worker=all" in command and "--zone=us-central2-b" in command
    remote = shlex.split(next(a for a in command if a.startswith("--command="))[10:])
    start = remote.index("python3")
    assert remote[start - 1] == "VLM_JAX_DISTRIBUTED=auto"
    assert remote[start : start + 3 + len(TRAIN_FLAGS)] == [
        "python3",
        "-m",
        "vlm_jax.train",
        *TRAIN_FLAGS,
    ]
    assert remote[:3] == ["set", "-o", "pipefail;"]  # the trainer's exit status, not tee's


def test_tpu_pod_launcher_runs_on_every_slice_of_a_multislice_job():
    """--slices N: the queued resource's nodes NAME-0 .. NAME-(N-1) each get the setup and
    the same trainer command (the runtime's MEGASCALE_* settings number the processes)."""
    commands = dry_run(
        "launch_tpu_pod.sh", "job", "us-east5-a", "--setup", "--slices", "3", "--", *TRAIN_FLAGS
    )
    setup, train = commands[:9], commands[9:]
    ssh_nodes = [c[5] for c in setup if c[4] == "ssh"]  # mkdir, then install, on each node
    assert ssh_nodes == ["job-0", "job-0", "job-1", "job-1", "job-2", "job-2"]
    assert [c[-1] for c in setup if c[4] == "scp"] == [f"job-{i}:~/vlm_jax/" for i in range(3)]
    assert [c[5] for c in train] == ["job-0", "job-1", "job-2"]
    single = dry_run("launch_tpu_pod.sh", "job", "us-east5-a", "--", *TRAIN_FLAGS)[0]
    assert all(c[6:] == single[6:] and "--worker=all" in c for c in train)


@pytest.mark.parametrize("slices", ["0", "two", ""])
def test_tpu_pod_launcher_rejects_a_bad_slice_count(slices):
    result = subprocess.run(
        [str(REPO / "scripts" / "launch_tpu_pod.sh"), "job", "z", "--slices", slices, "--", "x"],
        env=os.environ | {"DRY_RUN": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and not result.stdout
    assert f"--slices '{slices}' must be a positive integer" in result.stderr


def test_slurm_launcher_submits_one_task_per_gpu():
    (command,) = dry_run("launch_slurm.sh", "4", "8", "--", *TRAIN_FLAGS)
    assert command[:4] == ["sbatch", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8"]
    assert command[-len(TRAIN_FLAGS) - 1 :] == [
        str(REPO / "scripts" / "slurm_train.sbatch"),
        *TRAIN_FLAGS,
    ]
    sbatch = (REPO / "scripts" / "slurm_train.sbatch").read_text()
    assert "VLM_JAX_DISTRIBUTED=auto" in sbatch and 'python -m vlm_jax.train "$@"' in sbatch


def test_jax_slurm_detection_gives_each_task_one_gpu(monkeypatch):
    """Why the launcher starts one task per GPU: under SLURM, jax.distributed.initialize()
    binds each process to the GPU numbered by SLURM_LOCALID, so tasks 0..7 of a node
    together drive its 8 GPUs (one task per node would use GPU 0 only)."""
    from jax._src.clusters import ClusterEnv

    seen = []
    for local_id in range(8):
        env = {
            "SLURM_JOB_ID": "4242",
            "SLURM_STEP_NODELIST": "gpu[001-004]",
            "SLURM_STEP_NUM_NODES": "4",
            "SLURM_NTASKS": "32",
            "SLURM_PROCID": str(8 + local_id),  # node 2
            "SLURM_LOCALID": str(local_id),
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        address, count, process, local = ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, None, None, None
        )
        assert (address.split(":")[0], count, process) == ("gpu001", 32, 8 + local_id)
        seen += list(local)
    assert seen == list(range(8))


@pytest.mark.parametrize(
    "flags,env,expected",
    [
        # explicit flags win over the environment
        (
            {"coordinator_address": "head:1234", "num_processes": 4, "process_id": 2},
            {"JAX_COORDINATOR_ADDRESS": "env:1", "JAX_NUM_PROCESSES": "9", "JAX_PROCESS_ID": "7"},
            (("head:1234",), {"num_processes": 4, "process_id": 2}),
        ),
        # the environment alone (e.g. a launcher that exports JAX_* variables)
        (
            {},
            {"JAX_COORDINATOR_ADDRESS": "env:1", "JAX_NUM_PROCESSES": "9", "JAX_PROCESS_ID": "7"},
            (("env:1",), {"num_processes": 9, "process_id": 7}),
        ),
        # a flag address with the counts from the environment
        (
            {"coordinator_address": "head:1234"},
            {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
            (("head:1234",), {"num_processes": 2, "process_id": 0}),
        ),
        ({}, {"VLM_JAX_DISTRIBUTED": "auto"}, ((), {})),  # JAX's own cluster detection
        ({}, {}, None),  # single process: not initialised
    ],
    ids=["flags", "env", "flags+env", "auto", "none"],
)
def test_distributed_start_up_precedence(monkeypatch, flags, env, expected):
    from vlm_jax.train import distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("VLM_JAX_DISTRIBUTED", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = load_config(str(REPO / "configs/siglip_shapes.py"))
    for key, value in flags.items():
        apply_override(config, f"distributed.{key}", str(value))
    distributed.maybe_initialize_distributed(config)
    assert calls == ([] if expected is None else [expected])


def test_distributed_address_without_process_counts_is_refused(monkeypatch):
    from vlm_jax.train import distributed

    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: pytest.fail("called"))
    for key in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "VLM_JAX_DISTRIBUTED"):
        monkeypatch.delenv(key, raising=False)
    config = load_config(str(REPO / "configs/siglip_shapes.py"))
    apply_override(config, "distributed.coordinator_address", "head:1234")
    with pytest.raises(ValueError, match=r"'head:1234' needs num_processes > 0 .*got 0, -1"):
        distributed.maybe_initialize_distributed(config)
