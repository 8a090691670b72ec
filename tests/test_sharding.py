"""Sharded training equals one-device training; params and optimizer state are laid out as
the rule table says; initialisation writes straight into the shards."""

import functools
import math

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from conftest import shipped_config
from jax.sharding import PartitionSpec as P

from vlm_jax import sharding
from vlm_jax.train import trainer
from vlm_jax.train.distributed import ConcatShards, data_shard_plan, train_iterator
from vlm_jax.train.tasks import TASKS

# A tiny SigLIP two-tower model whose widths, heads, MLP and vocab divide by 8, so any mesh
# axis can split them (heads of width 4); the data loads in the main process.
TINY = {
    "data.image_size": "16",
    "model.image.image_size": "16",
    "model.image.patch_size": "4",
    "model.image.width": "32",
    "model.image.depth": "1",
    "model.image.num_heads": "8",
    "model.image.mlp_dim": "64",
    "model.text.width": "32",
    "model.text.depth": "1",
    "model.text.num_heads": "8",
    "model.text.mlp_dim": "64",
    "model.embed_dim": "32",
    "train.batch_size": "16",
    "train.total_steps": "3",
    "optim.warmup_steps": "1",
    "eval.tasks": "()",
    "train.worker_count": "0",
}
STEPS = 3
MESHES = [(8, 1, 1), (2, 2, 2), (1, 8, 1), (1, 1, 8)]


def tiny_config(mesh_shape, **overrides):
    overrides = {**TINY, "mesh.shape": str(tuple(mesh_shape)), **overrides}
    return shipped_config("configs/siglip_shapes.py", overrides)


def make_mesh(mesh_shape):
    return sharding.build_mesh(mesh_shape, jax.devices()[: math.prod(mesh_shape)])


@functools.cache
def train_steps(mesh_shape):
    """STEPS steps of the trainer's jitted step on `mesh_shape` -> (metrics, state, optimizer)."""
    config = tiny_config(mesh_shape)
    mesh = make_mesh(mesh_shape)
    task = TASKS.get(config.task)(config, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(config.sharding.rules)):
        state, state_shardings, tx, schedule = trainer.build_state(task, config, mesh)
        contract = trainer.batch_contract(task, config, mesh)
        shardings = contract.shardings(mesh)
        step = trainer.make_train_step(task, tx, schedule, state_shardings, shardings, mesh)
        data = train_iterator(task, config, mesh)
        metrics = []
        for _ in range(STEPS):
            local = contract.model_batch(next(data))
            batch = sharding.global_batch(local, mesh, config.train.batch_size)
            state, step_metrics = step(state, batch)
            metrics.append(jax.device_get(step_metrics))
    return metrics, state, tx


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
def test_sharded_training_matches_one_device(mesh_shape):
    ref_metrics, ref_state, _ = train_steps((1, 1, 1))
    metrics, state, _ = train_steps(mesh_shape)
    for name in ("train/loss", "train/grad_norm"):
        np.testing.assert_allclose(
            [m[name] for m in metrics], [m[name] for m in ref_metrics], rtol=1e-5, err_msg=name
        )
    assert ref_metrics[-1]["train/loss"] != ref_metrics[0]["train/loss"]  # it trained
    assert_close_except_key_bias(state.params, ref_state.params)
    assert_close_except_key_bias(state.opt_state, ref_state.opt_state)


def assert_close_except_key_bias(actual, desired) -> None:
    """Leaves equal to float32 tolerance, bar attention key biases: their exact gradient is zero
    (softmax ignores a per-query constant), so Adam turns rounding noise into +-lr steps."""
    flat_desired = dict(jax.tree.leaves_with_path(desired))
    for path, value in jax.tree.leaves_with_path(actual):
        name = jax.tree_util.keystr(path)
        if "['key']['bias']" not in name:
            np.testing.assert_allclose(value, flat_desired[path], 1e-5, 1e-5, err_msg=name)


def leaf(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


# Weight path -> the spec the default rules give (embed -> fsdp; mlp, heads, vocab -> tensor).
EXPECTED_SPECS = {
    "img/encoder/block_0/mlp/fc1/kernel": P("fsdp", "tensor"),  # [embed, mlp]
    "img/encoder/block_0/mlp/fc2/kernel": P("tensor", "fsdp"),  # [mlp, embed]
    "img/encoder/block_0/attn/query/kernel": P("fsdp", "tensor", None),  # [embed, heads, hd]
    "img/encoder/block_0/attn/out/kernel": P("tensor", None, "fsdp"),  # [heads, hd, embed]
    "img/encoder/block_0/ln_attn/scale": P("fsdp"),
    "txt/encoder/block_0/attn/key/kernel": P("fsdp", "tensor", None),  # [embed, kv_heads, hd]
    "txt/embedding/embedding": P("tensor", "fsdp"),  # [vocab, embed]
}


def test_params_and_optimizer_state_are_sharded_as_the_rules_say():
    """After training on a (2, 2, 2) mesh (data 2, fsdp 2, tensor 2)."""
    _, state, tx = train_steps((2, 2, 2))
    params = state.params
    paths = {"/".join(str(k.key) for k in path) for path, _ in jax.tree.leaves_with_path(params)}
    assert set(EXPECTED_SPECS) <= paths, sorted(paths)
    for path, spec in EXPECTED_SPECS.items():
        array = leaf(params, path)
        assert array.sharding.spec == spec, (path, array.sharding.spec)
        mesh_sizes = array.sharding.mesh.shape
        expected = tuple(
            dim // (mesh_sizes[axis] if axis else 1)
            for dim, axis in zip(array.shape, (*spec, *[None] * array.ndim))
        )
        assert array.sharding.shard_shape(array.shape) == expected, path
    fc1 = leaf(params, "img/encoder/block_0/mlp/fc1/kernel")
    assert fc1.sharding.shard_shape(fc1.shape) == (32 // 2, 64 // 2)
    # Adam's moments (mu and nu) shard exactly like their params.
    pairs = []
    optax.tree_map_params(
        tx,
        lambda moment, p: pairs.append((moment, p)),
        state.opt_state,
        params,
        transform_non_params=lambda x: x,
    )
    assert len(pairs) == 2 * len(jax.tree.leaves(params))
    for moment, param in pairs:
        assert moment.sharding == param.sharding, (moment.sharding, param.sharding)
    # No device holds all the weights: each holds between 1/4 (fsdp x tensor) and 1/2.
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    per_device = sharding.bytes_per_device(params)
    assert len(per_device) == 8
    assert total / 4 <= max(per_device.values()) < total / 2


def test_init_computes_only_each_devices_shards():
    """The init jit's outputs have the rule shardings, and its per-device memory (outputs plus
    temporaries) is below one full copy of the weights: no device ever holds them all."""
    mesh_shape = (1, 8, 1)
    config = tiny_config(mesh_shape)
    mesh = make_mesh(mesh_shape)
    task = TASKS.get(config.task)(config, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(config.sharding.rules)):
        _, abstract, shardings = trainer.param_layout(task, config, mesh)
        init, _ = trainer.sharded_init(task, config, mesh)
        compiled = init.lower(jax.random.key(config.seed)).compile()
    for out, expected, x in zip(
        jax.tree.leaves(compiled.output_shardings),
        jax.tree.leaves(shardings),
        jax.tree.leaves(abstract),
    ):
        assert out.is_equivalent_to(expected, x.ndim)
    leaves = jax.tree.leaves(abstract)
    nbytes = lambda shape: math.prod(shape) * 4
    total = sum(nbytes(x.shape) for x in leaves)
    per_device = sum(nbytes(x.sharding.shard_shape(x.shape)) for x in leaves)
    memory = compiled.memory_analysis()
    assert per_device <= memory.output_size_in_bytes < total / 4
    assert memory.output_size_in_bytes + memory.temp_size_in_bytes < total


def test_data_shards_tile_the_global_batch():
    mesh = make_mesh((8, 1, 1))  # one process holds every row
    assert data_shard_plan(mesh, 16) == ([0], 1, 16)
    assert data_shard_plan(mesh, 16, 4) == ([0, 1, 2, 3], 4, 4)
    with pytest.raises(ValueError, match="data_shards=3"):
        data_shard_plan(mesh, 16, 3)
    with pytest.raises(ValueError, match="batch size 12 is not divisible"):
        data_shard_plan(mesh, 12)


def test_non_contiguous_rows_load_their_shards_in_order(monkeypatch):
    """A pod host whose chips sit at several places of the batch (tests/test_compile_tpu.py
    finds them on a real v5p-64 layout): it loads the data shards of exactly its rows, in
    their order, and its local batch is those rows concatenated."""
    rows = sharding.BatchRows(((0, 4), (8, 12)))
    monkeypatch.setattr(sharding, "process_batch_rows", lambda mesh, batch: rows)
    mesh = make_mesh((8, 1, 1))
    assert data_shard_plan(mesh, 16) == ([0, 2], 4, 4)
    assert data_shard_plan(mesh, 16, 8) == ([0, 1, 4, 5], 8, 2)
    with pytest.raises(ValueError, match=r"tile this process's rows \[0, 4\), \[8, 12\)"):
        data_shard_plan(mesh, 16, 2)
    assert rows.count == 8 and rows.start == 0
    np.testing.assert_array_equal(rows.take(np.arange(16)), [0, 1, 2, 3, 8, 9, 10, 11])


def test_batch_that_the_mesh_cannot_split_fails_before_compute(tmp_path):
    config = tiny_config((8, 1, 1), **{"train.batch_size": "12"})
    with pytest.raises(ValueError, match=r"batch size 12 is not divisible by .* size 8"):
        trainer.train(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_shards_concatenate_and_resume_exactly():
    """Two shard streams in one process: the rows two processes would load, checkpointable."""
    config = tiny_config((8, 1, 1), **{"train.data_shards": "2"})
    task = TASKS.get(config.task)(config, make_mesh((8, 1, 1)))
    data = train_iterator(task, config, task.mesh)
    assert isinstance(data, ConcatShards)
    first = next(data)
    halves = [next(iter(task.train_data(8, s, 2, config.seed))) for s in range(2)]
    for key in ("image", "tokens", "id"):
        np.testing.assert_array_equal(first[key], np.concatenate([h[key] for h in halves]))
    state = data.get_state()
    expected = next(data)
    resumed = train_iterator(task, config, task.mesh)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["id"], expected["id"])


def test_weights_the_mesh_cannot_split_are_named_before_compute():
    config = tiny_config((1, 1, 8), **{"model.text.num_heads": "4"})
    mesh = make_mesh((1, 1, 8))
    task = TASKS.get(config.task)(config, mesh)
    rules = nn.logical_axis_rules(tuple(config.sharding.rules))
    error = r"\['txt'\].*\['attn'\].*\(size 4\) is split over mesh axes \('tensor',\) = 8 ways"
    with jax.set_mesh(mesh), rules, pytest.raises(ValueError, match=error):
        trainer.param_layout(task, config, mesh)


def test_one_slice_mesh_is_unchanged_and_multi_slice_splits_only_the_data_axis():
    assert sharding.num_slices(jax.devices()) == 1  # CPU devices have no slice_index
    assert sharding.build_mesh((-1, 2, 1)).devices.shape == (4, 2, 1)
    assert sharding.split_dcn((8, 2, 1), 4) == ((2, 2, 1), (4, 1, 1))
    with pytest.raises(ValueError, match=r"data axis \(2\) must be a multiple of the 4 slices"):
        sharding.split_dcn((2, 8, 1), 4)
