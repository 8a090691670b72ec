"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere; the tiny configs
the test files share (`from conftest import tiny_contrastive_config, ...`)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import ctypes  # noqa: E402
import signal  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vlm_jax.config import apply_override, load_config  # noqa: E402

WATCHED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_LIBC = ctypes.CDLL(None)


def _os_handler(sig: int) -> bytes:
    """The kernel's record of the handler (struct sigaction, handler first): a C library that
    replaces Python's handler is invisible to signal.getsignal but eats Ctrl-C all the same."""
    action = ctypes.create_string_buffer(256)
    _LIBC.sigaction(sig, None, action)
    return action.raw


def _signal_state() -> dict:
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    return {
        sig: (signal.getsignal(sig), _os_handler(sig)[:8], sig in blocked)
        for sig in WATCHED_SIGNALS
    }


@pytest.fixture(autouse=True)
def signal_handlers_unchanged():
    """Fail any test that leaves SIGINT/SIGTERM handling changed, and restore it: the Python
    handler, the handler the kernel calls, and whether the main thread blocks the signal. A
    leaked handler or mask turns a later Ctrl-C into nothing (a trainer run inside a notebook
    must leave Ctrl-C working)."""
    before = _signal_state()
    saved = {sig: _os_handler(sig) for sig in WATCHED_SIGNALS}
    yield
    after = _signal_state()
    changed = {signal.Signals(sig).name: (before[sig], after[sig])
               for sig in WATCHED_SIGNALS if after[sig] != before[sig]}  # fmt: skip
    for sig in WATCHED_SIGNALS:
        if after[sig] != before[sig]:
            _LIBC.sigaction(sig, ctypes.create_string_buffer(saved[sig]), None)
            signal.signal(sig, before[sig][0])
            if before[sig][2] != after[sig][2]:
                how = signal.SIG_BLOCK if before[sig][2] else signal.SIG_UNBLOCK
                signal.pthread_sigmask(how, [sig])
    assert not changed, f"test left signal handling changed (python, os, blocked): {changed}"


# -- tiny configs: shipped experiment configs shrunk to seconds per step ------------------------
# Values are CLI texts (as --config.KEY=VALUE), so a subprocess test can pass them on a command
# line. Tests compare numbers between runs of these configs: change them only with those tests.
TINY_CONTRASTIVE = {
    "data.image_size": "16",
    "data.val_size": "64",
    "data.zeroshot_size": "80",
    "model.image.image_size": "16",
    "model.image.width": "32",
    "model.image.depth": "1",
    "model.image.num_heads": "2",
    "model.image.mlp_dim": "64",
    "model.text.width": "32",
    "model.text.depth": "1",
    "model.text.num_heads": "2",
    "model.text.mlp_dim": "64",
    "model.embed_dim": "32",
    "train.batch_size": "16",
    "train.total_steps": "6",
    "train.log_every": "2",
    "train.eval_every": "3",
    "train.checkpoint_every": "3",
    "train.async_checkpoint": "false",
    "eval.batch_size": "64",
    "optim.warmup_steps": "2",
}
TINY_LM = {
    "data.image_size": "16",
    "data.val_size": "64",
    "data.zeroshot_size": "8",
    "model.lm.width": "32",
    "model.lm.depth": "2",
    "model.lm.num_heads": "2",
    "model.lm.num_kv_heads": "1",
    "model.lm.head_dim": "16",
    "model.lm.mlp_dim": "64",
    "train.batch_size": "16",
    "train.total_steps": "4",
    "train.log_every": "2",
    "train.checkpoint_every": "4",
    "train.async_checkpoint": "false",
    "eval.batch_size": "16",
    "optim.warmup_steps": "1",
}
TINY_VLM = {
    **TINY_LM,
    "model.image.image_size": "16",
    "model.image.width": "32",
    "model.image.depth": "1",
    "model.image.num_heads": "2",
    "model.image.mlp_dim": "32",
    "eval.num_examples": "21",
    "eval.max_new_tokens": "3",
}


def shipped_config(path: str, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """The config file `path` ("configs/x.py[:arg]") with CLI-text `overrides`, locked."""
    config = load_config(path)
    for key, value in overrides.items():
        apply_override(config, key, value)
    config.lock()
    return config


def tiny_contrastive_config(name: str = "siglip_shapes", **overrides) -> ml_collections.ConfigDict:
    """configs/{name}.py (a contrastive config) at TINY_CONTRASTIVE sizes, then `overrides`."""
    return shipped_config(f"configs/{name}.py", {**TINY_CONTRASTIVE, **overrides})


def tiny_vlm_config(arg: str = "", **overrides) -> ml_collections.ConfigDict:
    """configs/vlm_shapes.py[:arg] (arg: a training recipe) at TINY_VLM sizes, then `overrides`."""
    return shipped_config(
        "configs/vlm_shapes.py" + (f":{arg}" if arg else ""), {**TINY_VLM, **overrides}
    )


def tiny_lm_config(**overrides) -> ml_collections.ConfigDict:
    """configs/lm_shapes.py at TINY_LM sizes (the VLM's decoder), then `overrides`."""
    return shipped_config("configs/lm_shapes.py", {**TINY_LM, **overrides})


# -- a tiny two-tower model section (models.build_model) and its inputs -------------------------
TOWER_EMBED = 16
TOWER_IMAGE = 16  # image side, patch 4 -> 4 x 4 tokens
TOWER_TEXT_LEN = 8


def tiny_two_tower_config(**overrides) -> ml_collections.ConfigDict:
    """A two-tower `config.model` small enough to init and run in well under a second;
    `overrides` by dotted key within the section ("image.pool": "cls")."""
    config = ml_collections.ConfigDict(
        dict(
            name="two_tower",
            embed_dim=TOWER_EMBED,
            dtype="float32",
            attention_impl="xla",
            remat=False,
            scan=False,
            image=dict(
                variant=None,
                width=32,
                depth=2,
                num_heads=2,
                mlp_dim=64,
                patch_size=4,
                image_size=TOWER_IMAGE,
                posemb="learn",
                pool="map",
                dropout=0.0,
            ),
            text=dict(
                vocab_size=50,
                max_len=TOWER_TEXT_LEN,
                width=32,
                depth=2,
                num_heads=2,
                mlp_dim=64,
                causal=False,
                pool="last",
                pad_id=0,
                eos_id=1,
                dropout=0.0,
            ),
            temperature_init=10.0,
            bias_init=-10.0,
            learn_temperature=True,
            max_logit_scale=100.0,
        )
    )
    for key, value in overrides.items():
        section = config
        *parents, leaf = key.split(".")
        for part in parents:
            section = section[part]
        section[leaf] = value
    return config


def tower_inputs(batch: int = 2, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """images float32[B, 16, 16, 3] in [-1, 1]; tokens int32[B, 8] with trailing pads."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (batch, TOWER_IMAGE, TOWER_IMAGE, 3)).astype(np.float32)
    tokens = rng.integers(2, 50, (batch, TOWER_TEXT_LEN)).astype(np.int32)
    tokens[:, TOWER_TEXT_LEN - 3 :] = 0
    tokens[:, TOWER_TEXT_LEN - 4] = 1  # eos
    return jnp.asarray(images), jnp.asarray(tokens)


def init_model(model, *args) -> dict:
    """`model.init` with fixed params and dropout keys (boxed variables)."""
    return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, *args)


def unboxed_params(model, *args) -> dict:
    return nn.unbox(init_model(model, *args)["params"])
