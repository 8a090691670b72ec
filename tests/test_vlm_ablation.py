"""Ablation runner bookkeeping: commands, summaries of a run, the mean ± std table."""

import importlib.util
import json
from pathlib import Path

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
