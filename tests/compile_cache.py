"""A persistent XLA compilation cache for the tests that compile the same programs again: a run
and its resume in one pytest process, the launches of a relaunched run in subprocesses.

On 2 CPU cores compiling is most of a tiny run's time (the train step, the random init, the
evaluators: ~50 of a train() call's 60 CPU seconds). A cache hit loads the executable compiled
before for the same key (XLA's: the program, the devices, the compile options and flags), so
no number changes; only the compile goes. One directory per pytest session, shared by the
modules that enable it and the subprocesses they start; test_clean_exit shares one the same way.

In a test module: `from compile_cache import compilation_cache  # noqa: F401` (autouse); for a
subprocess: `env |= compile_cache.subprocess_env(compile_cache.session_dir(tmp_path_factory))`.
"""

import contextlib
from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

# Every compile is stored (jax's default stores only those over a second of wall time, which
# on a loaded machine is a different set each time).
MIN_COMPILE_TIME_S = 0.0


def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's cache directory (the same path for every module and subprocess)."""
    path = tmp_path_factory.getbasetemp() / "xla_cache"
    path.mkdir(exist_ok=True)
    return path


def subprocess_env(directory: Path) -> dict[str, str]:
    """Environment variables that make a jax subprocess compile through the cache."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(directory),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(MIN_COMPILE_TIME_S),
    }


@contextlib.contextmanager
def enabled(directory: Path):
    """This process compiles through the cache in `directory` inside the block; after it, as
    before (jax initialises its cache once: reset_cache makes it read the settings again)."""
    settings = {
        "jax_compilation_cache_dir": str(directory),
        "jax_persistent_cache_min_compile_time_secs": MIN_COMPILE_TIME_S,
    }
    before = {name: getattr(jax.config, name) for name in settings}
    jax_cache.reset_cache()
    for name, value in settings.items():
        jax.config.update(name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        jax_cache.reset_cache()


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The module's tests compile through the session's cache (autouse where imported)."""
    with enabled(session_dir(tmp_path_factory)):
        yield
