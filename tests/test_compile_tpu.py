"""Ahead-of-time compilation for TPU topologies (python -m vlm_jax.compile).

Tests marked by `needs_libtpu()` compile for a real topology with libtpu (not in the [test]
extra yet: they skip without it) and take about a minute each on 2 cores; the others check
the names, errors, HLO parsing and backend choice on CPU alone.
"""

import json
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vlm_jax import sharding
from vlm_jax.compile import hlo
from vlm_jax.compile.__main__ import main
from vlm_jax.compile.topology import parse_topology
from vlm_jax.kernels import autotune, flash
from vlm_jax.kernels.attention import resolve_impl

# Small enough to compile in well under a minute; heads of width 32, chunked ring loss.
TINY_CONTRASTIVE = [
    "--config",
    "configs/siglip_shapes.py",
    "--config.model.attention_impl=pallas",
    "--config.loss.chunked=True",
    "--config.train.batch_size=16",
    "--config.eval.batch_size=16",
    "--config.model.image.depth=1",
    "--config.model.text.depth=1",
]
TINY_VLM = [
    "--config",
    "configs/vlm_shapes.py",
    "--config.model.attention_impl=pallas",
    "--config.train.batch_size=8",
    "--config.model.image.depth=1",
    "--config.model.lm.depth=1",
]
TPU_MESH = AbstractMesh(
    (2,),
    ("data",),
    abstract_device=AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu"),
)


def needs_libtpu():
    pytest.importorskip("libtpu")


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the compile CLI run in this process."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def compile_rows(argv, tmp_path, capsys) -> tuple[list[dict], str]:
    out = tmp_path / "report.jsonl"
    code, stdout, stderr = run_cli([*argv, "--out", str(out)], capsys)
    assert code == 0, stderr
    return [json.loads(line) for line in out.read_text().splitlines()], stdout


# -- no libtpu needed ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, libtpu_name, chips",
    [
        ("v4-128", "v4:4x4x4", 64),  # v4: the number counts TensorCores, 2 per chip
        ("v5p-64", "v5p:2x4x4", 32),
        ("v5p-256", "v5p:4x4x8", 128),
        ("v5p-8", "v5p:2x2x1", 4),
        ("v5e-256", "v5e:16x16", 256),  # v5e/v6e: the number counts chips
        ("v5litepod-8", "v5e:2x4", 8),
        ("v6e-256", "v6e:16x16", 256),
        ("v5p:4x4x4", "v5p:4x4x4", 64),
        ("v6e:2x2", "v6e:2x2", 4),
    ],
)
def test_topology_names_as_users_write_them(name, libtpu_name, chips):
    topology = parse_topology(name)
    assert (topology.libtpu_name, topology.chips) == (libtpu_name, chips)


@pytest.mark.parametrize("name", ["v7-8", "v5p-6", "v5p:2x2", "v5e:2x2x2", "tpu", "v4-4"])
def test_unknown_topology_fails_naming_the_valid_forms(name, capsys):
    code, _, err = run_cli([*TINY_CONTRASTIVE, "--topology", name], capsys)
    assert code == 2
    assert err.startswith(f"error: --topology={name!r}") and "v5p:4x4x4" in err
    assert len(err.strip().splitlines()) == 1


def test_mesh_that_does_not_match_the_chip_count_names_both(capsys):
    argv = [*TINY_CONTRASTIVE, "--topology", "v5p:2x2x1", "--config.mesh.shape=(2,2,2)"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert "mesh.shape=(2, 2, 2)" in err and "v5p:2x2x1" in err and "4 chips" in err


def test_missing_libtpu_is_one_error_line_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
    code, _, err = run_cli([*TINY_CONTRASTIVE, "--topology", "v5p-8"], capsys)
    assert code == 2
    assert err.startswith("error: ") and "vlm_jax[tpu]" in err
    assert len(err.strip().splitlines()) == 1


def test_collectives_of_a_cpu_compiled_sharded_function():
    mesh = sharding.build_mesh((8, 1, 1))
    rows = NamedSharding(mesh, P("data"))
    total = jax.jit(lambda x: x.sum(), in_shardings=rows).lower(np.ones(64, np.float32))
    found = hlo.collectives(total.compile().as_text())
    assert found["all-reduce"]["count"] >= 1 and found["all-reduce"]["bytes"] >= 4
    assert set(found) == set(hlo.COLLECTIVES)


def test_async_collectives_count_their_results_only():
    text = "\n".join(
        [
            "  %ag = (bf16[4,128]{1,0:T(8,128)}, bf16[16,128]{1,0}) all-gather-start(%p), x=1",
            "  %cp = (f32[8]{0}, f32[8]{0}, u32[]{:S(2)}, u32[]) collective-permute-start(%q)",
            "  ROOT %ar = (f32[2,3]{1,0}, s32[]) all-reduce(%a, %b), to_apply=%sum",
            "  %d = bf16[16,128]{1,0} all-gather-done(%ag)",
            "  %f = f32[4]{0} fusion(%all-gather.3), kind=kLoop",
        ]
    )
    found = hlo.collectives(text)
    assert found["all-gather"] == {"count": 1, "bytes": 16 * 128 * 2}
    assert found["collective-permute"] == {"count": 1, "bytes": 8 * 4}
    assert found["all-reduce"] == {"count": 1, "bytes": 6 * 4 + 4}


def test_target_device_comes_from_the_mesh_in_scope():
    assert autotune.target_device().platform == jax.default_backend()
    with jax.set_mesh(sharding.build_mesh((8, 1, 1))):
        assert autotune.target_device() == ("cpu", jax.devices()[0].device_kind)
    with jax.sharding.use_abstract_mesh(TPU_MESH):
        assert autotune.target_device() == ("tpu", "TPU v5 lite")
        assert resolve_impl("auto") == "pallas"  # TPU's fallback rule, not CPU's xla


def test_flash_lowers_for_the_platform_of_the_mesh(monkeypatch):
    seen = []
    monkeypatch.setattr(flash, "_flash", lambda q, k, v, masks, spec: seen.append(spec) or q)
    q = jax.ShapeDtypeStruct((2, 128, 2, 64), np.float32)
    jax.eval_shape(flash.flash_attention, q, q, q)
    with jax.sharding.use_abstract_mesh(TPU_MESH):
        jax.eval_shape(flash.flash_attention, q, q, q)
    assert [(s.backend, s.interpret) for s in seen] == [("cpu", True), ("tpu", False)]


# -- with libtpu: real compiles for v5p:2x2x1 (4 chips) -----------------------------------
def test_tiny_contrastive_compiles_with_mosaic_attention_and_fsdp_halves_params(tmp_path, capsys):
    needs_libtpu()
    base = [*TINY_CONTRASTIVE, "--topology", "v5p:2x2x1"]
    rows, table = compile_rows([*base, "--config.mesh.shape=(2,2,1)"], tmp_path, capsys)
    assert [r["function"] for r in rows] == ["train_step", "embed_image", "embed_text"]
    assert all(r["attention"] == "mosaic" and r["fits"] for r in rows)
    assert "train_step" in table and "mosaic" in table
    step = rows[0]
    assert step["chips"] == 4 and step["device_kind"] == "TPU v5"
    assert step["collectives"]["all-reduce"]["count"] > 0
    assert step["collectives"]["collective-permute"]["count"] > 0  # the chunked loss's ring
    (wider,), _ = compile_rows(
        [*base, "--config.mesh.shape=(1,4,1)", "--functions", "train_step"], tmp_path, capsys
    )
    ratio = wider["params_per_chip"] / step["params_per_chip"]
    assert 0.5 <= ratio < 0.52  # fsdp 2 -> 4: halved, but for a few replicated scalars
    # the compiler's argument bytes drop by what the split predicts: params + Adam's mu, nu
    predicted = 3 * (step["params_per_chip"] - wider["params_per_chip"])
    measured = step["memory_per_chip"]["arguments"] - wider["memory_per_chip"]["arguments"]
    assert abs(measured - predicted) < 0.1 * predicted


def test_tiny_vlm_compiles_with_mosaic_attention(tmp_path, capsys):
    needs_libtpu()
    argv = [*TINY_VLM, "--topology", "v5p:2x2x1", "--config.mesh.shape=(2,2,1)"]
    (step,), _ = compile_rows(argv, tmp_path, capsys)
    assert step["function"] == "train_step" and step["fits"]
    assert step["attention"] == "mosaic" and step["tpu_custom_calls"] >= 3  # fwd, dkv, dq


def test_oversized_config_fails_naming_need_capacity_and_knobs(capsys):
    needs_libtpu()
    argv = [*TINY_CONTRASTIVE, "--topology", "v5e:2x2", "--functions", "train_step"]
    code, out, err = run_cli([*argv, "--config.train.batch_size=1048576"], capsys)
    assert code == 1
    assert "train_step does not fit" in err and "GiB per chip" in err and "16 GiB HBM" in err
    for knob in ("fsdp", "model.remat", "train.grad_cache_chunks", "loss.chunked", "batch_size"):
        assert knob in err
    assert "NO" in out


def test_multi_slice_mesh_puts_the_data_axis_across_slices():
    needs_libtpu()
    from vlm_jax.compile.topology import topology_devices

    devices = topology_devices(parse_topology("v5e:2x2"), num_slices=2)
    mesh = sharding.build_mesh((-1, 2, 1), devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)  # int[data, fsdp, tensor]
    assert (slice_of[:2] == slice_of[0, 0, 0]).all() and (slice_of[2:] != slice_of[0, 0, 0]).all()
    with pytest.raises(ValueError, match="multiple of the 2 slices"):
        sharding.build_mesh((1, 8, 1), devices)
