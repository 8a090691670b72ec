"""The benchmark scripts' own arithmetic and option checks (their numbers go into RESULTS.md)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CONTRASTIVE

REPO = Path(__file__).parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mask", ["none", "causal", "prefix"])
@pytest.mark.parametrize("seq", [8, 9, 64, 197])
def test_attention_flops_count_exactly_the_visible_pairs(mask, seq):
    """TFLOP/s count only visible (q, k) pairs: the fraction must equal the mask's own."""
    bench = load_script("bench_attention")
    case = bench.Case("c", 2, 1, seq, 8, mask)
    dense = bench.make_mask(case)
    visible = 1.0 if dense is None else np.asarray(dense.dense(2, seq, seq), np.float64).mean()
    assert bench.visible_fraction(case) == pytest.approx(visible, abs=1e-12)
    if mask == "prefix":  # the rule itself, independently: prefix rows see the prefix only
        p = seq // 2
        rows = [p] * p + [i + 1 for i in range(p, seq)]
        assert bench.visible_fraction(case) == pytest.approx(sum(rows) / seq**2)


@pytest.mark.parametrize(
    "flag,value", [("--impls", "ours,cudnnn"), ("--modes", "fwd,bwd"), ("--only", "vit_b16")]
)
def test_attention_bench_rejects_unknown_names(flag, value):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_attention.py"), flag, value],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    bad = value.split(",")[-1]
    assert result.returncode == 2 and f"{flag} {bad} is not one of" in result.stderr


@pytest.mark.slow
def test_train_step_bench_reports_per_device_flops_consistently():
    """On 8 devices XLA's count is one device's; the analytic column must be too (16 examples
    per device, so the replicated optimizer update, which XLA also counts, stays small)."""
    bench = load_script("bench_train_step")
    sizes = {"model.image.width": "128", "model.image.mlp_dim": "512"}
    sizes |= {"model.text.width": "128", "model.text.mlp_dim": "512", "train.batch_size": "128"}
    argv = ["--config", "configs/siglip_shapes.py", "--steps", "1", "--warmup", "1"]
    argv += [
        f"--config.{k}={v}"
        for k, v in (TINY_CONTRASTIVE | sizes | {"mesh.shape": "(8,1,1)"}).items()
    ]
    row = bench.main(argv)
    assert row["devices"] == 8 and row["trained_params"] > 0 and row["frozen_params"] == 0
    assert row["xla_gflops"] == pytest.approx(row["model_gflops"], rel=0.15)
