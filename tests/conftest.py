"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

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

import pytest  # noqa: E402

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
