"""Config space fuzzing: random valid configs init and take a finite step; invalid configs and
CLI misuse fail before any compilation with a message naming the bad value."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_train import tiny_config

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

    def build_state(*args, **kwargs):
        raise AssertionError("reached build_state: the bad config was not rejected up front")

    monkeypatch.setattr(trainer, "build_state", build_state)


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
    config = tiny_config()
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


VALID = st.fixed_dictionaries(
    {
        "model.dtype": st.sampled_from(["float32", "bfloat16"]),
        "model.image.pool": st.sampled_from(["map", "gap", "cls"]),
        "model.image.posemb": st.sampled_from(["learn", "sincos2d"]),
        "model.image.stem": st.sampled_from(["patch", "conv"]),
        "model.image.patch_size": st.sampled_from(["4", "8"]),
        "model.text.pool": st.sampled_from(["last", "eos", "first", "mean", "map"]),
        "model.text.causal": st.sampled_from(["true", "false"]),
        "model.image.num_heads": st.sampled_from(["1", "2", "4"]),
        "loss.name": st.sampled_from(["sigmoid", "softmax"]),
        "model.remat": st.sampled_from(["true", "false"]),
    }
)


@pytest.mark.slow
@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(overrides=VALID)
def test_random_valid_config_inits_and_steps(overrides):
    """Init the task's model from a random valid config and take one loss+grad step: finite."""
    config = tiny_config(**overrides)
    mesh = sharding.build_mesh((1, 1, 1), jax.devices()[:1])
    task = TASKS.get(config.task)(config, mesh)
    rng = np.random.default_rng(0)
    shapes = task.dummy_batch(4)
    batch = {
        "image": rng.uniform(-1, 1, shapes["image"].shape).astype(np.float32),
        "tokens": rng.integers(1, 100, shapes["tokens"].shape).astype(np.int32),
    }
    with jax.set_mesh(mesh):
        params = jax.jit(lambda r: nn.unbox(task.init(r, batch))["params"])(jax.random.key(0))
        (loss, _), grads = jax.jit(task.value_and_grad)(params, batch, jax.random.key(1))
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
