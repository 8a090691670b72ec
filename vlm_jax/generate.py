"""Greedy and sampled decoding with the KV cache; the image + prompt prefix is encoded once.

    tokens = generate(model, variables, images, prompt, prompt_lengths, max_new_tokens=8,
                      eos_id=tokenizer.eos_id)                      # int32[B, max_new_tokens]

The whole loop (prefill, then one `decode_step` per token in a `lax.while_loop` that stops
when every row has emitted EOS) is one jitted function. After EOS a row emits `pad_id`.

`answer_from_checkpoint(workdir, image_path, prompt)` answers with a trained "vlm" run: its
config.json and newest intact checkpoint. The CLI prints that answer:
`python -m vlm_jax.generate --workdir DIR --image PATH --prompt "..." [--max_new_tokens N]
[--temperature T] [--top_k K]`; any other flag exits 2 listing the valid ones.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.config import MissingInput, parse_float, parse_int, split_flags
from vlm_jax.platforms import choose_backend


def pick_tokens(
    logits: jax.Array,
    rng: jax.Array,
    temperature: float = 0.0,
    top_k: int = 0,
    vocab_size: int | None = None,
) -> jax.Array:
    """float32[B, V] -> int32[B]: argmax when temperature == 0, else a (top-k) sample.

    Ids >= `vocab_size` (embedding rows padded past the tokenizer's vocabulary) never win.
    """
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "max_new_tokens",
        "eos_id",
        "pad_id",
        "temperature",
        "top_k",
        "vocab_size",
    ),
)
def generate(
    model: nn.Module,
    variables,
    images: jax.Array,
    prompt: jax.Array,
    prompt_lengths: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    vocab_size: int | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Continue each right-padded prompt int32[B, P] -> int32[B, max_new_tokens]."""
    rng = jax.random.key(0) if rng is None else rng
    logits, cache, media = model.apply(
        variables, images, prompt, prompt_lengths, max_new_tokens, method="prefill"
    )
    batch = prompt.shape[0]
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, logits, cache, done, out = carry
        step_rng = jax.random.fold_in(rng, step)
        token = pick_tokens(logits, step_rng, temperature, top_k, vocab_size)
        token = jnp.where(done, pad_id, token)
        out = out.at[:, step].set(token)
        done = done | (token == eos_id)
        logits, cache = model.apply(variables, token[:, None], cache, media, method="decode_step")
        return step + 1, logits, cache, done, out

    *_, out = jax.lax.while_loop(cond, body, (jnp.int32(0), logits, cache, done, out))
    return out


def answer_from_checkpoint(
    workdir: str, image_path: str, prompt: str, *, max_new_tokens=16, temperature=0.0, top_k=0
) -> str:
    """Answer `prompt` about the image at `image_path` with a trained "vlm" run (greedy when
    temperature is 0; else sampled, from the top_k likeliest tokens when top_k > 0)."""
    import ml_collections
    import numpy as np
    from PIL import Image

    from vlm_jax.checkpoint import load_params
    from vlm_jax.data import preprocess
    from vlm_jax.data.vqa import IMAGE_PLACEHOLDER, TEMPLATE, build_vqa_tokenizer, encode_example
    from vlm_jax.models.vlm import build_vlm

    config = ml_collections.ConfigDict(json.loads((Path(workdir) / "config.json").read_text()))
    tokenizer = build_vqa_tokenizer(config.tokenizer)
    if not 0 <= top_k <= tokenizer.vocab_size:
        raise ValueError(f"top_k={top_k}: must be in [0, {tokenizer.vocab_size}] (the vocabulary)")
    model = build_vlm(config.model)
    params = load_params(workdir)
    if IMAGE_PLACEHOLDER not in prompt:
        prompt = TEMPLATE.format(images=IMAGE_PLACEHOLDER, question=prompt)
    image = np.asarray(Image.open(image_path).convert("RGB"))
    image = preprocess.to_float(preprocess.fit_image(image, config.data.image_size))
    example = encode_example(tokenizer, prompt, None, config.tokenizer.max_len)
    out = generate(
        model,
        {"params": params},
        jnp.asarray(image[None, None]),
        jnp.asarray(example["tokens"][None]),
        jnp.asarray(example["prefix_len"][None]),
        max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        temperature=temperature,
        top_k=top_k,
        vocab_size=tokenizer.vocab_size,
        rng=jax.random.key(0),
    )
    return tokenizer.decode(np.asarray(out[0]))


# --flag: (parse(flag, text) -> value, default or REQUIRED, usage text)
REQUIRED = object()
FLAGS = {
    "workdir": (lambda _, text: text, REQUIRED, "DIR"),
    "image": (lambda _, text: text, REQUIRED, "PATH"),
    "prompt": (lambda _, text: text, REQUIRED, '"..."'),
    "max_new_tokens": (parse_int, 16, "N (default 16)"),
    "temperature": (parse_float, 0.0, "T (default 0: greedy)"),
    "top_k": (parse_int, 0, "K (sample from the K likeliest; default 0: all)"),
}
USAGE = "usage: python -m vlm_jax.generate " + " ".join(
    f"--{name} {text}" if default is REQUIRED else f"[--{name} {text}]"
    for name, (_, default, text) in FLAGS.items()
)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the answer of the run in --workdir; a bad flag exits 2 naming the valid ones."""
    choose_backend()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as error:
        print(f"error: {error}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2) from None
    from vlm_jax.config import exit_on_user_error

    with exit_on_user_error():
        check_paths(args["workdir"], args["image"])
        answer = answer_from_checkpoint(
            args.pop("workdir"), args.pop("image"), args.pop("prompt"), **args
        )
    print(answer)


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """`--name=value` / `--name value` -> {name: typed value} for every name in FLAGS."""
    given = dict(split_flags(argv))
    unknown = sorted(set(given) - set(FLAGS))
    if unknown:
        valid = ", ".join(f"--{name}" for name in FLAGS)
        raise ValueError(f"unknown flag(s) {', '.join('--' + n for n in unknown)}; flags: {valid}")
    missing = [
        f"--{n}" for n, (_, default, _) in FLAGS.items() if default is REQUIRED and n not in given
    ]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    args = {
        name: parse(f"--{name}", given[name]) if name in given else default
        for name, (parse, default, _) in FLAGS.items()
    }
    _check_at_least("--max_new_tokens", args["max_new_tokens"], 1)
    _check_at_least("--temperature", args["temperature"], 0.0)
    _check_at_least("--top_k", args["top_k"], 0)
    return args


def check_paths(workdir: str, image: str) -> None:
    """MissingInput before any model is built: --workdir must be a run (its config.json; its
    checkpoints are checked when loaded) and --image a file."""
    if not (Path(workdir) / "config.json").is_file():
        raise MissingInput(
            f"--workdir {workdir!r} is not a training run: expected {workdir}/config.json (and "
            "checkpoints/), as python -m vlm_jax.train writes them"
        )
    if not Path(image).is_file():
        raise MissingInput(f"--image {image!r} does not exist: expected an image file")


def _check_at_least(flag: str, value: float, low: float) -> None:
    if not low <= value < math.inf:
        raise ValueError(f"{flag}={value}: must be >= {low} and finite")


if __name__ == "__main__":
    main()
