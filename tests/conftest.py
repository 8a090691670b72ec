"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import signal  # noqa: E402

import pytest  # noqa: E402

WATCHED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@pytest.fixture(autouse=True)
def signal_handlers_unchanged():
    """Fail any test that leaves a SIGINT/SIGTERM handler changed (then restore it): a leaked
    handler turns a later Ctrl-C into a silent flag, as a trainer run inside a notebook would."""
    before = {sig: signal.getsignal(sig) for sig in WATCHED_SIGNALS}
    yield
    changed = {sig: h for sig in WATCHED_SIGNALS if (h := signal.getsignal(sig)) != before[sig]}
    for sig in changed:
        signal.signal(sig, before[sig])
    assert not changed, f"test left signal handlers changed: {changed}"
