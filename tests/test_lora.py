"""LoRA (optim.lora, vlm_jax/models/lora.py): the adapted model equals the base at init, merged
equals unmerged after training, only the adapters (and optim.lora.train) train and hold
optimizer state, frozen params stay bit-identical, a LoRA run resumes exactly, bad config fails
naming the value."""

import json
import re
import shutil
import types

import flax.linen as nn
import jax
import numpy as np
import pytest
from compile_cache import compilation_cache  # noqa: F401 (autouse: compiles go through the cache)
from conftest import tiny_lm_config, tiny_vlm_config

from vlm_jax import sharding
from vlm_jax.checkpoint import Checkpointer, load_params
from vlm_jax.config import ConfigError
from vlm_jax.generate import generate, generate_from_run, load_run
from vlm_jax.models import lora
from vlm_jax.models.layers import Encoder
from vlm_jax.schema import resolve
from vlm_jax.train.optim import frozen_mask
from vlm_jax.train.tasks.lm import LMTask
from vlm_jax.train.tasks.vlm import VLMTask
from vlm_jax.train.trainer import (
    batch_contract,
    build_state,
    evaluate_checkpoint,
    init_params,
    load_init_params,
    make_train_step,
    param_layout,
    train,
)
from vlm_jax.train.validate import validate_config
from vlm_jax.trees import leaf_paths

# The LM's attention and MLP kernels (both tasks: "blocks_0/..." in the LM, "lm/blocks_0/..."
# in the VLM), and in the VLM the connector trained in full: the LLaVA LoRA recipe.
LM_KERNELS = r".*blocks_\d+/(attn|mlp)/[a-z]+/kernel"
LORA = {"optim.lora.rank": "4", "optim.lora.alpha": "8.0", "optim.lora.targets": LM_KERNELS}
VLM_LORA = {**LORA, "optim.lora.train": "connector/.*", "optim.lr": "1e-2"}


def lora_config(config, **changes):
    """config's optim.lora section with `changes`."""
    section = lora.lora_section(config.optim)
    return resolve("optim.lora", {**section.to_dict(), **changes}, lora.LORA)


def trees_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def model_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


# -- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key,value,message",
    [
        ("optim.lora.rank", "-1", "optim.lora.rank=-1: expected >= 0"),
        ("optim.lora.dropout", "1.0", "optim.lora.dropout=1.0: expected a rate in [0, 1)"),
        ("optim.lora.alpha", "0.0", "optim.lora.alpha=0.0: expected > 0"),
        ("optim.lora.targets", "lm/(", "optim.lora.targets='lm/(': expected a valid regular"),
        ("optim.lora.train", "conn(", "optim.lora.train=('conn(',): expected a tuple of valid"),
    ],
)
def test_bad_lora_values_fail_naming_them(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(tiny_lm_config(**{**LORA, key: value}))


def test_rank_without_targets_fails():
    config = tiny_lm_config(**{"optim.lora.rank": "4"})
    with pytest.raises(ConfigError, match=r"optim.lora.rank=4 needs optim.lora.targets"):
        validate_config(config)


@pytest.mark.parametrize("targets", ["lm/.*/kernel", "vision/embedding/conv/kernel"])
def test_targets_matching_no_adaptable_kernel_fail_naming_the_kernels(targets):
    """The LM task's kernels have no "lm/" prefix; a conv kernel is not a dense layer's."""
    lm = targets.startswith("lm")
    task_cls, make_config = (LMTask, tiny_lm_config) if lm else (VLMTask, tiny_vlm_config)
    config = make_config(**{**LORA, "optim.lora.targets": targets})
    mesh = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"matches no kernel of a LoRA-adaptable layer") as e:
        param_layout(task_cls(config, mesh), config, mesh)
    assert "blocks_0/attn/query/kernel" in str(e.value)


# -- merging: a scanned stack (kernels stacked on a leading layers axis) ------------------------
def test_merged_equals_unmerged_on_a_scanned_stack_of_heads_dense_and_dense():
    config = resolve("optim.lora", {"rank": 3, "targets": ".*(query|out|fc1)/kernel"}, lora.LORA)
    encoder = Encoder(depth=3, num_heads=2, mlp_dim=24, scan=True, attention_impl="xla")
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
    with lora.adapted(config):
        params = nn.unbox(jax.jit(encoder.init)(jax.random.key(1), x)["params"])
    base, adapters = lora.split_adapters(params)
    assert adapters["blocks"]["attn"]["out"]["lora_a"].shape == (3, 2, 4, 3)  # [L, H, hd, r]
    assert adapters["blocks"]["attn"]["out"]["lora_b"].shape == (3, 3, 8)  # [L, r, D]
    # one jitted function each, traced with and without the adapters in the forward pass
    with_adapters, plain = (jax.jit(lambda p: encoder.apply({"params": p}, x)) for _ in range(2))
    with lora.adapted(config):
        at_init = with_adapters(params)
    np.testing.assert_array_equal(at_init, plain(base))  # B = 0: the base model exactly
    # Nonzero B (as after training), each layer's its own
    rng = np.random.default_rng(2)
    adapters = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32), adapters)
    params = lora.join_adapters(base, adapters)
    with lora.adapted(config):
        unmerged = with_adapters(params)
    assert not np.allclose(unmerged, plain(base), atol=1e-2)
    np.testing.assert_allclose(plain(lora.merge_lora(base, adapters, config)), unmerged, atol=1e-5)
    assert trees_equal(lora.merged(params, config), lora.merge_lora(base, adapters, config))


# -- the VLM recipe: LoRA on the LM, connector trained, vision tower frozen ---------------------
def vlm_logits(task, params, batch, config=None, train=False, rng=None):
    """The VLM's logits; `config` given: with its adapters in the forward pass."""
    inputs = task.model_inputs(batch)
    rngs = {"dropout": rng} if rng is not None else {}
    apply = lambda: task.model.apply({"params": params}, **inputs, train=train, rngs=rngs)
    if config is None:
        return apply()
    with lora.adapted(config, train=train):
        return apply()


@pytest.fixture(scope="module")
def vlm():
    """A tiny stage-2 VLM with LoRA on an FSDP mesh: its init and 4 train steps."""
    config = tiny_vlm_config("stage2", **VLM_LORA)
    mesh = sharding.build_mesh((4, 2, 1))
    task = VLMTask(config, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(config.sharding.rules)):
        state, shardings, tx, schedule = build_state(task, config, mesh)
        init = jax.device_get(state.params)
        contract = batch_contract(task, config, mesh)
        step = make_train_step(task, tx, schedule, shardings, contract.shardings(mesh), mesh)
        data = iter(task.train_data(config.train.batch_size, 0, 1, config.seed))
        batches = [
            sharding.global_batch(contract.model_batch(next(data)), mesh, contract.batch_size)
            for _ in range(4)
        ]
        opt_state = state.opt_state
        losses = []
        for batch in batches:
            state, metrics = step(state, batch)
            losses.append(float(metrics["train/loss"]))
    trained = jax.device_get(state.params)
    batch = jax.device_get(batches[0])
    return dict(config=config, task=task, init=init, opt_state=opt_state, trained=trained) | dict(
        batch=batch, losses=losses
    )


def test_vlm_at_init_equals_the_base_model_exactly(vlm):
    task, config, params = vlm["task"], vlm["config"], vlm["init"]
    base, adapters = lora.split_adapters(params)
    # the adapters sit beside the LM's attention and MLP kernels only, their B = 0
    layers = ("attn/key", "attn/out", "attn/query", "attn/value", "mlp/down", "mlp/gate", "mlp/up")
    want = [f"lm/blocks_{i}/{layer}/lora_{ab}" for i in range(2) for layer in layers for ab in "ab"]
    assert leaf_paths(adapters) == want
    b_leaves = [x for p, x in zip(want, jax.tree.leaves(adapters)) if p.endswith("lora_b")]
    assert len(b_leaves) == 14 and not any(np.any(b) for b in b_leaves)
    batch = vlm["batch"]
    got = vlm_logits(task, params, batch, lora.lora_section(config.optim))
    np.testing.assert_array_equal(got, vlm_logits(task, base, batch))
    dropped, rng = lora_config(config, dropout=0.5), jax.random.key(0)  # B = 0: even so
    got = vlm_logits(task, params, batch, dropped, train=True, rng=rng)
    np.testing.assert_array_equal(got, vlm_logits(task, base, batch, train=True, rng=rng))


def test_vlm_optimizer_state_holds_only_the_adapters_and_the_connector(vlm):
    params, opt_state = vlm["init"], vlm["opt_state"]
    trained = jax.tree.leaves(params["connector"]) + jax.tree.leaves(lora.split_adapters(params)[1])
    assert len(trained) == 4 + 2 * 14
    frozen = jax.tree.leaves(frozen_mask(params, vlm["config"].optim))
    assert sum(not f for f in frozen) == len(trained)
    # AdamW: a first and a second moment per trained param, and the step counts (scalars);
    # nothing for the frozen params (a full stage 2 would hold 2 x the whole LM and connector)
    arrays = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
    assert len(arrays) == 2 * len(trained)
    assert model_bytes(arrays) == 2 * model_bytes(trained)


def test_vlm_training_moves_only_adapters_and_connector_and_loss_falls(vlm):
    init, trained = vlm["init"], vlm["trained"]
    losses = vlm["losses"]
    assert losses[-1] < losses[0] - 0.1, losses
    frozen = frozen_mask(init, vlm["config"].optim)
    befores = jax.tree_util.tree_flatten_with_path(init)[0]
    for (path, before), after, is_frozen in zip(
        befores, jax.tree.leaves(trained), jax.tree.leaves(frozen)
    ):
        name = jax.tree_util.keystr(path)
        if is_frozen:
            np.testing.assert_array_equal(after, before, err_msg=name)  # bit-identical
        elif not name.endswith("['lora_a']"):  # A moves only once B is nonzero (step 1: dA = 0)
            assert not np.array_equal(after, before), name


def test_vlm_merged_equals_unmerged_after_training_and_dropout_acts_in_training_only(vlm):
    task, config, params, batch = vlm["task"], vlm["config"], vlm["trained"], vlm["batch"]
    section = lora.lora_section(config.optim)
    assert section.dropout == 0.0
    merged = lora.merged(params, section)
    unmerged = vlm_logits(task, params, batch, section)
    base = vlm_logits(task, lora.split_adapters(params)[0], batch)
    assert np.abs(unmerged - base).max() > 1e-2  # the adapters changed the model
    np.testing.assert_allclose(vlm_logits(task, merged, batch), unmerged, atol=1e-5, rtol=1e-5)
    # Dropout on the adapters' input: train-mode outputs change, eval-mode ones do not.
    dropped, rng = lora_config(config, dropout=0.5), jax.random.key(7)
    train_plain = vlm_logits(task, params, batch, section, train=True, rng=rng)
    train_dropped = vlm_logits(task, params, batch, dropped, train=True, rng=rng)
    assert np.abs(train_dropped - train_plain).max() > 1e-3
    np.testing.assert_array_equal(vlm_logits(task, params, batch, dropped), unmerged)


# -- the LM task end to end: a LoRA run resumes exactly like any other --------------------------
def config_overrides() -> dict[str, str]:
    """The LoRA LM run: dropout on the adapters (so resume must restore its RNG), FSDP mesh."""
    run = {"train.total_steps": "6", "train.checkpoint_every": "3", "mesh.shape": "4,2,1"}
    return {**LORA, **run, "optim.lora.dropout": "0.1", "optim.lr": "1e-2"}


def read_rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


@pytest.mark.slow
def test_lora_lm_run_resumes_exactly_and_keeps_the_base_frozen(tmp_path):
    config = tiny_lm_config(**config_overrides())
    full = tmp_path / "full"
    train(config, full)
    rows = read_rows(full)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]

    stopped = tmp_path / "stopped"  # a run stopped after step 3, relaunched
    shutil.copytree(full, stopped)
    shutil.rmtree(stopped / "checkpoints" / "6")
    train(config, stopped)
    assert read_rows(stopped) == rows
    final = load_params(full)
    assert trees_equal(load_params(stopped), final)

    # The checkpoint holds the adapters; its base params are, bit for bit, the init of the same
    # config without LoRA (the adapters take no init randomness from them).
    plain = tiny_lm_config(**{k: v for k, v in config_overrides().items() if "lora" not in k})
    mesh = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        init, _ = init_params(LMTask(plain, mesh), plain, mesh)
    base, adapters = lora.split_adapters(final)
    assert trees_equal(base, jax.device_get(init))
    assert len(jax.tree.leaves(adapters)) == 2 * 14
    # init.checkpoint of a run without adapters (a pretrained LM) loads the base params into a
    # LoRA run and keeps its fresh adapters
    ckpt = Checkpointer(tmp_path / "plain" / "checkpoints", async_save=False)
    ckpt.save(1, {"params": init}, None, {"step": 1}, force=True)
    ckpt.close()
    state = types.SimpleNamespace(params=final)
    shardings = types.SimpleNamespace(params=jax.tree.map(lambda x: x.sharding, final))
    loaded = load_init_params(str(tmp_path / "plain"), state, shardings)
    assert trees_equal(jax.device_get(loaded), lora.join_adapters(jax.device_get(init), adapters))
    # Evaluation sees the merged model: the checkpoint evaluates to the run's last row.
    results = evaluate_checkpoint(config, full)
    assert results["eval/loss"] == pytest.approx(rows[-1]["eval/loss"], rel=1e-6)
    # Generation (python -m vlm_jax.generate) continues with the merged model, not the base.
    section = lora.lora_section(config.optim)
    _, tokenizer, model, _ = load_run(str(full))
    prompt = np.asarray([[2, 3, 4, 5]], np.int32)
    merged_params, base_params = lora.merged(final, section), lora.split_adapters(final)[0]
    merged_logits, _ = model.apply({"params": merged_params}, prompt)
    base_logits, _ = model.apply({"params": base_params}, prompt)
    assert not np.allclose(merged_logits, base_logits, atol=1e-4)  # the adapters matter
    ids, _ = generate_from_run(str(full), prompt_ids=prompt[0].tolist(), max_new_tokens=6)
    expected = generate(
        model,
        {"params": merged_params},
        np.zeros((1, 0), np.float32),
        prompt,
        np.asarray([4], np.int32),
        max_new_tokens=6,
        eos_id=tokenizer.stop_ids(),
        pad_id=tokenizer.pad_id,
        vocab_size=tokenizer.vocab_size,
    )
    stops = [n + 1 for n, i in enumerate(expected[0].tolist()) if i in tokenizer.stop_ids()]
    assert ids == expected[0].tolist()[: stops[0] if stops else 6]
