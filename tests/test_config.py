"""Config files, CLI overrides and their errors (all before any compute)."""

import textwrap

import pytest

from vlm_jax.config import apply_override, check_choice, load_config, parse_cli
from vlm_jax.defaults import base_config
from vlm_jax.sharding import resolve_mesh_shape


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(
        textwrap.dedent(
            """
            from vlm_jax.defaults import base_config

            def get_config(arg=None):
                c = base_config()
                c.name = arg or "default"
                return c
            """
        )
    )
    return path


def test_overrides_are_typed(config_file):
    config, options = parse_cli(
        [
            "--config",
            f"{config_file}:variant",
            "--workdir",
            "/tmp/x",
            "--config.train.batch_size=64",
            "--config.optim.lr",
            "3e-4",
            "--config.train.async_checkpoint=false",
            "--config.optim.freeze=img/.*,txt/.*",
            "--config.mesh.shape=(2, 2, 2)",
        ]
    )
    assert config.name == "variant"
    assert options["workdir"] == "/tmp/x"
    assert config.train.batch_size == 64 and isinstance(config.train.batch_size, int)
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.train.async_checkpoint is False
    assert config.optim.freeze == ("img/.*", "txt/.*")
    assert config.mesh.shape == (2, 2, 2)


def test_unknown_key_names_valid_keys(config_file):
    with pytest.raises(ValueError, match=r"'batch_sise'.*valid: .*batch_size"):
        parse_cli(["--config", str(config_file), "--config.train.batch_sise=3"])
    with pytest.raises(ValueError, match=r"'trian' is not a key of <root>"):
        parse_cli(["--config", str(config_file), "--config.trian.batch_size=3"])


def test_wrong_type_is_rejected():
    config = base_config()
    with pytest.raises(ValueError, match=r"train.batch_size='many': expected an int"):
        apply_override(config, "train.batch_size", "many")
    with pytest.raises(ValueError, match="expected a bool"):
        apply_override(config, "train.async_checkpoint", "maybe")


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config("nope.py")


def test_check_choice_lists_valid_choices():
    with pytest.raises(ValueError, match=r"loss.name='sigmoud' is not one of: sigmoid, softmax"):
        check_choice("loss.name", "sigmoud", ["sigmoid", "softmax"])


@pytest.mark.parametrize(
    "shape,devices,expected",
    [((-1, 1, 1), 8, (8, 1, 1)), ((2, -1, 2), 8, (2, 2, 2)), ((1, 1, 8), 8, (1, 1, 8))],
)
def test_mesh_shape_resolution(shape, devices, expected):
    assert resolve_mesh_shape(shape, devices) == expected


@pytest.mark.parametrize("shape", [(3, 1, 1), (-1, -1, 1), (0, 8, 1), (3, -1, 1)])
def test_bad_mesh_shapes_fail_with_device_count(shape):
    with pytest.raises(ValueError, match=r"mesh.shape"):
        resolve_mesh_shape(shape, 8)


@pytest.mark.parametrize("name", ["configs/siglip_shapes.py", "configs/vlm_shapes.py"])
def test_model_and_data_image_sizes_must_agree(name):
    """Was: model.image.image_size=64 with data.image_size=32 passed validation unchecked."""
    from vlm_jax.train.validate import validate_config

    config = load_config(name)
    validate_config(config)
    apply_override(config, "model.image.image_size", "64")
    with pytest.raises(ValueError, match=r"model.image.image_size=64 != data.image_size=32"):
        validate_config(config)


def test_validation_reads_the_attention_registry_and_the_dtype_table(monkeypatch):
    """One list of attention impls (the dispatcher's registry) and one dtype table
    (layers.COMPUTE_DTYPES): a newly registered impl or dtype is valid everywhere at once."""
    import jax.numpy as jnp

    from vlm_jax.kernels import ATTENTION_IMPLS
    from vlm_jax.models import build_model
    from vlm_jax.models.layers import COMPUTE_DTYPES
    from vlm_jax.train.validate import validate_config

    config = load_config("configs/vlm_shapes.py")
    monkeypatch.setitem(ATTENTION_IMPLS._entries, "my_kernel", object())
    monkeypatch.setitem(COMPUTE_DTYPES, "float16", jnp.float16)
    apply_override(config, "model.attention_impl", "my_kernel")
    apply_override(config, "model.dtype", "float16")
    validate_config(config)
    assert build_model(config.model).lm.dtype == jnp.float16
    apply_override(config, "model.attention_impl", "flsh")
    with pytest.raises(
        ValueError, match=r"model.attention_impl='flsh' is not one of: auto, .*my_kernel"
    ):
        validate_config(config)
