"""Ablation runner bookkeeping: commands, summaries of a run, the mean ± std table."""

import csv
import importlib.util
import json
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
    assert lines[2].startswith("| mlp64/early | 2 | 64 | 0.50 ± 0.10 |")


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
