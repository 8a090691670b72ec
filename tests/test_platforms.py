"""The CLIs' backend choice (vlm_jax/platforms.py): only an unset JAX_PLATFORMS with libtpu
installed and no TPU chip present is changed, to the CPU or to CUDA + CPU."""

import jax
import pytest

from vlm_jax import platforms


@pytest.fixture
def chosen(monkeypatch):
    """Calls jax.config.update("jax_platforms", ...) records instead of making (the test
    process's backends are up already); JAX_PLATFORMS unset, libtpu 'installed', no TPU."""
    updates = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(platforms, "_installed", lambda module: module == "libtpu")
    monkeypatch.setattr(platforms, "_tpu_chips", lambda: 0)
    return updates


def test_libtpu_without_a_tpu_chip_runs_on_the_cpu(chosen, monkeypatch):
    assert platforms.choose_backend() == "cpu"
    assert chosen == [("jax_platforms", "cpu")]
    assert platforms.os.environ["JAX_PLATFORMS"] == "cpu"  # worker processes inherit it


@pytest.mark.parametrize("gpu, plugin, expected", [(True, True, "cuda,cpu"), (True, False, "cpu")])
def test_a_visible_gpu_with_the_cuda_plugin_keeps_cuda_first(
    chosen, monkeypatch, gpu, plugin, expected
):
    from jax._src import hardware_utils

    monkeypatch.setattr(hardware_utils, "has_visible_nvidia_gpu", lambda: gpu)
    plugins = ("libtpu", "jax_cuda12_plugin") if plugin else ("libtpu",)
    monkeypatch.setattr(platforms, "_installed", lambda module: module in plugins)
    assert platforms.choose_backend() == expected


@pytest.mark.parametrize("value", ["tpu", "cpu", ""])
def test_a_users_jax_platforms_is_never_changed(chosen, monkeypatch, value):
    monkeypatch.setenv("JAX_PLATFORMS", value)
    assert platforms.choose_backend() is None
    assert chosen == [] and platforms.os.environ["JAX_PLATFORMS"] == value


def test_a_tpu_vm_or_no_libtpu_is_left_to_jax(chosen, monkeypatch):
    monkeypatch.setattr(platforms, "_tpu_chips", lambda: 4)
    assert platforms.choose_backend() is None
    monkeypatch.setattr(platforms, "_tpu_chips", lambda: 0)
    monkeypatch.setattr(platforms, "_installed", lambda module: False)
    assert platforms.choose_backend() is None
    assert chosen == []
