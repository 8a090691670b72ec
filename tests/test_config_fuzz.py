"""Config space: every value of every key inits and trains every param; invalid configs and
CLI misuse fail before any compilation with a message naming the bad value."""

import functools
import json
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import tiny_contrastive_config

from vlm_jax import sharding
from vlm_jax.config import parse_cli
from vlm_jax.train import trainer
from vlm_jax.train.tasks import TASKS

# (overrides, pattern the error must match): each is wrong in one way the issue names.
INVALID = [
    ({"model.image.widht": "32"}, r"unknown config key 'model.image.widht'.*valid: .*width"),
    ({"train.batch_size": "sixteen"}, r"train.batch_size='sixteen'.*expected an int"),
    ({"train.async_checkpoint": "maybe"}, r"async_checkpoint='maybe'.*expected a bool"),
    ({"model.dtype": "float16"}, r"model.dtype='float16' is not one of: float32, bfloat16"),
    ({"model.attention_impl": "flash"}, r"attention_impl='flash' is not one of"),
    ({"task": "detection"}, r"task='detection' is not one of: .*contrastive"),
    ({"optim.schedule": "step"}, r"optim.schedule='step' is not one of: cosine"),
    ({"train.on_nonfinite": "ignore"}, r"train.on_nonfinite='ignore' is not one of: skip, stop"),
    ({"train.total_steps": "0"}, r"train.total_steps=0 must be a positive integer"),
    ({"mesh.shape": "(3, 1, 1)"}, r"mesh.shape=\(3, 1, 1\) has 3 devices but 8 are available"),
    ({"mesh.shape": "(-1, 3, 1)"}, r"mesh.shape=\(-1, 3, 1\): 8 devices are not divisible by 3"),
    ({"mesh.shape": "(8, 1)"}, r"mesh.shape=\(8, 1\) must have one size per axis"),
    ({"train.batch_size": "12"}, r"batch.*12.*8"),
    ({"data.on_error": "ignore"}, r"data.on_error='ignore' is not one of: skip, fail"),
    ({"data.long_captions": "drop"}, r"data.long_captions='drop' is not one of: truncate, bad"),
]


def no_compile(monkeypatch):
    """Fail the test if the trainer gets as far as building (compiling) the train state."""

    def state_layout(*args, **kwargs):
        raise AssertionError("reached state_layout: the bad config was not rejected up front")

    monkeypatch.setattr(trainer, "state_layout", state_layout)


@pytest.mark.parametrize(("overrides", "pattern"), INVALID, ids=[str(o) for o, _ in INVALID])
def test_invalid_config_fails_before_compile(overrides, pattern, tmp_path, monkeypatch):
    no_compile(monkeypatch)
    argv = ["--config", "configs/siglip_shapes.py", "--workdir", str(tmp_path)]
    argv += [f"--config.{k}={v}" for k, v in overrides.items()]
    with pytest.raises(ValueError, match=pattern):
        config, _ = parse_cli(argv)
        trainer.train(config, tmp_path / "run")


def test_workdir_of_another_experiment_is_refused(tmp_path, monkeypatch):
    no_compile(monkeypatch)
    config = tiny_contrastive_config()
    other = json.loads(trainer.to_json(config))
    other["seed"], other["model"]["embed_dim"] = 7, 64
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"different experiment.*embed_dim: 64.*vs 32.*seed: 7"):
        trainer.train(config, tmp_path)


@pytest.mark.parametrize(
    "argv",
    [["--workdir", "x"], ["--config", "configs/nope.py", "--workdir", "x"], ["stray"]],
    ids=["no-config", "missing-file", "positional"],
)
def test_cli_misuse_exits_2_with_usage(argv, capsys):
    from vlm_jax.train.cli import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(argv, "train")
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


# Every value of every key a user flips between experiments; the first is the base that each
# case starts from. The base text pool is "mean" because under "last" a depth-1 causal tower pools
# the one query that sees every key, so text.causal would not change the loss.
CHOICES = {
    "model.dtype": ["float32", "bfloat16"],
    "model.image.pool": ["gap", "map", "cls"],
    "model.image.posemb": ["learn", "sincos2d"],
    "model.image.stem": ["patch", "conv"],
    "model.image.patch_size": ["8", "4"],
    "model.image.num_heads": ["2", "1", "4"],
    "model.text.pool": ["mean", "last", "eos", "first", "map"],
    "model.text.causal": ["false", "true"],
    "loss.name": ["sigmoid", "softmax"],
    "model.remat": ["false", "true"],
}
BASE = {key: values[0] for key, values in CHOICES.items()}
ONE_AT_A_TIME = [()] + [((key, value),) for key, values in CHOICES.items() for value in values[1:]]

# Params whose gradient is zero in exact arithmetic, with why.
ZERO_GRADIENT = {
    # logits q.(k_j + b) = q.k_j + q.b: the bias shifts every key's logit by the same amount.
    r".*/attn/key/bias": "softmax over keys is invariant to the key bias",
}
# The softmax (CLIP) loss is shift invariant, so it drops the logit bias a SigLIP config learns.
SOFTMAX_ZERO_GRADIENT = {r"b": "softmax_loss ignores logit_bias"}


def compile_fast(fn):
    """jax.jit(fn) compiled without LLVM optimisation (same HLO, ~40% less compile time)."""

    def run(*args):
        lowered = jax.jit(fn).lower(*args)
        return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})(*args)

    return run


@functools.cache
def one_step(change: tuple[tuple[str, str], ...]) -> tuple[float, dict[str, float]]:
    """BASE with `change` applied: tiny init + one loss/grad step -> (loss, {path: max |grad|})."""
    config = tiny_contrastive_config(**(BASE | dict(change)))
    mesh = sharding.build_mesh((1, 1, 1), jax.devices()[:1])
    task = TASKS.get(config.task)(config, mesh)
    rng = np.random.default_rng(0)
    shapes = task.batch_spec(4)
    tokens = rng.integers(2, 100, shapes["tokens"].shape).astype(np.int32)
    for row, eos in enumerate([5, 9, 12, tokens.shape[1] - 1]):  # eos, then pads
        tokens[row, eos], tokens[row, eos + 1 :] = 1, 0
    batch = {
        "image": rng.uniform(-1, 1, shapes["image"].shape).astype(np.float32),
        "tokens": tokens,
    }
    with jax.set_mesh(mesh):
        # rbg keys: init compiles in a third of threefry's time; the values don't matter here.
        params = compile_fast(lambda r: nn.unbox(task.init(r, batch))["params"])(
            jax.random.key(0, impl="rbg")
        )
        (loss, _), grads = compile_fast(task.value_and_grad)(params, batch, jax.random.key(1))
    return float(loss), {
        jax.tree_util.keystr(path, simple=True, separator="/"): float(
            np.max(np.abs(np.asarray(grad, np.float32)))
        )
        for path, grad in jax.tree_util.tree_leaves_with_path(grads)
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "change", ONE_AT_A_TIME, ids=lambda c: ",".join(f"{k}={v}" for k, v in c) or "base"
)
def test_each_config_value_inits_and_trains_every_param(change):
    """Every value of every key, one at a time: a finite loss, the value reaches the model (the
    loss moves off the base's, except remat's, which must not), and every param gets a gradient
    (except those that provably get none, which must get none)."""
    loss, grad_max = one_step(change)
    assert np.isfinite(loss)
    assert all(np.isfinite(g) for g in grad_max.values()), grad_max
    if change:
        base_loss, _ = one_step(())
        if dict(change).get("model.remat") == "true":
            assert loss == pytest.approx(base_loss, rel=1e-6)
        else:
            assert loss != pytest.approx(base_loss, rel=1e-6), "the value did not reach the model"
    exceptions = dict(ZERO_GRADIENT)
    if (BASE | dict(change))["loss.name"] == "softmax":
        exceptions |= SOFTMAX_ZERO_GRADIENT
    # Rounding leaves an exact zero at ~1e-8 (float32) / ~2e-4 (bfloat16) of the largest gradient;
    # every other param here gets at least 2e-2 of it.
    rounding = 1e-3 * max(grad_max.values())
    for path, largest in grad_max.items():
        if any(re.fullmatch(pattern, path) for pattern in exceptions):
            assert largest <= rounding, f"{path}: expected zero gradient, got max |g| = {largest}"
        else:
            assert largest > rounding, f"{path} gets no gradient (max |g| = {largest})"
