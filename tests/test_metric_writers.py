"""Metric writers by name (train.metric_writers): jsonl as before, TensorBoard events, W&B
offline runs whose history equals metrics.jsonl, and the errors for bad or missing writers."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import tiny_contrastive_config
from tensorboardX.proto.event_pb2 import Event
from test_bench_scripts import load_script
from test_train import read_rows

from vlm_jax.config import ConfigError, MissingPackage
from vlm_jax.defaults import base_config
from vlm_jax.train.metrics import MetricWriter
from vlm_jax.train.trainer import train
from vlm_jax.train.validate import validate_config

ROWS = [
    (2, {"train/loss": np.float32(0.5), "data/count": 3, "eval/acc": float("nan")}),
    (3, {"train/loss": 0.25, "perf/mfu": float("inf"), "note": "text"}),
    (4, {"train/loss": 0.125}),
]
# What the single MetricWriter before named writers wrote for ROWS: keys sorted after `step`,
# numbers as floats, non-finite values as text.
JSONL = (
    '{"step": 2, "data/count": 3.0, "eval/acc": "nan", "train/loss": 0.5}\n'
    '{"step": 3, "note": "text", "perf/mfu": "inf", "train/loss": 0.25}\n'
    '{"step": 4, "train/loss": 0.125}\n'
)


def writers_config(*names, mode=""):
    config = base_config()
    config.train.metric_writers = names
    config.wandb.mode = mode
    return config


def write_rows(workdir, config, resume_step=None, enabled=True):
    writer = MetricWriter(workdir, config, enabled=enabled, resume_step=resume_step)
    for step, metrics in ROWS:
        if resume_step is None or step > resume_step:
            writer.write(step, metrics)
    writer.close()


def test_default_writers_are_jsonl_and_tensorboard():
    assert base_config().train.metric_writers == ("jsonl", "tensorboard")


def test_jsonl_rows_and_resume_as_before(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 9}\n')  # a fresh run starts anew
    write_rows(tmp_path, writers_config("jsonl"))
    assert (tmp_path / "metrics.jsonl").read_text() == JSONL
    write_rows(tmp_path, writers_config("jsonl"), resume_step=2)  # drops 3, 4; writes them again
    assert (tmp_path / "metrics.jsonl").read_text() == JSONL
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_events_hold_the_numeric_values(tmp_path):
    write_rows(tmp_path, writers_config("tensorboard"))
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    logged = {}
    for record in load_script("quickstart_curve").tfrecords(events):
        event = Event.FromString(record)
        for value in event.summary.value:
            logged[(event.step, value.tag)] = value.simple_value
    # Non-finite values and text are not scalars: TensorBoard leaves them out, as before.
    assert logged == {
        (2, "data/count"): 3.0,
        (2, "train/loss"): 0.5,
        (3, "train/loss"): 0.25,
        (4, "train/loss"): 0.125,
    }
    assert not (tmp_path / "metrics.jsonl").exists()


def test_only_the_primary_process_writes(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not even imported elsewhere
    write_rows(tmp_path, writers_config("jsonl", "tensorboard", "wandb"), enabled=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_writer_fails_before_training_naming_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"'tb' is not one of: jsonl, tensorboard, wandb"):
        validate_config(writers_config("jsonl", "tb"))
    with pytest.raises(ValueError, match="names a writer twice"):
        validate_config(writers_config("jsonl", "jsonl"))
    with pytest.raises(ValueError, match=r"wandb.mode='offlin' is not one of"):
        validate_config(writers_config("wandb", mode="offlin"))
    with pytest.raises(ConfigError, match=r"train.metric_writers='tb'"):
        train(tiny_contrastive_config(**{"train.metric_writers": "jsonl,tb"}), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the workdir was made


def test_wandb_without_the_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    extra = r"train.metric_writers 'wandb' needs .*install it with: pip install 'vlm_jax\[wandb\]'"
    with pytest.raises(MissingPackage, match=extra):
        MetricWriter(tmp_path, writers_config("wandb"), enabled=True, resume_step=None)
    with pytest.raises(MissingPackage, match=extra):  # up front, before anything compiles
        validate_config(writers_config("jsonl", "wandb"))


def test_a_plain_string_of_writers_is_refused_not_read_letter_by_letter(tmp_path):
    config = writers_config()
    with config.ignore_type():
        config.train.metric_writers = "jsonl"
    with pytest.raises(ConfigError, match=r"train.metric_writers='jsonl' is a str; expected tuple"):
        validate_config(config)
    with config.unlocked():
        del config.train["metric_writers"]  # absent: the default writers
    validate_config(config)
    writer = MetricWriter(tmp_path, config, enabled=True, resume_step=None)
    assert [type(w).__name__ for w in writer.writers] == ["JsonlWriter", "TensorBoardWriter"]
    writer.close()


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, its own files in tmp_path: nothing reaches the network or the home dir."""
    pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def wandb_records(run_dir):
    """The records of a W&B run directory's .wandb log, read back by wandb's own reader."""
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wandb_history(run_dir):
    """(run id, [{"step": step, metric: value}]) of an offline W&B run."""
    records = wandb_records(run_dir)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    history = [r["history"] for r in records if r["type"] == "history"]
    rows = [
        {"step": h["step"]["num"]} | {k: v for k, v in h["item"].items() if not k.startswith("_")}
        for h in history
    ]
    return run["run_id"], rows


def test_wandb_resume_logs_on_to_the_same_run(tmp_path, offline_wandb):
    """WANDB_MODE=offline alone makes it offline; a resume reuses the run id, a fresh run not."""
    config = writers_config("wandb")
    write_rows(tmp_path, config)
    time.sleep(1)  # a run's folder is named by the second it starts in, and its id
    write_rows(tmp_path, config, resume_step=2)
    first, resumed = sorted((tmp_path / "wandb").glob("offline-run-*"))
    run_id, history = wandb_history(first)
    assert history == [
        {"step": 2, "data/count": 3.0, "train/loss": 0.5},  # non-finite values and text: left out
        {"step": 3, "train/loss": 0.25},
        {"step": 4, "train/loss": 0.125},
    ]
    assert wandb_history(resumed) == (run_id, history[1:])
    write_rows(tmp_path, config)
    assert (tmp_path / "wandb" / "run_id").read_text().strip() != run_id


@pytest.mark.slow
def test_wandb_offline_training_run_logs_what_metrics_jsonl_holds(tmp_path, offline_wandb):
    config = tiny_contrastive_config(
        **{"train.metric_writers": "jsonl,wandb", "wandb.mode": "offline"}
    )
    train(config, tmp_path)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run_id, history = wandb_history(run_dir)
    rows = read_rows(tmp_path)
    assert [r["step"] for r in rows] == [2, 3, 4, 6]
    assert history == rows
    assert run_id == (tmp_path / "wandb" / "run_id").read_text().strip()
    assert run_dir.name.endswith(run_id)
