"""python -m vlm_jax.generate on a text-only "lm" run (configs/lm_shapes.py, trained 4 steps):
--prompt_ids/--print_ids give the ids of a greedy decode without the KV cache (the whole
sequence re-run per token), --prompt the same ids as its tokenizer's encoding."""

import jax.numpy as jnp
import numpy as np
import pytest
from compile_cache import compilation_cache  # noqa: F401 (autouse: compiles go through the cache)
from conftest import tiny_lm_config

from vlm_jax.checkpoint import load_params
from vlm_jax.data import build_tokenizer
from vlm_jax.generate import main
from vlm_jax.models.vlm import build_decoder_lm
from vlm_jax.train.trainer import train

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lm")
    config = tiny_lm_config()
    train(config, workdir)
    return workdir, config


def greedy_without_cache(config, params, prompt: list[int], tokenizer) -> list[int]:
    """Argmax over the tokenizer's ids (the embedding has padded rows past them)."""
    model = build_decoder_lm(config.model)
    assert config.model.lm.vocab_size > tokenizer.vocab_size
    ids = list(prompt)
    for _ in range(NEW_TOKENS):
        logits, _ = model.apply({"params": params}, jnp.asarray([ids]))
        ids.append(int(jnp.argmax(logits[0, -1, : tokenizer.vocab_size])))
        if ids[-1] == tokenizer.eos_id:
            break
    return ids[len(prompt) :]


def cli_ids(capsys, *flags) -> list[int]:
    main([*flags, "--print_ids", "--max_new_tokens", str(NEW_TOKENS)])
    return [int(i) for i in capsys.readouterr().out.strip().split(",")]


def test_cli_ids_equal_a_greedy_decode_without_cache(lm_run, capsys):
    workdir, config = lm_run
    tokenizer = build_tokenizer(config.tokenizer)
    params = load_params(workdir)
    prompt = tokenizer.prompt_ids("a small red circle")
    expected = greedy_without_cache(config, params, prompt, tokenizer)
    flags = ["--workdir", str(workdir)]
    assert cli_ids(capsys, *flags, "--prompt_ids", ",".join(map(str, prompt))) == expected
    assert cli_ids(capsys, *flags, "--prompt", "a small red circle") == expected
    main([*flags, "--prompt", "a small red circle", "--max_new_tokens", str(NEW_TOKENS)])
    text = capsys.readouterr().out.strip()
    assert text == tokenizer.decode(np.asarray(expected))


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--prompt_ids", "1,x"], "--prompt_ids='x': expected an int"),
        (["--prompt_ids", "1", "--prompt", "a"], "missing exactly one of --prompt, --prompt_ids"),
        (["--prompt_ids", "1", "--chat"], "--chat renders a --prompt; it does not apply"),
        (["--prompt", "a", "--print_ids=maybe"], "--print_ids='maybe': expected a bool"),
    ],
)
def test_bad_flags_give_one_error_line_and_exit_2(flags, problem, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--workdir", "w", *flags])
    assert info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {problem}")


def test_bad_ids_and_chat_without_template_are_named(lm_run, capsys):
    workdir, config = lm_run
    vocab = build_tokenizer(config.tokenizer).vocab_size
    for flags, problem in [
        (["--prompt_ids", f"1,{vocab}"], f"--prompt_ids: [{vocab}]: need at least one id"),
        (["--prompt", "a", "--chat"], "the tokenizer has no chat template"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(["--workdir", str(workdir), *flags])
        assert info.value.code == 2
        assert f"error: {problem}" in capsys.readouterr().err
