"""Command-line entry points shared by train and evaluate."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

USAGE = (
    "usage: python -m vlm_jax.{cmd} --config configs/NAME.py[:arg] --workdir DIR "
    "[--config.key=value ...]"
)


def parse_args(argv: Sequence[str], cmd: str, extra: Sequence[str] = ()):
    """-> (config, options) or exit(2) with a message naming what is wrong."""
    from vlm_jax.config import parse_cli

    try:
        config, options = parse_cli(argv)
    except (ValueError, FileNotFoundError, TypeError) as e:
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
    setup_logging()
    config, options = parse_args(sys.argv[1:] if argv is None else argv, "train")
    from vlm_jax.train.distributed import maybe_initialize_distributed

    maybe_initialize_distributed(config)
    import vlm_jax.train.registry_imports  # noqa: F401  (registers tasks)
    from vlm_jax.train.trainer import train

    try:
        final = train(config, options["workdir"])
    except ValueError as e:  # config errors found before compute
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    summary = {k: round(v, 4) for k, v in final.items() if k.startswith(("eval/", "train/loss"))}
    logging.info("done: %s", summary)
