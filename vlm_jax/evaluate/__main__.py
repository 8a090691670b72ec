"""`python -m vlm_jax.evaluate --config configs/NAME.py --workdir DIR`: evaluate the newest
checkpoint in DIR with the config's evaluators; prints JSON and writes DIR/eval_<step>.json."""

import json
import sys

from vlm_jax.config import exit_on_user_error
from vlm_jax.platforms import choose_backend
from vlm_jax.train.cli import parse_args, setup_logging


def main() -> None:
    choose_backend()
    setup_logging()
    config, options = parse_args(sys.argv[1:], "evaluate")
    from vlm_jax.train.trainer import evaluate_checkpoint

    with exit_on_user_error():  # config errors (ConfigError), no checkpoints (MissingInput)
        results = evaluate_checkpoint(config, options["workdir"])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
