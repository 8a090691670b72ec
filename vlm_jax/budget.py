"""`python -m vlm_jax.budget --config CONFIG [--image_sizes 224,336] [--context N] [--config.k=v]`:
what each image size costs a VLM config, before any run.

Per image size (the config's own first, then `--image_sizes`) and the images per record its data
source gives (K): the visual tokens per example (K x the connector's M, read from the model's own
`encode_images` shape), the LM sequence length of the prefill (tokenizer.max_len with each
`<image>` replaced by its M tokens under early fusion), the prefill FLOPs per request (vision
tower + LM over the sequence, attending to the KV cache of sequence + eval.max_new_tokens slots;
models/flops.py as vlm_jax.compile counts them), the KV-cache bytes per request (the cache the
model's `prefill` allocates) and whether the sequence fits the LM context `--context` (default:
the config's own sequence at its own image size). `text_budget` is
the tokenizer.max_len that would fit that context at the size. One JSON line per size, then a
table. The vqa evaluator reports the measured `visual_tokens` and `prefill_gflops` of a run.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.config import ConfigError

USAGE = (
    "usage: python -m vlm_jax.budget --config configs/NAME.py[:arg] [--image_sizes 224,336] "
    "[--context N] [--config.key=value ...]"
)
COLUMNS = (
    "image_size",
    "images",
    "visual_tokens",
    "lm_seq_len",
    "prefill_gflops",
    "kv_cache_mib",
    "fits",
    "text_budget",
)


def at_image_size(config: ml_collections.ConfigDict, size: int) -> ml_collections.ConfigDict:
    """`config` with the tower and the data at `size` px (a learned posemb then resamples)."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.model.image.image_size = size
        config.data.image_size = size
    return config


def plan(config: ml_collections.ConfigDict) -> dict:
    """The budget row of a VLM config at its own image size (see the module doc)."""
    from vlm_jax import sharding
    from vlm_jax.compile.steps import decoder_forward_flops, lm_positions
    from vlm_jax.train.tasks import TASKS
    from vlm_jax.train.trainer import param_layout
    from vlm_jax.train.validate import validate_config

    validate_config(config)
    if config.task != "vlm":
        raise ConfigError(f"task={config.task!r}: the budget planner reads a 'vlm' config")
    mesh = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    task = TASKS.get(config.task)(config, mesh)
    model, new_tokens = task.model, config.eval.max_new_tokens
    with jax.set_mesh(mesh):
        _, params, _ = param_layout(task, config, mesh)
        spec = task.batch_spec(1)
        inputs = [
            jnp.zeros(spec[k].shape, spec[k].dtype) for k in ("image", "tokens", "prefix_len")
        ]
        apply = lambda method, *extra: jax.eval_shape(
            lambda p: model.apply({"params": p}, *inputs, *extra, method=method), params
        )
        _, cache, _ = apply("prefill", new_tokens)  # the cache a request allocates
        visual = apply("encode_images") if model.vision is not None else None  # [1, K, M, D]
        seq_len = lm_positions(task, config, params)
    return {
        "image_size": config.model.image.image_size,
        "images": spec["image"].shape[1],
        "visual_tokens": 0 if visual is None else visual.shape[1] * visual.shape[2],
        "lm_seq_len": seq_len,
        "prefill_flops": decoder_forward_flops(task, config, seq_len, cache.max_len),
        "kv_cache_bytes": sum(x.size * x.dtype.itemsize for x in (*cache.keys, *cache.values)),
    }


def budget_rows(
    config: ml_collections.ConfigDict, sizes: Sequence[int], context: int | None = None
) -> list[dict]:
    """`plan` at the config's image size and each of `sizes`, with the fit to `context`."""
    own = plan(config)
    context = context or own["lm_seq_len"]  # what the config itself is sized for
    rows = [own] + [plan(at_image_size(config, s)) for s in sizes if s != own["image_size"]]
    for row in rows:
        row |= {
            "prefill_gflops": row["prefill_flops"] / 1e9,
            "kv_cache_mib": row["kv_cache_bytes"] / 2**20,
            "context": context,
            "fits": row["lm_seq_len"] <= context,
            "text_budget": context - row["lm_seq_len"] + config.tokenizer.max_len,
        }
    return rows


def table(rows: list[dict]) -> str:
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [[cell(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(COLUMNS)]
    fmt = lambda cells: "  ".join(v.rjust(w) for v, w in zip(cells, widths, strict=True))
    return "\n".join([fmt(COLUMNS), *(fmt(line) for line in lines)])


def main(argv: Sequence[str] | None = None) -> None:
    from vlm_jax.config import exit_on_help, exit_on_user_error, parse_cli
    from vlm_jax.train.validate import CONFIG

    argv = list(sys.argv[1:] if argv is None else argv)
    exit_on_help(argv, USAGE, __doc__.split("\n\n", 1)[1])
    with exit_on_user_error():
        try:
            config, options = parse_cli(argv, CONFIG)
        except ValueError as error:  # a malformed flag or override
            raise ConfigError(str(error)) from None
        unknown = sorted(set(options) - {"config", "image_sizes", "context"})
        if unknown:
            raise ConfigError(f"unknown flag(s) {unknown}; flags: config, image_sizes, context")
        sizes = [int(s) for s in options.get("image_sizes", "").split(",") if s]
        context = int(options["context"]) if "context" in options else None
        rows = budget_rows(config, sizes, context)
    for row in rows:
        print(json.dumps(row))
    print(table(rows))


if __name__ == "__main__":
    main()
