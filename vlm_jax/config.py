"""Config files, command-line overrides and up-front validation.

A config is a `configs/NAME.py` file defining `get_config(arg=None) -> ConfigDict`. The CLI
spelling is `--config configs/NAME.py[:arg] --config.key.sub=value`. Overrides are parsed with
the type of the value they replace; unknown keys and invalid choices fail here, before any
device work, with a message naming the valid keys or choices.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict


class UserError(Exception):
    """A mistake in what the user gave a command (a path, a value, an install), not a bug.

    Raised where user input is checked; every CLI prints it as one `error: <message>` line and
    exits 2 (`exit_on_user_error`), while any other exception keeps its
    traceback. The message names the bad value and what was expected.
    """


class MissingInput(UserError, FileNotFoundError):
    """A file or directory that the config or a flag names is absent or not what it must be."""


class MissingPackage(UserError, ImportError):
    """An optional package that the configured component needs is not installed."""


class ConfigError(UserError, ValueError):
    """A config value that a check found wrong before any step ran (see `config_errors`)."""


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """Inside: a ValueError is the config's (checks of values, choices, sizes and shapes made
    while a run is set up) and becomes a ConfigError, i.e. an `error:` line. Code that runs
    steps stays outside, so a ValueError there is a crash and keeps its traceback."""
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


@contextlib.contextmanager
def exit_on_user_error(also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Turn a UserError (and the `also` types) raised inside into `error: <message>` + exit 2.

    Only these: any other exception is a bug and keeps its traceback.
    """
    try:
        yield
    except (UserError, *also) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


HELP_FLAGS = ("-h", "--help")


def exit_on_help(argv: Sequence[str], usage: str, doc: str | None = None) -> None:
    """`-h` / `--help` among the arguments: print the command's description and its usage on
    stdout and exit 0 (before any flag is parsed, so `--help` never reads as a flag missing a
    value)."""
    if any(arg in HELP_FLAGS for arg in argv):
        print(f"{inspect.cleandoc(doc)}\n\n{usage}" if doc else usage)
        raise SystemExit(0)


def require_package(module: str, needed_by: str, install: str) -> ModuleType:
    """`import module`, or MissingPackage naming `needed_by` (e.g. "tokenizer.name='sentencepiece'")
    and how to install it: such packages are optional, not vlm_jax requirements."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingPackage(
            f"{needed_by} needs the package {module.split('.')[0]!r}, which is not installed "
            f"({type(e).__name__}: {e}); install it with: {install}"
        ) from None


def load_config(spec: str) -> ConfigDict:
    """Load `path/to/config.py[:arg]` and return its unlocked ConfigDict."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"vlm_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config(arg=None)")
    config = module.get_config(arg or None) if arg else module.get_config()
    if not isinstance(config, ConfigDict):
        raise TypeError(f"{path}: get_config() must return a ConfigDict, got {type(config)}")
    return config


def parse_bool(flag: str, text: str) -> bool:
    """'true' or 'false' (any case) given to `flag` (e.g. '--config.train.remat')."""
    lowered = text.strip().lower()
    if lowered not in ("true", "false"):
        raise ValueError(f"{flag}={text!r}: expected a bool (true or false)")
    return lowered == "true"


def parse_int(flag: str, text: str) -> int:
    """An int literal only: '1.5' or 'True' would otherwise be truncated to 1 silently."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise ValueError(f"{flag}={text!r}: expected an int") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{flag}={text!r}: expected an int, got a {type(value).__name__}")
    return value


def parse_float(flag: str, text: str) -> float:
    """A float or int literal (or inf / nan); not a bool."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{flag}={text!r}: expected a float (or an int)") from None


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Parse `text` as the type of `current` (the value being overridden)."""
    if isinstance(current, bool):
        return parse_bool(f"--config.{key}", text)
    if isinstance(current, int):
        return parse_int(f"--config.{key}", text)
    if isinstance(current, float):
        return parse_float(f"--config.{key}", text)
    if isinstance(current, str):
        return text
    if isinstance(current, tuple | list):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = tuple(part.strip() for part in text.split(",") if part.strip())
        if not isinstance(value, tuple | list):
            value = (value,)
        return tuple(value)
    if current is None:
        if text.lower() == "none":
            return None
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    raise ValueError(f"--config.{key}: a {type(current).__name__} cannot be set from the CLI")


def apply_override(config: ConfigDict, dotted_key: str, text: str) -> None:
    """Set `config.<dotted_key>` from CLI text, failing on unknown keys with the valid ones."""
    node = config
    parts = dotted_key.split(".")
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth]) or "<root>"
        if not isinstance(node, ConfigDict) or part not in node:
            valid = ", ".join(sorted(node.keys())) if isinstance(node, ConfigDict) else "(none)"
            raise ValueError(
                f"unknown config key {dotted_key!r}: {part!r} is not a key of {prefix} "
                f"(valid: {valid})"
            )
        if depth == len(parts) - 1:
            with node.ignore_type():
                node[part] = _parse_value(dotted_key, text, node[part])
        else:
            node = node[part]


def split_flags(argv: Sequence[str]) -> list[tuple[str, str]]:
    """`--name=value` / `--name value` arguments -> [(name, value)] in order."""
    flags, i = [], 0
    while i < len(argv):
        if not argv[i].startswith("--"):
            raise ValueError(f"unexpected argument {argv[i]!r}; flags look like --name=value")
        name, eq, value = argv[i][2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"flag --{name} needs a value")
            i, value = i + 1, argv[i + 1]
        flags.append((name, value))
        i += 1
    return flags


def parse_cli(argv: Sequence[str], schema: Any = None) -> tuple[ConfigDict, dict[str, str]]:
    """Parse `--config FILE[:arg] --workdir DIR --config.k=v ...`.

    Returns the config (overrides applied, locked) and the other `--flag value` options. With
    `schema` (the config's root spec, vlm_jax.train.validate.CONFIG) the overrides are applied
    knowing the components' schemas (`schema.apply_overrides`): a component selected on the
    command line (`--config.model.connector.name=perceiver`) takes its own keys from there on.
    """
    options: dict[str, str] = {}
    overrides: list[tuple[str, str]] = []
    for name, value in split_flags(argv):
        if name.startswith("config."):
            overrides.append((name[len("config.") :], value))
        else:
            options[name] = value
    if "config" not in options:
        raise ValueError("missing --config configs/NAME.py[:arg]")
    config = load_config(options["config"])
    if schema is not None:
        schema.apply_overrides(config, overrides, apply_override)
    else:
        for key, value in overrides:
            apply_override(config, key, value)
    config.lock()
    return config, options


def check_choice(name: str, value: Any, valid: Sequence[Any] | Callable[[], Sequence[Any]]):
    """Fail with the valid choices when `value` is not one of them."""
    choices = list(valid() if callable(valid) else valid)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of: {', '.join(map(str, choices))}")


def to_json(config: ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
