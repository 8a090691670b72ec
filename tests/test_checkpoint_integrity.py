"""A checkpoint of another model config fails naming the mismatched parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.train.checkpoint import Checkpointer


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
