"""Non-finite guard: a NaN/Inf loss or gradient never reaches the params, per train.on_nonfinite."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compile_cache import compilation_cache  # noqa: F401 (autouse: compiles go through the cache)
from conftest import tiny_contrastive_config as tiny_config
from test_train import final_params, numeric, read_rows

from vlm_jax import sharding
from vlm_jax.checkpoint import Checkpointer
from vlm_jax.data import pipeline
from vlm_jax.train import numerics, trainer
from vlm_jax.train.state import TrainState
from vlm_jax.train.validate import validate_config
from vlm_jax.trees import leaf_paths


def tiny_state():
    params = {"enc": {"kernel": jnp.ones((3, 2))}, "head": {"bias": jnp.zeros((2,))}}
    tx = optax.adam(0.1)
    rng = jax.random.key_data(jax.random.key(0))
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=rng), tx


def guarded_step(scale, dtype=jnp.float32):
    """One adam step on loss = scale * sum(x**2) computed in `dtype` -> (state, outputs)."""
    state, tx = tiny_state()

    def loss_fn(params):
        leaves = [jnp.sum(jnp.square(p.astype(dtype))) for p in jax.tree.leaves(params)]
        return (jnp.asarray(scale, dtype) * sum(leaves)).astype(jnp.float32)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    return state, jax.jit(numerics.guard)(state, new, loss, grads)


def test_finite_step_is_applied():
    old, (state, out) = guarded_step(1.0)
    assert float(out[numerics.FLAG]) == 0.0 and not np.any(out[numerics.LEAVES])
    assert not np.allclose(state.params["enc"]["kernel"], old.params["enc"]["kernel"])
    assert int(state.step) == 1


@pytest.mark.parametrize(
    ("scale", "dtype"),
    [(np.nan, jnp.float32), (np.inf, jnp.float32), (1e38, jnp.bfloat16)],
    ids=["nan", "inf", "bf16-overflow"],
)
def test_nonfinite_step_keeps_params_and_opt_state(scale, dtype):
    old, (state, out) = guarded_step(scale, dtype)
    assert float(out[numerics.FLAG]) == 1.0
    for a, b in zip(jax.tree.leaves(old.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(old.opt_state), jax.tree.leaves(state.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 1  # the data stream and RNG still advance


def test_leaf_flags_name_the_offending_params():
    grads = {"enc": {"kernel": jnp.ones((2,))}, "head": {"bias": jnp.array([1.0, np.nan])}}
    paths = leaf_paths(grads)
    flags = np.asarray(numerics.nonfinite_leaves(grads))
    assert [p for p, f in zip(paths, flags, strict=True) if f] == ["head/bias"]


def test_invalid_policy_is_rejected_before_compute():
    config = tiny_config()
    with config.unlocked():
        config.train.on_nonfinite = "ignore"
    with pytest.raises(ValueError, match=r"train.on_nonfinite.*'ignore'.*skip.*stop"):
        validate_config(config)


def poison_batch(monkeypatch, at_call: int):
    """Make the images of the `at_call`-th global batch NaN (a corrupt batch)."""
    real = sharding.global_batch
    calls = []

    def global_batch(batch, mesh, batch_size):
        calls.append(1)
        if len(calls) == at_call:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return real(batch, mesh, batch_size)

    monkeypatch.setattr(trainer.sharding, "global_batch", global_batch)


def plant_bad_images(monkeypatch, every: int) -> None:
    """Train records whose index is a multiple of `every` get a float image (bad_image)."""
    real = pipeline.build_source

    class Planted:
        def __init__(self, source):
            self.source = source

        def __len__(self):
            return len(self.source)

        def __getitem__(self, index):
            record = self.source[index]
            if index % every == 0:
                return dict(record, image=record["image"].astype(np.float32))
            return record

    def build_source(data, split):
        source = real(data, split)
        return Planted(source) if split == "train" else source

    monkeypatch.setattr(pipeline, "build_source", build_source)


@pytest.mark.slow
def test_skip_policy_counts_the_bad_update_and_a_resume_carries_the_counts(tmp_path, monkeypatch):
    """Step 3's batch is NaN, every 5th train record has a bad image and most captions are
    cut (tokenizer.max_len 6). A run stopped after step 3's checkpoint and relaunched logs the
    same rows, these counts included, as one that was never stopped."""
    poison_batch(monkeypatch, at_call=3)  # counts on across runs: the relaunch is not hit
    plant_bad_images(monkeypatch, every=5)
    config = tiny_config(
        **{"train.total_steps": "4", "train.log_every": "1", "train.checkpoint_every": "3"},
        **{"train.eval_every": "0", "train.on_nonfinite": "skip", "train.worker_count": "0"},
        **{"tokenizer.max_len": "6", "model.text.max_len": "6", "eval.tasks": ""},
    )
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    trainer.train(config, full)
    rows = read_rows(full)
    counters = ("train/nonfinite_skipped", "data/bad_records", "data/truncated_captions")
    counts = np.asarray([[r[k] for k in counters] for r in rows])  # [step, counter]
    assert counts[:, 0].tolist() == [0, 0, 1, 1]
    assert np.all(counts[2, 1:] > 0) and np.all(np.diff(counts, axis=0) >= 0)
    assert rows[2]["train/loss"] == "nan" and np.isfinite(rows[3]["train/loss"])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final_params(full, 4)))

    shutil.copytree(full, stopped)
    shutil.rmtree(stopped / "checkpoints" / "4")
    trainer.train(config, stopped)  # resumes at step 3, with the counts of its meta
    assert [numeric(r) for r in read_rows(stopped)] == [numeric(r) for r in rows]
    a, b = final_params(full, 4), final_params(stopped, 4)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


@pytest.mark.slow
def test_stop_policy_saves_last_good_state_and_names_params(tmp_path, monkeypatch):
    poison_batch(monkeypatch, at_call=3)
    config = tiny_config(
        **{"train.total_steps": "4", "train.log_every": "1", "train.checkpoint_every": "2"},
        **{"train.eval_every": "0", "train.on_nonfinite": "stop"},
    )
    with pytest.raises(numerics.NonFiniteError, match=r"step 3.*img/") as info:
        trainer.train(config, tmp_path)
    assert "checkpoint step 3" in str(info.value)
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    assert ckpt.all_steps() == [2, 3]
    ckpt.close()
    for a, b in zip(
        jax.tree.leaves(final_params(tmp_path, 2)),
        jax.tree.leaves(final_params(tmp_path, 3)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)  # the bad step changed nothing
