"""How the command-line tools choose jax's backend.

jax, left to itself (JAX_PLATFORMS unset), initialises every backend whose plugin is
installed. With libtpu installed (the `[tpu]` extra, which also serves the ahead-of-time
compile tool on CPU hosts) but no TPU chip in the machine, libtpu's initialisation prints
warnings about TPU hosts and accelerator types it cannot find before jax falls back to the CPU.
`choose_backend()` skips that probe: it runs first in every CLI and, only when

- JAX_PLATFORMS is unset (a user's own choice, even JAX_PLATFORMS='', always wins),
- libtpu is importable, and
- no TPU chip is on the PCI bus (jax's own test, `hardware_utils`),

it sets JAX_PLATFORMS to "cuda,cpu" (an NVIDIA GPU is visible and jax's CUDA plugin installed)
or "cpu", in the environment too, so that worker processes inherit it. On a TPU VM, or
without libtpu, nothing changes.
"""

from __future__ import annotations

import importlib.util
import os

CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _tpu_chips() -> int:
    from jax._src import hardware_utils  # jax's PCI scan, the one its TPU start-up uses

    return hardware_utils.num_available_tpu_chips_and_device_id()[0]


def _gpu_platforms() -> str:
    from jax._src import hardware_utils

    visible = hardware_utils.has_visible_nvidia_gpu()
    return "cuda," if visible and any(_installed(p) for p in CUDA_PLUGINS) else ""


def choose_backend() -> str | None:
    """The platforms set for this process ("cpu" or "cuda,cpu"), or None where jax is left to
    choose (see the module docstring). Call before anything initialises a jax backend."""
    if "JAX_PLATFORMS" in os.environ or not _installed("libtpu") or _tpu_chips() > 0:
        return None
    platforms = _gpu_platforms() + "cpu"
    os.environ["JAX_PLATFORMS"] = platforms
    import jax

    jax.config.update("jax_platforms", platforms)
    return platforms
