"""impl="auto": the measured-table choice, its support predicates, fallback and logging; the
tables' writers (bench_attention.py --write-table, tune_flash_gpu.py) and readers agree."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_bench_scripts import load_script

from vlm_jax.kernels import AttentionMask, attention, autotune, flash
from vlm_jax.kernels.attention import resolve_impl, supported_impls
from vlm_jax.kernels.autotune import AttentionCall

FAKE_GPU = "Fake GPU X1"
SHIPPED_TABLES = autotune.TABLES_DIR  # before the fixture points TABLES_DIR elsewhere


def entry(mask, seq, ms, head_dim=128, dtype="bfloat16"):
    return dict(mask=mask, head_dim=head_dim, dtype=dtype, seq=seq, case="c", ms=ms)


FAKE_TABLE = {
    "device_kind": FAKE_GPU,
    "source": "made up for tests",
    "entries": [
        entry("causal", 1024, {"fwd_bwd": {"pallas": 1.0, "cudnn": 2.0, "xla": 9.0}}),
        entry("causal", 8192, {"fwd_bwd": {"pallas": 6.0, "cudnn": 4.0, "xla": 60.0}}),
        entry("none", 4096, {"fwd": {"pallas": 1.5, "cudnn": 1.0}}),  # forward times only
        entry("none", 197, {"fwd_bwd": {"pallas": 1.6, "cudnn": 0.1}}, head_dim=64),
        entry("prefix", 2048, {"fwd_bwd": {"pallas": 3.2, "cudnn": 0.1, "xla": 13.0}}),
    ],
}


@pytest.fixture(autouse=True)
def fake_tables(tmp_path, monkeypatch):
    """Tables from tmp_path only, with the fake GPU's; caches and log-once state cleared."""
    monkeypatch.setattr(autotune, "TABLES_DIR", tmp_path)
    autotune.write_table(autotune.table_path("auto", FAKE_GPU), FAKE_TABLE)
    autotune._log_choice.cache_clear()
    yield tmp_path
    autotune._read.cache_clear()
    autotune._log_choice.cache_clear()


def call(mask="causal", seq=1024, head_dim=128, backend="gpu", kind=FAKE_GPU, kv_len=None):
    return AttentionCall(backend, kind, mask, seq, kv_len or seq, head_dim, "bfloat16")


@pytest.mark.parametrize(
    "key,want",
    [
        (call(seq=1024), "pallas"),
        (call(seq=8192), "cudnn"),
        (call("none", 4096), "cudnn"),  # a row with forward times only ranks by them
    ],
)
def test_fastest_supported_impl_is_chosen(key, want):
    assert resolve_impl("auto", key) == want


@pytest.mark.parametrize(
    "key",
    [
        call("prefix", 2048),  # cuDNN has no prefix-LM (only through a dense mask)
        call("none", 197, head_dim=64),  # cuDNN's backward rejects T=197
        call("causal", 8192, kv_len=8192 + 64),  # Tq != Tk causal: not cuDNN's alignment
    ],
)
def test_impl_that_does_not_support_the_call_is_never_chosen(key):
    assert "cudnn" not in supported_impls(key)
    assert resolve_impl("auto", key) == "pallas"


@pytest.mark.parametrize(
    "key,want",
    [
        (call(kind="Unknown GPU"), "pallas"),
        (call(backend="tpu", kind="TPU v9"), "pallas"),
        (call(head_dim=96), "pallas"),  # measured device, unmeasured head dim
        (call("segments"), "pallas"),  # unmeasured mask kind
        (call(backend="cpu", kind=FAKE_GPU), "xla"),  # CPU: XLA whatever a table says
        (call(backend="cpu", kind="cpu"), "xla"),
    ],
)
def test_unmeasured_device_or_shape_gets_the_fallback_rule(key, want):
    assert resolve_impl("auto", key) == want


@pytest.mark.parametrize(
    "seq,bucket",
    [(100, 1024), (1024, 1024), (2048, 1024), (2900, 8192), (4096, 8192), (10**6, 8192)],
)
def test_length_matches_the_nearest_bucket_on_a_log_scale(seq, bucket):
    times = autotune.measured_times(FAKE_TABLE, call(seq=seq))
    want = next(e for e in FAKE_TABLE["entries"] if e["seq"] == bucket and e["mask"] == "causal")
    assert times == want["ms"]["fwd_bwd"]


def test_choice_is_logged_once_per_key(caplog):
    caplog.set_level(logging.INFO, logger=autotune.__name__)
    for _ in range(3):
        resolve_impl("auto", call(seq=1024))
    resolve_impl("auto", call(seq=8192))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "pallas" in messages[0] and "'q_len': 1024" in messages[0]
    assert "cudnn" in messages[1] and "'q_len': 8192" in messages[1]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU rule")
def test_auto_on_cpu_is_xla_through_the_dispatcher(caplog):
    caplog.set_level(logging.INFO, logger=autotune.__name__)
    q = jax.random.normal(jax.random.key(0), (1, 16, 2, 8))
    mask = AttentionMask(causal=True)
    run = lambda impl: jax.jit(lambda q: attention(q, q, q, mask, impl=impl))(q)
    np.testing.assert_array_equal(run("auto"), run("xla"))
    assert [r.getMessage().split(" for ")[0] for r in caplog.records] == ["attention auto: xla"]


@pytest.mark.parametrize(
    "mask,kind",
    [
        (None, "none"),
        (AttentionMask(), "none"),
        (AttentionMask(causal=True), "causal"),
        (AttentionMask(causal=True, prefix_lengths=jnp.array([3])), "prefix"),
        (AttentionMask(causal=True, q_positions=jnp.arange(4)[None]), "positions"),
        (AttentionMask(kv_valid=jnp.ones((1, 4), bool)), "segments"),
    ],
)
def test_mask_kind(mask, kind):
    assert autotune.mask_kind(mask) == kind


@pytest.mark.parametrize(
    "kind,dim,ok", [("NVIDIA H100 80GB HBM3", 256, True), ("A100", 256, False)]
)
def test_cudnn_head_dim_limit_depends_on_the_chip(kind, dim, ok):
    assert ("cudnn" in supported_impls(call(head_dim=dim, kind=kind))) is ok


def test_bench_write_table_is_read_by_the_dispatcher(fake_tables):
    """A tiny real benchmark run on CPU (XLA and our kernel, interpreted), through the
    writer, back through the dispatcher's reader and choice."""
    bench = load_script("bench_attention")
    case = bench.Case("tiny_causal_32_d16", 1, 2, 32, 16, "causal")
    rows = [bench.run_one(case, impl, "fwd", jnp.float32, 1, False) for impl in ("xla", "ours")]
    path = bench.write_auto_table(f"{fake_tables / 'auto'}/", rows)
    kind = jax.devices()[0].device_kind
    assert path == autotune.table_path("auto", kind)
    (row,) = autotune.load_table("auto", kind)["entries"]
    times = row["ms"]["fwd"]
    assert row["seq"] == 32 and set(times) == {"xla", "pallas"}
    key = AttentionCall("gpu", kind, "causal", 32, 32, 16, "float32")  # as if kind were a GPU
    assert resolve_impl("auto", key) == min(times, key=times.get)


def test_default_block_sizes_read_the_tuned_table(fake_tables):
    blocks = {"block_q": 64, "block_k": 32, "num_warps": 2}
    table = {"device_kind": FAKE_GPU, "entries": [dict(head_dim=128, mask="causal", blocks=blocks)]}
    autotune.write_table(autotune.table_path("blocks", FAKE_GPU), table)
    tuned = flash.default_block_sizes(96, "causal", FAKE_GPU)  # 96 takes the 128 tiles
    assert (tuned.block_q, tuned.block_k, tuned.num_warps) == (64, 32, 2)
    assert tuned.block_q_bwd == flash.default_block_sizes(128).block_q_bwd  # untuned: default
    assert flash.default_block_sizes(128, "prefix", FAKE_GPU) == flash.default_block_sizes(128)
    assert flash.default_block_sizes(64, "causal", "Unknown") == flash.default_block_sizes(64)


def test_tuned_table_with_an_unknown_field_fails_naming_the_fields(fake_tables):
    table = {"entries": [dict(head_dim=64, mask="none", blocks={"block_m": 64})]}
    autotune.write_table(autotune.table_path("blocks", FAKE_GPU), table)
    with pytest.raises(ValueError, match=r"\['block_m'\] are not BlockSizes fields.*block_q"):
        flash.default_block_sizes(64, "none", FAKE_GPU)


def test_shipped_h100_table_names_its_source_and_picks_as_its_times_say():
    """cuDNN for long causal d128, ours for prefix-LM (cuDNN unsupported) and short causal."""
    kind = "NVIDIA H100 80GB HBM3"
    table = json.loads(autotune.table_path("auto", kind, SHIPPED_TABLES).read_text())
    assert table["device_kind"] == kind and "benchmarks/RESULTS.md" in table["source"]
    pick = lambda key: autotune.choose_impl(key, supported_impls(key), SHIPPED_TABLES)
    picks = [pick(call(mask, seq, kind=kind)) for mask, seq in [("causal", 8192), ("prefix", 8192)]]
    assert [*picks, pick(call("causal", 1024, kind=kind))] == ["cudnn", "pallas", "pallas"]


def test_tune_dry_run_enumerates_a_pruned_valid_grid():
    tune = load_script("tune_flash_gpu")
    summary = tune.main(["--dry-run"])
    kept = {}
    for dim, sizes in summary["candidates"].items():
        for mode, kept_of_all in sizes.items():
            kept[dim, mode], total = map(int, kept_of_all.split(" of "))
            assert 1 <= kept[dim, mode] <= total, (dim, mode)
    assert kept[256, "fwd"] < kept[64, "fwd"]  # wide heads: big tiles pruned


def test_tune_tiny_interpreted_sweep_writes_the_blocks_that_flash_reads(fake_tables):
    tune = load_script("tune_flash_gpu")
    argv = ["--tiny", "--masks", "causal", "--max-candidates", "1", "--iters", "1"]
    table = tune.main([*argv, "--out", f"{fake_tables / 'blocks'}/"])
    (entry,) = table["entries"]
    assert entry["tried"] == {"fwd": 1, "fwd_bwd": 1} and entry["failed"] == {
        "fwd": 0,
        "fwd_bwd": 0,
    }
    kind = jax.devices()[0].device_kind
    got = flash.default_block_sizes(entry["measured_head_dim"], "causal", kind)
    assert tune.dataclasses.asdict(got) == entry["blocks"]
