"""Command-line entry points shared by train and evaluate. Every CLI reports a user's mistake
with `vlm_jax.config.exit_on_user_error`: one `error: <message>` line, exit status 2."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from vlm_jax.config import UserError, exit_on_user_error
from vlm_jax.platforms import choose_backend

USAGE = (
    "usage: python -m vlm_jax.{cmd} --config configs/NAME.py[:arg] --workdir DIR "
    "[--config.key=value ...]"
)


HELP = {
    "train": """Train a config into DIR (a new run, or resume the newest intact checkpoint there).
        Any config key can be set with --config.key=value (e.g. --config.train.total_steps=500);
        a bad key or value names the valid ones. The shipped configs are configs/*.py.""",
    "evaluate": """Evaluate the newest intact checkpoint in DIR with the config's evaluators
        (eval.tasks); prints JSON and writes DIR/eval_<step>.json.""",
}


def parse_args(argv: Sequence[str], cmd: str, extra: Sequence[str] = ()):
    """-> (config, options) or exit(2) with a message naming what is wrong."""
    from vlm_jax.config import exit_on_help, parse_cli
    from vlm_jax.train.validate import CONFIG

    exit_on_help(argv, USAGE.format(cmd=cmd), HELP[cmd])
    try:
        config, options = parse_cli(argv, CONFIG)
    except (UserError, ValueError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}\n{USAGE.format(cmd=cmd)}", file=sys.stderr)
        raise SystemExit(2) from None
    allowed = {"config", "workdir", *extra}
    unknown = sorted(set(options) - allowed)
    if unknown or "workdir" not in options:
        problem = f"unknown flag(s) {unknown}" if unknown else "missing --workdir DIR"
        print(
            f"error: {problem}; flags: {sorted(allowed)}\n{USAGE.format(cmd=cmd)}", file=sys.stderr
        )
        raise SystemExit(2)
    return config, options


def check_init_checkpoints(config) -> None:
    """Fail before any compute when an `init.*checkpoint` key names no checkpoint directory
    (the trainer would only find out after compiling the model)."""
    from vlm_jax.checkpoint import checkpoints_dir
    from vlm_jax.config import MissingInput

    for key, path in config.init.items():
        if key.endswith("checkpoint") and path:
            try:
                checkpoints_dir(path)
            except MissingInput as e:
                raise MissingInput(f"init.{key}={path!r}: {e}") from None


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> None:
    choose_backend()
    setup_logging()
    config, options = parse_args(sys.argv[1:] if argv is None else argv, "train")
    from vlm_jax.train.distributed import maybe_initialize_distributed

    maybe_initialize_distributed(config)
    from vlm_jax.train.trainer import train

    with exit_on_user_error():  # the trainer raises a config's ValueErrors as ConfigError
        check_init_checkpoints(config)
        final = train(config, options["workdir"])
    summary = {k: round(v, 4) for k, v in final.items() if k.startswith(("eval/", "train/loss"))}
    logging.info("done: %s", summary)
