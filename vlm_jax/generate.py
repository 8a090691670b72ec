"""Greedy and sampled decoding with the KV cache; the (image +) prompt prefix is encoded once.

    tokens = generate(model, variables, images, prompt, prompt_lengths, max_new_tokens=8,
                      eos_id=tokenizer.stop_ids())                  # int32[B, max_new_tokens]

The whole loop (prefill, then one `decode_step` per token in a `lax.while_loop` that stops
when every row has emitted a stop id) is one jitted function; after it a row emits `pad_id`.
`model` is a VLM (its `prefill` reads the prompt as a bidirectional prefix after the images, as
the "vlm" task trains it) or a text-only DecoderLM (the prompt read causally, as an LM reads it).

The CLI continues a prompt with a trained or imported run (its config.json and newest intact
checkpoint), a "vlm" run (--image) or a text-only "decoder_lm" run:

    python -m vlm_jax.generate --workdir DIR (--prompt "..." | --prompt_ids 1,2,3) [--image PATH]
        [--chat] [--print_ids] [--max_new_tokens N] [--temperature T] [--top_k K]

--chat renders the prompt as one user turn through the tokenizer's chat template (a release's,
vlm_jax.data.chat_template) with the generation prompt; --prompt_ids gives the ids themselves and
--print_ids prints the generated ids (comma-separated, up to and with the stop id) instead of the
text, for token-exact comparisons. A bad flag exits 2 with one `error:` line and the usage.
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

from vlm_jax.config import (
    MissingInput,
    UserError,
    exit_on_help,
    parse_bool,
    parse_float,
    parse_int,
    split_flags,
)
from vlm_jax.platforms import choose_backend

GENERATING_MODELS = ("decoder_lm", "vlm")  # the model.name of runs the CLI continues


class BadPrompt(UserError, ValueError):
    """Prompt ids that the run's vocabulary does not hold (the CLI exits 2 on it)."""


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
    eos_id: int | tuple[int, ...],
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    vocab_size: int | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Continue each right-padded prompt int32[B, P] -> int32[B, max_new_tokens]; `eos_id`:
    the stop id, or all of them (a release's generation config may name several)."""
    rng = jax.random.key(0) if rng is None else rng
    stop_ids = jnp.asarray(eos_id, jnp.int32).reshape(-1)
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
        done = done | jnp.isin(token, stop_ids)
        logits, cache = model.apply(variables, token[:, None], cache, media, method="decode_step")
        return step + 1, logits, cache, done, out

    *_, out = jax.lax.while_loop(cond, body, (jnp.int32(0), logits, cache, done, out))
    return out


def load_run(workdir: str):
    """(config, tokenizer, model, params) of a "decoder_lm" or "vlm" run at `workdir`."""
    import ml_collections

    from vlm_jax.checkpoint import load_params
    from vlm_jax.data.vqa import run_tokenizer
    from vlm_jax.models import lora
    from vlm_jax.models.vlm import build_decoder_lm, build_vlm
    from vlm_jax.models.vocab import check_vocab_rows, vocab_rows

    config = ml_collections.ConfigDict(json.loads((Path(workdir) / "config.json").read_text()))
    name = config.model.get("name")
    if name not in GENERATING_MODELS:
        raise MissingInput(
            f"--workdir {workdir!r} is a model.name={name!r} run; generation needs one of: "
            + ", ".join(GENERATING_MODELS)
        )
    tokenizer = run_tokenizer(config)
    model = build_vlm(config.model) if name == "vlm" else build_decoder_lm(config.model)
    # A LoRA run's adapters merged into their kernels (W + alpha/r A B): a plain model.
    params = lora.merged(load_params(workdir), lora.lora_section(config.optim))
    lm_params = params["lm"] if name == "vlm" else params
    check_vocab_rows(f"the embedding of {workdir}", vocab_rows(lm_params), tokenizer.vocab_size)
    return config, tokenizer, model, params


def prompt_token_ids(config, tokenizer, prompt: str, chat: bool) -> list[int]:
    """The ids of `prompt`: through the chat template (one user turn, generation prompt added;
    the template writes BOS itself), else as the run's task reads a prompt (a VLM's question
    template around `<image>`; an LM's [bos]? text)."""
    from vlm_jax.data.chat_template import render_chat
    from vlm_jax.data.vqa import IMAGE_PLACEHOLDER, TEMPLATE

    is_vlm = config.model.name == "vlm"
    if chat:
        if is_vlm and IMAGE_PLACEHOLDER not in prompt:
            prompt = f"{IMAGE_PLACEHOLDER}\n{prompt}"
        messages = [{"role": "user", "content": prompt}]
        text = render_chat(
            tokenizer.chat_template,
            messages,
            add_generation_prompt=True,
            **tokenizer.template_tokens,
        )
        return tokenizer.encode(text)
    if not is_vlm:
        return tokenizer.prompt_ids(prompt)
    if IMAGE_PLACEHOLDER not in prompt:
        prompt = TEMPLATE.format(images=IMAGE_PLACEHOLDER, question=prompt)
    return tokenizer.encode(prompt)  # as encode_example reads a VQA prompt


def _image_input(config, image_path: str | None):
    """float[1, 1, H, W, 3] of a VLM run's --image; a text-only run's dummy float[1, 0]."""
    if config.model.name != "vlm":
        return jnp.zeros((1, 0), jnp.float32)
    if image_path is None:
        raise MissingInput("a model.name='vlm' run needs --image PATH")
    import numpy as np
    from PIL import Image

    from vlm_jax.data import preprocess

    image = np.asarray(Image.open(image_path).convert("RGB"))
    image = preprocess.to_float(preprocess.fit_image(image, config.data.image_size))
    return jnp.asarray(image[None, None])


def generate_from_run(
    workdir: str,
    *,
    prompt: str | None = None,
    prompt_ids: Sequence[int] | None = None,
    image: str | None = None,
    chat: bool = False,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    top_k: int = 0,
) -> tuple[list[int], Any]:
    """The ids a run generates after `prompt` (or `prompt_ids`), up to and with the first stop
    id, and the run's tokenizer (to read them). Greedy when temperature is 0; else sampled, from
    the top_k likeliest tokens when top_k > 0."""
    import numpy as np

    config, tokenizer, model, params = load_run(workdir)
    if not 0 <= top_k <= tokenizer.vocab_size:
        raise ValueError(f"top_k={top_k}: must be in [0, {tokenizer.vocab_size}] (the vocabulary)")
    if prompt_ids is None:
        prompt_ids = prompt_token_ids(config, tokenizer, prompt, chat)
    bad = [i for i in prompt_ids if not 0 <= i < tokenizer.vocab_size]
    if bad or not prompt_ids:
        raise BadPrompt(
            f"--prompt_ids: {bad or 'none'}: need at least one id, each in "
            f"[0, {tokenizer.vocab_size}) (the run's vocabulary)"
        )
    stop_ids = tokenizer.stop_ids()
    out = generate(
        model,
        {"params": params},
        _image_input(config, image),
        jnp.asarray([list(prompt_ids)], jnp.int32),
        jnp.asarray([len(prompt_ids)], jnp.int32),
        max_new_tokens=max_new_tokens,
        eos_id=stop_ids,
        pad_id=tokenizer.pad_id,
        temperature=temperature,
        top_k=top_k,
        vocab_size=tokenizer.vocab_size,
        rng=jax.random.key(0),
    )
    ids = [int(i) for i in np.asarray(out[0])]
    ends = [n + 1 for n, i in enumerate(ids) if i in stop_ids]
    return ids[: ends[0] if ends else len(ids)], tokenizer


def answer_from_checkpoint(workdir: str, image_path: str | None, prompt: str, **options) -> str:
    """The text a run answers to `prompt` (about the image at `image_path`, for a VLM run)."""
    return text_of(*generate_from_run(workdir, prompt=prompt, image=image_path, **options))


def text_of(ids: Sequence[int], tokenizer) -> str:
    """The text of generated ids, up to the first stop id."""
    stops = [n for n, i in enumerate(ids) if i in tokenizer.stop_ids()]
    return tokenizer.decode(ids[: stops[0] if stops else len(ids)])


def parse_ids(flag: str, text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]."""
    return [parse_int(flag, piece) for piece in text.split(",")]


# --flag: (parse(flag, text) -> value, default or REQUIRED, usage text)
REQUIRED = object()
FLAGS = {
    "workdir": (lambda _, text: text, REQUIRED, "DIR"),
    "prompt": (lambda _, text: text, None, '"..." (or --prompt_ids)'),
    "prompt_ids": (parse_ids, None, "1,2,3"),
    "image": (lambda _, text: text, None, "PATH (a VLM run's)"),
    "chat": (parse_bool, False, ""),
    "print_ids": (parse_bool, False, ""),
    "max_new_tokens": (parse_int, 16, "N (default 16)"),
    "temperature": (parse_float, 0.0, "T (default 0: greedy)"),
    "top_k": (parse_int, 0, "K (sample from the K likeliest; default 0: all)"),
}
SWITCHES = ("chat", "print_ids")  # bare --chat means --chat=true
USAGE = "usage: python -m vlm_jax.generate " + " ".join(
    f"--{name} {text}"
    if default is REQUIRED
    else f"[--{name}]"
    if name in SWITCHES
    else f"[--{name} {text}]"
    for name, (_, default, text) in FLAGS.items()
)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the continuation of the run in --workdir; a bad flag exits 2 naming the valid ones."""
    choose_backend()
    argv = sys.argv[1:] if argv is None else argv
    exit_on_help(argv, USAGE, __doc__)
    try:
        args = parse_args(argv)
    except ValueError as error:
        print(f"error: {error}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2) from None
    from vlm_jax.config import exit_on_user_error

    with exit_on_user_error():
        check_paths(args["workdir"], args["image"])
        print_ids = args.pop("print_ids")
        ids, tokenizer = generate_from_run(args.pop("workdir"), **args)
    if print_ids:
        print(",".join(map(str, ids)))
    else:
        print(text_of(ids, tokenizer))


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """`--name=value` / `--name value` (bare `--chat`, `--print_ids`) -> {name: typed value} for
    every name in FLAGS."""
    argv = [f"{arg}=true" if arg[2:] in SWITCHES else arg for arg in argv]
    given = dict(split_flags(argv))
    unknown = sorted(set(given) - set(FLAGS))
    if unknown:
        valid = ", ".join(f"--{name}" for name in FLAGS)
        raise ValueError(f"unknown flag(s) {', '.join('--' + n for n in unknown)}; flags: {valid}")
    missing = [
        f"--{n}" for n, (_, default, _) in FLAGS.items() if default is REQUIRED and n not in given
    ]
    if ("prompt" in given) == ("prompt_ids" in given):
        missing.append("exactly one of --prompt, --prompt_ids")
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    args = {
        name: parse(f"--{name}", given[name]) if name in given else default
        for name, (parse, default, _) in FLAGS.items()
    }
    if args["chat"] and args["prompt_ids"] is not None:
        raise ValueError("--chat renders a --prompt; it does not apply to --prompt_ids")
    _check_at_least("--max_new_tokens", args["max_new_tokens"], 1)
    _check_at_least("--temperature", args["temperature"], 0.0)
    _check_at_least("--top_k", args["top_k"], 0)
    return args


def check_paths(workdir: str, image: str | None) -> None:
    """MissingInput before any model is built: --workdir must be a run (its config.json; its
    checkpoints are checked when loaded) and --image, if given, a file."""
    if not (Path(workdir) / "config.json").is_file():
        raise MissingInput(
            f"--workdir {workdir!r} is not a training run: expected {workdir}/config.json (and "
            "checkpoints/), as python -m vlm_jax.train writes them"
        )
    if image is not None and not Path(image).is_file():
        raise MissingInput(f"--image {image!r} does not exist: expected an image file")


def _check_at_least(flag: str, value: float, low: float) -> None:
    if not low <= value < math.inf:
        raise ValueError(f"{flag}={value}: must be >= {low} and finite")


if __name__ == "__main__":
    main()
