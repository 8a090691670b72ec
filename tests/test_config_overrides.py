"""CLI overrides are parsed strictly by the type of the value they replace: nothing is
truncated or coerced silently (was: train.batch_size=1.5 -> 1, train.eval_every=True -> 1)."""

import math
import re

import pytest

from vlm_jax.config import apply_override
from vlm_jax.defaults import base_config


@pytest.mark.parametrize(
    "field, text, got",
    [
        ("batch_size", "1.5", "float"),
        ("batch_size", "2.0", "float"),
        ("batch_size", "1e3", "float"),
        ("eval_every", "True", "bool"),
        ("eval_every", "(3,)", "tuple"),
        ("eval_every", "'3'", "str"),
        ("eval_every", "false", None),
        ("eval_every", "ten", None),
    ],
)
def test_an_int_field_rejects_anything_but_an_int_literal(field, text, got):
    """The message names the key, the value, the expected type and (if a literal) what it was."""
    config = base_config()
    before = config.train[field]
    message = f"--config.train.{field}={text!r}: expected an int"
    message += f", got a {got}" if got else ""
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        apply_override(config, f"train.{field}", text)
    assert config.train[field] == before


@pytest.mark.parametrize("text, value", [("64", 64), (" 7 ", 7), ("1_024", 1024), ("-1", -1)])
def test_an_int_field_takes_int_literals(text, value):
    config = base_config()
    apply_override(config, "train.batch_size", text)
    assert config.train.batch_size == value and type(config.train.batch_size) is int


@pytest.mark.parametrize(
    "text, value", [("3", 3.0), ("3e-4", 3e-4), ("0.5", 0.5), ("inf", math.inf)]
)
def test_a_float_field_takes_int_or_float_literals(text, value):
    config = base_config()
    apply_override(config, "optim.lr", text)
    assert config.optim.lr == value and type(config.optim.lr) is float


@pytest.mark.parametrize("text", ["True", "false", "fast", "1e-3x", ""])  # bools are not numbers
def test_a_float_field_rejects_other_text_naming_key_value_and_type(text):
    with pytest.raises(ValueError, match=r"--config.optim.lr=.*: expected a float \(or an int\)"):
        apply_override(base_config(), "optim.lr", text)


@pytest.mark.parametrize("text, value", [("true", True), ("False", False), ("TRUE", True)])
def test_a_bool_field_takes_true_or_false(text, value):
    config = base_config()
    apply_override(config, "train.async_checkpoint", text)
    assert config.train.async_checkpoint is value


@pytest.mark.parametrize("text", ["1", "0", "yes", "on", ""])
def test_a_bool_field_rejects_anything_else(text):
    expected = rf"--config.train.async_checkpoint={text!r}: expected a bool \(true or false\)"
    with pytest.raises(ValueError, match=expected):
        apply_override(base_config(), "train.async_checkpoint", text)
