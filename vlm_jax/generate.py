"""Greedy and sampled decoding with the KV cache; the image + prompt prefix is encoded once.

    tokens = generate(model, variables, images, prompt, prompt_lengths, max_new_tokens=8,
                      eos_id=tokenizer.eos_id)                      # int32[B, max_new_tokens]

The whole loop (prefill, then one `decode_step` per token in a `lax.while_loop` that stops
when every row has emitted EOS) is one jitted function. After EOS a row emits `pad_id`.

CLI: `python -m vlm_jax.generate --workdir DIR --image PATH --prompt "..."` loads the run's
config.json and newest checkpoint and prints the answer.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


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


def main(argv: Sequence[str] | None = None) -> None:
    """`--workdir DIR --image PATH --prompt TEXT [--max_new_tokens N] [--temperature T]`."""
    from vlm_jax.train.vlm_task import answer_from_checkpoint

    args = _parse(sys.argv[1:] if argv is None else argv)
    missing = {"workdir", "image", "prompt"} - set(args)
    if missing:
        print(
            f"error: missing {sorted(missing)}; usage: python -m vlm_jax.generate --workdir DIR "
            '--image PATH --prompt "..." [--max_new_tokens N] [--temperature T]',
            file=sys.stderr,
        )
        raise SystemExit(2)
    print(
        answer_from_checkpoint(
            args["workdir"],
            args["image"],
            args["prompt"],
            max_new_tokens=int(args.get("max_new_tokens", 16)),
            temperature=float(args.get("temperature", 0.0)),
        )
    )


def _parse(argv: Sequence[str]) -> dict[str, str]:
    args, i = {}, 0
    while i < len(argv):
        name, eq, value = argv[i].removeprefix("--").partition("=")
        if not eq:
            i += 1
            value = argv[i] if i < len(argv) else ""
        args[name] = value
        i += 1
    return args


if __name__ == "__main__":
    main()
