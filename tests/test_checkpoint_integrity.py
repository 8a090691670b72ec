"""Checkpoint integrity: a checkpoint of another model config fails naming the mismatched
parameters; a damaged or cut-off newest step is detected, logged and skipped on resume, and
when another run's params are loaded (init checkpoints, generation)."""

import collections
import logging
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vlm_jax.checkpoint import (
    Checkpointer,
    DamagedCheckpoint,
    ModelMismatch,
    check_fingerprint,
    fingerprint,
    load_params,
)
from vlm_jax.train.trainer import load_init_params


def save_tiny(directory):
    params = {"img": {"kernel": jnp.ones((2, 3))}, "txt": {"bias": jnp.zeros((4,))}}
    ckpt = Checkpointer(directory, async_save=False)
    ckpt.save(1, {"params": params, "step": jnp.int32(1)}, None, {"step": 1}, force=True)
    ckpt.close()
    return params


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_matching_params_restore(tmp_path):
    params = save_tiny(tmp_path)
    ckpt = Checkpointer(tmp_path, async_save=False)
    restored = ckpt.restore_params(None, abstract(params))
    ckpt.close()
    np.testing.assert_array_equal(restored["img"]["kernel"], params["img"]["kernel"])


def test_other_model_config_names_mismatched_params(tmp_path):
    save_tiny(tmp_path)
    other = {"img": {"kernel": jnp.ones((2, 5))}, "head": {"w": jnp.ones((1,))}}
    ckpt = Checkpointer(tmp_path, async_save=False)
    with pytest.raises(ValueError, match="different model config") as info:
        ckpt.restore_params(None, abstract(other))
    ckpt.close()
    message = str(info.value)
    assert "img/kernel: checkpoint (2, 3) vs model (2, 5)" in message
    assert "head/w: missing from the checkpoint" in message
    assert "txt/bias: in the checkpoint (4,) but not in the model" in message


def state_at(step):
    """A small train-state-like tree; `w` is big enough to get its own compressed chunk."""
    w = jnp.arange(4000, dtype=jnp.float32).reshape(40, 100) * step
    return {"params": {"w": w, "b": jnp.full((3,), step, jnp.bfloat16)}, "step": jnp.int32(step)}


def save_steps(directory, steps=(1, 2)):
    ckpt = Checkpointer(directory, async_save=False)
    for step in steps:
        ckpt.save(step, state_at(step), None, {"step": step}, force=True)
    ckpt.close()


def resume(directory):
    ckpt = Checkpointer(directory, async_save=False)
    try:
        return ckpt.restore_newest_intact(abstract(state_at(0)))
    finally:
        ckpt.close()


def largest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_fingerprint_names_the_changed_arrays():
    state = state_at(2)
    saved = fingerprint(state)
    check_fingerprint(state, saved, "here")
    changed = {**state, "params": {**state["params"], "w": state["params"]["w"].at[3, 7].add(1)}}
    with pytest.raises(DamagedCheckpoint, match="here: 1 arrays differ.*params/w"):
        check_fingerprint(changed, saved, "here")
    swapped = {**state, "params": {**state["params"], "w": state["params"]["w"][::-1]}}
    assert fingerprint(swapped)["params/w"] != saved["params/w"]  # same words, other order


def test_fingerprint_paths_do_not_depend_on_container_types():
    """A saved TrainState (fields) is restored by `restore_params` as dicts: same paths."""
    Adam = collections.namedtuple("Adam", "count mu")
    as_fields = {"opt_state": (Adam(jnp.int32(3), {"w": jnp.ones(2)}),)}
    as_dicts = {"opt_state": [{"count": jnp.int32(3), "mu": {"w": jnp.ones(2)}}]}
    assert fingerprint(as_fields) == fingerprint(as_dicts)
    assert list(fingerprint(as_fields)) == ["opt_state/0/count", "opt_state/0/mu/w"]


DAMAGE = {
    "truncated array chunk": lambda d: truncate(largest_file(d / "state")),
    "deleted array chunk": lambda d: largest_file(d / "state").unlink(),
    "changed bytes in array chunk": lambda d: flip_middle_byte(largest_file(d / "state")),
    "truncated state metadata": lambda d: truncate(d / "state" / "_METADATA"),
    "deleted state manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "truncated meta": lambda d: truncate(d / "meta" / "metadata"),
    "deleted meta": lambda d: (d / "meta" / "metadata").unlink(),
    "deleted state item": lambda d: shutil.rmtree(d / "state"),
}


# After a failed read, Orbax's async machinery may report into its already closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_step_falls_back_to_older(tmp_path, caplog, damage):
    save_steps(tmp_path)
    DAMAGE[damage](tmp_path / "2")
    with caplog.at_level(logging.WARNING):
        state, step, meta = resume(tmp_path)
    assert step == 1 and meta == {"step": 1}
    np.testing.assert_array_equal(state["params"]["w"], state_at(1)["params"]["w"])
    assert "checkpoint step 2 in" in caplog.text
    assert "moved to 2.corrupt; resuming from step 1" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2.corrupt"]  # kept, not deleted


def test_bytes_changed_inside_a_chunk_restore_without_error_but_fail_the_fingerprint(
    tmp_path, caplog
):
    """TensorStore decodes such a chunk silently; only the saved fingerprints catch it."""
    save_steps(tmp_path)
    flip_middle_byte(largest_file(tmp_path / "2" / "state"))
    ckpt = Checkpointer(tmp_path, async_save=False)
    try:  # Orbax alone: no exception, wrong numbers
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract(state_at(0))))
        silent = ckpt.manager.restore(2, args=args)["state"]
    finally:
        ckpt.close()
    saved_w, read_w = np.asarray(state_at(2)["params"]["w"]), np.asarray(silent["params"]["w"])
    assert read_w.shape == saved_w.shape and not np.array_equal(read_w, saved_w)
    np.testing.assert_array_equal(silent["params"]["b"], state_at(2)["params"]["b"])
    with caplog.at_level(logging.WARNING):
        _, step, _ = resume(tmp_path)
    assert step == 1
    assert "DamagedCheckpoint" in caplog.text and "params/w" in caplog.text


def test_leftover_of_a_killed_save_is_reported_and_the_previous_step_used(tmp_path, caplog):
    save_steps(tmp_path)
    # What a save killed mid-write leaves: Orbax's tmp directory, partly written.
    shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp")
    (tmp_path / "3.orbax-checkpoint-tmp" / "state" / "_METADATA").unlink()
    with caplog.at_level(logging.WARNING):
        _, step, _ = resume(tmp_path)
    assert step == 2
    assert "checkpoint step 3" in caplog.text and "cut off mid-write" in caplog.text
    assert "resuming from step 2" in caplog.text


def test_a_killed_first_save_starts_fresh(tmp_path, caplog):
    (tmp_path / "5.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        assert resume(tmp_path) is None
    assert "checkpoint step 5" in caplog.text and "resuming from scratch" in caplog.text


def test_no_intact_step_fails_naming_each_and_moves_nothing(tmp_path):
    save_steps(tmp_path)
    for step in ("1", "2"):
        (tmp_path / step / "meta" / "metadata").unlink()
    with pytest.raises(RuntimeError, match="no intact checkpoint") as info:
        resume(tmp_path)
    assert "step 1: FileNotFoundError" in str(info.value)
    assert "step 2: FileNotFoundError" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


# Loading another run's params (config.init.*, python -m vlm_jax.generate): the same checks.


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["changed bytes in array chunk", "truncated array chunk"])
def test_load_params_skips_a_damaged_newest_step_and_leaves_it_in_place(tmp_path, caplog, damage):
    save_steps(tmp_path / "checkpoints")
    DAMAGE[damage](tmp_path / "checkpoints" / "2")
    with caplog.at_level(logging.WARNING):
        params = load_params(tmp_path)  # a workdir: its checkpoints/ is found
    np.testing.assert_array_equal(params["w"], state_at(1)["params"]["w"])
    assert "checkpoint step 2 in" in caplog.text
    assert "loading params of step 1 instead" in caplog.text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def test_load_params_of_changed_bytes_in_the_only_step_fails_naming_the_arrays(tmp_path):
    save_steps(tmp_path, steps=(1,))
    flip_middle_byte(largest_file(tmp_path / "1" / "state"))
    with pytest.raises(RuntimeError, match="no intact checkpoint") as info:
        load_params(tmp_path)  # a checkpoints directory itself
    assert "step 1: DamagedCheckpoint" in str(info.value) and "params/w" in str(info.value)


def test_load_params_without_a_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory at .*missing"):
        load_params(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()  # a typo does not create directories
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_params(tmp_path)


def test_load_params_of_another_model_fails_at_once_without_fallback(tmp_path, caplog):
    save_steps(tmp_path)
    other = {"w": jax.ShapeDtypeStruct((40, 99), jnp.float32), "b": abstract(jnp.ones(3))}
    with caplog.at_level(logging.WARNING), pytest.raises(ModelMismatch, match=r"w: checkpoint"):
        load_params(tmp_path, other)
    assert "unusable" not in caplog.text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_init_checkpoint_with_a_damaged_newest_step_loads_the_intact_one(tmp_path, caplog):
    """trainer.load_init_params (config.init.checkpoint) goes through load_params."""
    save_steps(tmp_path / "run" / "checkpoints")
    flip_middle_byte(largest_file(tmp_path / "run" / "checkpoints" / "2" / "state"))
    like = state_at(0)["params"]
    state = types.SimpleNamespace(params=like)
    shardings = types.SimpleNamespace(params=jax.tree.map(lambda x: x.sharding, like))
    with caplog.at_level(logging.WARNING):
        params = load_init_params(str(tmp_path / "run"), state, shardings)
    np.testing.assert_array_equal(params["w"], state_at(1)["params"]["w"])
    assert "DamagedCheckpoint" in caplog.text
