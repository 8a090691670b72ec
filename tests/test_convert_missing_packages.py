"""The converters' optional packages (safetensors; torch for .bin weights) are not vlm_jax
requirements: without them a conversion fails in one line naming the package and the install."""

import sys

import pytest

from vlm_jax.convert import __main__ as convert_cli
from vlm_jax.convert import common


def test_missing_safetensors_is_one_line_naming_the_convert_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)  # import raises ImportError
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.cli(["--to", "hf", "--src", str(tmp_path / "ckpt"), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: writing an HF release needs")
    assert "package 'safetensors'" in error and "pip install -e '.[convert]'" in error
    (tmp_path / "model.safetensors").write_bytes(b"")
    message = r"reading .*model.safetensors needs the package 'safetensors' .*\[convert\]"
    with pytest.raises(common.MissingPackageError, match=message):
        common.load_tensors(tmp_path)


def test_missing_torch_for_bin_weights_names_the_pinned_torch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    message = r"pytorch_model.bin needs the package 'torch' .*pip install torch==2.13.0"
    with pytest.raises(common.MissingPackageError, match=message):
        common.load_tensors(tmp_path)
