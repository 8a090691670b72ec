"""Training entry point.

`python -m vlm_jax.train --config configs/NAME.py[:arg] --workdir DIR [--config.key=value ...]`
"""

from vlm_jax.train.cli import main

if __name__ == "__main__":
    main()
