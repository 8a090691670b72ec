"""The benchmark scripts' own arithmetic and option checks (their numbers go into RESULTS.md)."""

import importlib.util
import json
import math
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
    sys.modules[name] = module  # dataclasses look their module up there
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


def test_tpu_readiness_cells_validate_and_split_evenly_on_every_topology():
    """Each cell of the readiness matrix is a valid config (its overrides included), and its
    global batch (or each gradient-cache chunk of it) splits evenly over every topology's
    data-parallel groups (data x fsdp; the tensor axis shares rows), so no cell fails on
    arithmetic instead of memory."""
    from vlm_jax.compile.topology import parse_topology
    from vlm_jax.sharding import resolve_mesh_shape
    from vlm_jax.train.validate import validate_config

    readiness = load_script("tpu_readiness")
    for cell in readiness.CELLS:
        config = readiness.cell_config(cell)
        validate_config(config)
        rows = config.train.batch_size // max(config.train.grad_cache_chunks, 1)
        for target in readiness.TOPOLOGIES:
            name, slices = readiness.split_target(target)
            chips = parse_topology(name).chips * slices
            data, fsdp, _ = resolve_mesh_shape(config.mesh.shape, chips)
            assert rows % (data * fsdp) == 0, (cell.name, target, rows, data * fsdp)


def test_tpu_readiness_flop_estimate_matches_the_analytic_count():
    """The readiness table's FLOPs for tasks without an analytic count come from XLA's cost
    analysis of the lowered loss + gradient; on a two-tower model, where both exist, they
    agree (the analytic count leaves out norms, activations and the loss: well under 2%)."""
    from vlm_jax.models import flops

    readiness = load_script("tpu_readiness")
    cell = readiness.Cell(
        "b16-depth2",
        "configs/clip_b16.py",
        ("--config.model.image.depth=2", "--config.model.text.depth=2"),
    )
    config = readiness.cell_config(cell)
    config.model.image.variant = None  # B/16 would set depth 12
    analytic = flops.train_flops_per_example(config.model, (), config.tokenizer.max_len)
    estimate, how = readiness.train_flops_per_example(config)
    assert how.startswith("analytic") and estimate == analytic
    assert readiness.xla_train_flops_per_example(config) == pytest.approx(analytic, rel=0.02)


@pytest.mark.parametrize(
    "generation,peak", [("v4", 275e12), ("v5e", 197e12), ("v5p", 459e12), ("v6e", 918e12)]
)
def test_every_tpu_generation_has_its_bf16_peak(generation, peak):
    """By the device_kind jax gives its chips (a v5p is "TPU v5", a v5e "TPU v5 lite"): the
    readiness table's and the trainer's MFU need it."""
    from vlm_jax.compile.topology import GENERATIONS
    from vlm_jax.train.metrics import peak_flops_per_device

    assert peak_flops_per_device(GENERATIONS[generation].device_kind) == peak


def test_input_bench_cores_are_the_consumed_rate_over_the_per_core_rate(tmp_path):
    """A tiny run through the real pipeline of every source: the consumption follows from the
    report (step = flops / (peak * mfu)) and each row's cores = ceil(consumed / per core)."""
    bench = load_script("bench_input")
    report = {"batch_size": 4096, "chips": 32, "flops_per_chip": 2e14, "peak_flops_per_chip": 5e14}
    (tmp_path / "report.jsonl").write_text(json.dumps({"function": "train_step", **report}) + "\n")
    argv = ["--report", str(tmp_path / "report.jsonl"), "--mfu", "0.5", "--chips_per_host", "4"]
    argv += ["--images", "12", "--side", "96", "--image_size", "32", "--batch", "4"]
    argv += ["--crops", "resize_crop,inception", "--crop_scale", "0.08,1"]
    rows = bench.main([*argv, "--batches", "2", "--workers", "0", "--decoders", "pil,opencv"])
    step_s = 2e14 / (5e14 * 0.5)  # 0.8 s for 128 images a chip: 160/s, 640/s a host
    consumed = bench.consumption(report, 0.5, 4, None)
    assert consumed["step_s"] == pytest.approx(step_s)
    assert consumed["images_per_s_per_host"] == pytest.approx(4096 / 32 / step_s * 4)
    assert {(r["source"], r["decoder"], r["crop"]) for r in rows} == {
        (s, d, c)
        for s in bench.SOURCES
        for d in ("pil", "opencv")
        for c in ("resize_crop", "inception")
    }
    assert {r["crop_scale"] for r in rows} == {None, (0.08, 1.0)}
    for row in rows:
        assert row["per_core"] > 0
        assert row["cores_needed"] == math.ceil(640 / row["per_core"])
    assert bench.consumption(report, 0.5, 4, 1.6)["images_per_s_per_host"] == pytest.approx(320)


def test_input_bench_counts_a_contrastive_reports_flops_analytically():
    """A compile report without flops_per_chip (the contrastive cells compiled before the tool
    counted FLOPs): the config's analytic count."""
    from vlm_jax.config import load_config
    from vlm_jax.models import flops

    bench = load_script("bench_input")
    report = bench.read_report(str(REPO / "benchmarks/tpu_readiness/siglip_b16-32k__v5p-64.jsonl"))
    for key in ("flops", "flops_per_chip"):
        report.pop(key, None)
    config = load_config(str(REPO / "configs/siglip_b16.py"))
    per_example = flops.train_flops_per_example(config.model, (), config.tokenizer.max_len)
    consumed = bench.consumption(report, 0.4, 4, None)
    assert consumed["flops_from"] == "analytic" and consumed["peak_flops_per_chip"] == 459e12
    assert consumed["step_s"] == pytest.approx(per_example * 32768 / 32 / (459e12 * 0.4))
