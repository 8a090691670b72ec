"""The budget planner (vlm_jax.budget) against the compiled model: visual tokens exactly, the
prefill's FLOPs within 10% of XLA's count, the KV cache the prefill returns."""

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_vlm_config

from vlm_jax import budget, sharding
from vlm_jax.train.tasks.vlm import VLMTask
from vlm_jax.train.trainer import param_layout

# Wide enough that matmuls dominate the elementwise work XLA also counts.
WIDE = {"model.lm.width": "128", "model.lm.mlp_dim": "512", "model.lm.head_dim": "32"}
WIDE |= {"model.lm.num_heads": "4", "model.image.width": "128", "model.image.mlp_dim": "512"}


def compiled_prefill(config):
    """(visual tokens of the compiled encode_images, XLA's prefill FLOPs, its cache bytes)."""
    mesh = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    task = VLMTask(config, mesh)
    with jax.set_mesh(mesh):
        _, params, _ = param_layout(task, config, mesh)
    spec = task.batch_spec(1)
    inputs = [jnp.zeros(spec[k].shape, spec[k].dtype) for k in ("image", "tokens", "prefix_len")]
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)

    def run(method, *extra):
        fn = lambda p, *a: task.model.apply({"params": p}, *a, *extra, method=method)
        return jax.jit(fn).lower(params, *inputs).compile()

    visual = run("encode_images").out_info  # float[1, K, M, D]
    prefill = run("prefill", config.eval.max_new_tokens)
    _, cache, _ = prefill.out_info
    cache_bytes = sum(x.size * x.dtype.itemsize for x in (*cache.keys, *cache.values))
    return visual.shape[1] * visual.shape[2], prefill.cost_analysis()["flops"], cache_bytes


@pytest.mark.parametrize("connector", ["mlp", "pool"])
def test_the_plan_matches_the_compiled_model(connector):
    config = tiny_vlm_config(**WIDE, **{"model.connector.name": connector})
    rows = budget.budget_rows(config, [24, 32])
    assert [row["image_size"] for row in rows] == [16, 24, 32]
    for row in rows:
        at_size = budget.at_image_size(config, row["image_size"])
        tokens, flops, cache_bytes = compiled_prefill(at_size)
        assert row["visual_tokens"] == tokens
        assert row["prefill_flops"] == pytest.approx(flops, rel=0.10), (row, flops)
        assert row["kv_cache_bytes"] == cache_bytes
    own, larger = rows[0], rows[2]
    assert own["fits"] and own["text_budget"] == config.tokenizer.max_len
    assert not larger["fits"]
    more_tokens = larger["visual_tokens"] - own["visual_tokens"]  # early fusion: 1 image each
    assert larger["lm_seq_len"] - own["lm_seq_len"] == more_tokens


def test_the_cli_prints_a_row_per_size_and_names_bad_flags(capsys):
    argv = ["--config", "configs/vlm_shapes.py", "--image_sizes", "48", "--context", "400"]
    budget.main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[-3:]] == ["image_size", "32", "48"]
    assert lines[-1].split()[-2:] == ["True", str(400 - 167 + 24)]
    with pytest.raises(SystemExit):
        budget.main(["--config", "configs/vlm_shapes.py", "--image_size", "48"])
    assert "unknown flag(s) ['image_size']" in capsys.readouterr().err
