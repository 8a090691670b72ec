"""Convert released checkpoints into vlm_jax (and back to HuggingFace).

    python -m vlm_jax.convert --from {hf,open_clip,big_vision} --src PATH --out DIR
    python -m vlm_jax.convert --to hf --src DIR --out HF_DIR [--added_rows drop|keep]
    python -m vlm_jax.convert --from open_clip --src PATH --out DIR --image_size 336 \
        [--posemb_resample bicubic|bilinear|bilinear_corners] [--no_posemb_antialias]

DIR then holds `checkpoints/0` (params), `convert.json` and `config.py`, so
`python -m vlm_jax.evaluate --config DIR/config.py --workdir DIR` evaluates the release and
`python -m vlm_jax.train ... --config.init.checkpoint=DIR` fine-tunes from it.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from vlm_jax.config import MissingInput, exit_on_user_error
from vlm_jax.convert import big_vision, common, hf, hf_lm, open_clip
from vlm_jax.models import posemb

IMPORTERS = {"hf": hf.convert, "open_clip": open_clip.convert, "big_vision": big_vision.convert}
EXPORTERS = {"hf": hf.export}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source", choices=sorted(IMPORTERS))
    direction.add_argument("--to", dest="target", choices=sorted(EXPORTERS))
    parser.add_argument("--src", required=True, help="release file/dir, or converted DIR")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--added_rows",
        choices=hf_lm.ADDED_ROWS,
        default="drop",
        help="--to hf of an LM: the vocabulary the run added to its release (a VLM's <image> and "
        "the embedding rows its init grew): drop (default) writes the release's vocab_size, rows "
        "and tokenizer back; keep writes every row and the tokenizer with the added tokens",
    )
    parser.add_argument(
        "--image_size", type=int, help="import for this input size (posemb resampled)"
    )
    parser.add_argument(
        "--posemb_resample",
        choices=posemb.RESAMPLE_METHODS,
        default=posemb.Resample.method,
        help="how --image_size resamples the learned posemb (models/posemb.py)",
    )
    parser.add_argument(
        "--no_posemb_antialias", action="store_true", help="no antialias when the grid shrinks"
    )
    args = parser.parse_args(argv)
    if args.image_size is not None and not args.source:
        parser.error("--image_size applies to imports (--from)")
    if not Path(args.src).exists():
        expected = "a release file or directory" if args.source else "a vlm_jax run directory"
        raise MissingInput(f"--src {args.src!r} does not exist: expected {expected}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.source:
        out = IMPORTERS[args.source](args.src, args.out, new_image_size(args))
    else:
        out = EXPORTERS[args.target](args.src, args.out, args.added_rows)
    logging.info("wrote %s", out)


def new_image_size(args: argparse.Namespace) -> common.NewImageSize | None:
    if args.image_size is None:
        return None
    resample = posemb.Resample(args.posemb_resample, not args.no_posemb_antialias)
    return common.NewImageSize(args.image_size, resample)


# Besides vlm_jax.config.UserError (e.g. no checkpoint at --src for --to hf).
USER_ERRORS = (common.ConversionError, common.MissingPackageError, FileNotFoundError)


def cli(argv: Sequence[str] | None = None) -> None:
    """`main`, with a bad release or a missing optional package as one line and exit status 2."""
    with exit_on_user_error(also=USER_ERRORS):
        main(argv)


if __name__ == "__main__":
    cli()
