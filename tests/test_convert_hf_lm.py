"""HuggingFace decoder LMs (Llama, Mistral, Qwen2/3, Gemma 1/2/3) -> vlm_jax and back, offline.

Tiny random-weight transformers models with unusual sizes (odd head counts, GQA ratios 1/3/8,
head_dim != width / heads, tied and untied embeddings, rope theta 1e6, RoPE scaling, sliding
windows shorter than the prompts, soft-capping) are saved with save_pretrained and converted
with the CLI. The converted LM must give transformers' logits to 1e-4 on a right-padded batch,
generate the same 24 greedy tokens with our KV cache as `model.generate`, and export back to a
release whose transformers logits equal ours.
"""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_cache import compilation_cache  # noqa: F401 (autouse: compiles go through the cache)

from vlm_jax.convert import __main__ as convert_cli
from vlm_jax.convert import common
from vlm_jax.convert.torch_compat import ensure_torchvision
from vlm_jax.generate import generate
from vlm_jax.models import build_model

VOCAB = 263
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=1e6,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
GEMMA2 = dict(query_pre_attn_scalar=20, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
# name: (transformers config class, its keys); two layers, vocab 263 (the run's bytes fit).
CASES = {
    "llama3": ("LlamaConfig", dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                                   head_dim=20, tie_word_embeddings=False,
                                   rope_parameters=LLAMA3_ROPE)),
    "llama_linear": ("LlamaConfig", dict(hidden_size=40, num_attention_heads=8,
                                         num_key_value_heads=1, head_dim=8,
                                         tie_word_embeddings=True, rms_norm_eps=1e-5,
                                         rope_parameters=dict(rope_type="linear", factor=2.5,
                                                              rope_theta=1e6))),
    "qwen2": ("Qwen2Config", dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=5,
                                  tie_word_embeddings=True,
                                  rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "mistral": ("MistralConfig", dict(hidden_size=56, num_attention_heads=6,
                                      num_key_value_heads=2, head_dim=12, sliding_window=4,
                                      tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(hidden_size=36, num_attention_heads=3, num_key_value_heads=1,
                                  head_dim=10, tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", dict(hidden_size=40, num_attention_heads=3, num_key_value_heads=1,
                                  head_dim=16)),
    "gemma2": ("Gemma2Config", dict(hidden_size=44, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=12, sliding_window=4, **GEMMA2)),
    "gemma3": ("Gemma3TextConfig", dict(
        hidden_size=36, num_attention_heads=6, num_key_value_heads=2, head_dim=10,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=12, final_logit_softcapping=4.0,
        rope_parameters=dict(full_attention=dict(rope_type="linear", factor=2.0, rope_theta=1e6),
                             sliding_attention=dict(rope_type="default", rope_theta=1e4)))),
}  # fmt: skip
LENGTHS = (9, 4, 7)  # prompts of a right-padded batch; longer than the sliding windows
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def torch():
    ensure_torchvision()
    import torch

    torch.manual_seed(0)
    return torch


def build_hf(case: str, torch, vocab: int = VOCAB):
    """A random transformers causal LM of `case`, every tensor perturbed (norm weights, biases
    and all: HF's 1/0 initialisation would hide a swapped or transposed tensor)."""
    import transformers

    config_class, keys = CASES[case]
    config = getattr(transformers, config_class)(
        vocab_size=vocab,
        intermediate_size=52,
        num_hidden_layers=2,
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        attn_implementation="eager",
        **keys,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def prompts(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompts int32[B, P] (pad 0) and their lengths int32[B]."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (len(LENGTHS), max(LENGTHS))).astype(np.int32)
    lengths = np.asarray(LENGTHS, np.int32)
    tokens[np.arange(tokens.shape[1]) >= lengths[:, None]] = 0
    return tokens, lengths


def hf_logits(model, torch, tokens, lengths) -> np.ndarray:
    mask = (np.arange(tokens.shape[1]) < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        out = model(torch.as_tensor(tokens, dtype=torch.long), attention_mask=torch.as_tensor(mask))
    return out.logits.float().numpy()


def load_run(run):
    params, config = common.load_converted(run)
    return build_model(config.model), jax.tree.map(jnp.asarray, params)


def assert_logits_match(ours, theirs, lengths) -> None:
    for row, length in enumerate(lengths):  # the pads' own logits are nobody's
        np.testing.assert_allclose(ours[row, :length], theirs[row, :length], atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=list(CASES))
def release(request, torch, tmp_path_factory):
    """(HF model, the case's directory: hf/ the release, run/ its conversion)."""
    directory = tmp_path_factory.mktemp(request.param)
    model = build_hf(request.param, torch)
    model.save_pretrained(directory / "hf")
    convert_cli.main(
        ["--from", "hf", "--src", str(directory / "hf"), "--out", str(directory / "run")]
    )
    return model, directory


def test_logits_match_transformers_on_a_padded_batch_and_after_export(release, torch):
    import transformers

    model, directory = release
    tokens, lengths = prompts()
    lm, params = load_run(directory / "run")
    ours = np.asarray(lm.apply({"params": params}, jnp.asarray(tokens))[0])
    assert_logits_match(ours, hf_logits(model, torch, tokens, lengths), lengths)

    convert_cli.main(
        ["--to", "hf", "--src", str(directory / "run"), "--out", str(directory / "back")]
    )
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        directory / "back", attn_implementation="eager"
    ).eval()
    assert type(exported) is type(model)
    assert_logits_match(ours, hf_logits(exported, torch, tokens, lengths), lengths)


def test_greedy_generation_with_the_kv_cache_matches_transformers_generate(release, torch):
    model, directory = release
    tokens, lengths = prompts(seed=1)
    lm, params = load_run(directory / "run")
    ours = generate(
        lm,
        {"params": params},
        None,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        max_new_tokens=NEW_TOKENS,
        eos_id=-1,
    )
    for row, length in enumerate(lengths):  # transformers unpadded, one prompt at a time
        prompt = torch.as_tensor(tokens[row : row + 1, :length], dtype=torch.long)
        with torch.no_grad():
            theirs = model.generate(
                prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
            )
        assert np.asarray(ours[row]).tolist() == theirs[0, length:].tolist(), f"row {row}"


@pytest.fixture(scope="module")
def llama_release(torch, tmp_path_factory):
    """A saved tiny Llama's (config dict, tensors) to damage."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    directory = tmp_path_factory.mktemp("llama_bad")
    build_hf("llama_linear", torch).save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    return config, dict(safetensors_numpy.load_file(str(directory / "model.safetensors")))


def write_release(directory, config: dict, tensors: dict) -> str:
    import safetensors.numpy

    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
    return str(directory)


Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c, t: t.pop(Q_PROJ), f"missing key '{Q_PROJ}'"),
        (lambda c, t: t.update({Q_PROJ: t[Q_PROJ][:-8]}), f"key '{Q_PROJ}' has shape \\(56, 40\\)"),
        (lambda c, t: t.update(extra=t[Q_PROJ]), "unexpected key 'extra'"),
        (
            lambda c, t: c.update(model_type="gpt2"),
            "model_type='gpt2' is not one of: clip, .*llama",
        ),
        (
            lambda c, t: c.update(rope_parameters=dict(rope_type="yarn", factor=4.0)),
            "rope_scaling type='yarn' is not supported; supported: default, linear, llama3",
        ),
        (lambda c, t: c.update(attention_bias=True), "attention_bias=True is not supported"),
        (lambda c, t: c.update(hidden_act="relu"), "hidden_act='relu' is not supported"),
    ],
    ids=["missing", "misshaped", "unexpected", "model_type", "yarn", "attention_bias", "act"],
)
def test_a_bad_release_fails_naming_the_tensor_or_option(llama_release, tmp_path, damage, message):
    config, tensors = json.loads(json.dumps(llama_release[0])), dict(llama_release[1])
    damage(config, tensors)
    src = write_release(tmp_path / "hf", config, tensors)
    with pytest.raises(common.ConversionError, match=message):
        convert_cli.main(["--from", "hf", "--src", src, "--out", str(tmp_path / "run")])


def test_the_run_is_an_lm_run_whose_params_an_lm_task_loads(release):
    """config.json of task "lm" (what init.lm_checkpoint and the trainer read), the decoder's
    params at the top level, and the model section building the same decoder."""
    from vlm_jax.train.validate import validate_config

    directory = release[1]
    run = json.loads((directory / "run" / "config.json").read_text())
    assert run["task"] == "lm" and run["model"]["name"] == "decoder_lm"
    params, config = common.load_converted(directory / "run")
    validate_config(config)
    assert "embedder" in params and "blocks_1" in params


def test_a_release_with_its_tokenizer_generates_through_the_cli_as_transformers(
    torch, tmp_path, capsys
):
    """A release as users download it (weights, config, tokenizer.json and its config):
    converted, the run reads the release's tokenizer (copied into it), and `python -m
    vlm_jax.generate --prompt ... --print_ids` prints the ids transformers generates."""
    import transformers
    from test_tokenizers_hf import bpe_release

    from vlm_jax import generate

    src = bpe_release(tmp_path / "release")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    model = build_hf("llama3", torch, vocab=len(hf_tokenizer))
    model.save_pretrained(src)  # its generation_config.json (no eos) replaces the tokenizer's
    run = tmp_path / "run"
    convert_cli.main(["--from", "hf", "--src", str(src), "--out", str(run)])
    assert json.loads((run / "config.json").read_text())["tokenizer"]["name"] == "hf"
    shutil.rmtree(src)  # the run keeps its own copy of the tokenizer

    prompt = "Hello world, the quick fox"
    generate.main(["--workdir", str(run), "--prompt", prompt, "--print_ids",
                   "--max_new_tokens", "12"])  # fmt: skip
    ours = [int(i) for i in capsys.readouterr().out.strip().split(",")]
    ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(  # the mask given: HF would take BOS (id 0 = its pad id) for pad
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=hf_tokenizer.eos_token_id,
        )
    theirs = out[0, ids.shape[1] :].tolist()
    ends = [n + 1 for n, i in enumerate(theirs) if i == hf_tokenizer.eos_token_id]
    assert ours == theirs[: ends[0] if ends else 12]


def test_a_tokenizer_larger_than_the_embedding_is_refused(torch, tmp_path):
    from test_tokenizers_hf import bpe_release

    src = bpe_release(tmp_path / "release")  # 300 ids
    build_hf("llama3", torch, vocab=64).save_pretrained(src)
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.cli(["--from", "hf", "--src", str(src), "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_a_lora_run_exports_its_merged_model(torch, tmp_path):
    """`convert --to hf` of a run with LoRA adapters (optim.lora) writes W + alpha/r A B: the
    exported release's logits equal the adapted model's (interceptor, eval mode)."""
    import ml_collections
    import transformers

    from vlm_jax.convert import hf_lm
    from vlm_jax.models import lora

    build_hf("llama3", torch).save_pretrained(tmp_path / "hf")
    convert_cli.main(
        ["--from", "hf", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]
    )
    base, config = common.load_converted(tmp_path / "run")
    config.optim.lora = ml_collections.ConfigDict(
        dict(
            rank=2,
            alpha=4.0,
            dropout=0.0,
            targets=r"blocks_\d+/attn/(query|value)/kernel",
            train=[],
        )
    )
    section = lora.lora_section(config.optim)
    rng = np.random.default_rng(0)
    adapters = {}
    for block in (k for k in base if k.startswith("blocks_")):
        for name in ("query", "value"):
            kernel = np.asarray(base[block]["attn"][name]["kernel"])  # [width, heads, head_dim]
            a = rng.normal(0, 0.1, (kernel.shape[0], 2)).astype(np.float32)
            b = rng.normal(0, 0.1, (2, *kernel.shape[1:])).astype(np.float32)
            adapters.setdefault(block, {"attn": {}})["attn"][name] = {"lora_a": a, "lora_b": b}
    params = lora.join_adapters(base, adapters)
    hf_lm.export(tmp_path / "run", tmp_path / "back", params, config)

    tokens, lengths = prompts()
    model = build_model(config.model)
    with lora.adapted(section):
        ours = np.asarray(model.apply({"params": jax.tree.map(jnp.asarray, params)}, tokens)[0])
    plain = np.asarray(model.apply({"params": jax.tree.map(jnp.asarray, base)}, tokens)[0])
    assert not np.allclose(ours, plain, atol=1e-3)  # the adapters change the model
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "back", attn_implementation="eager"
    ).eval()
    assert_logits_match(ours, hf_logits(exported, torch, tokens, lengths), lengths)


# release tokenizer kind: the LM case (untied and tied embeddings). A Llama, as transformers'
# AutoTokenizer reads a Llama release's own tokenizer files (for qwen2 it imposes its class).
VLM_RELEASES = {"bpe": "llama3", "sentencepiece": "llama_linear"}
PADDING_ROWS = 3  # past <image>, as configs/llava.py pads 32,001 ids to 32,064 rows


@pytest.fixture(scope="module", params=list(VLM_RELEASES))
def vlm_run(request, torch, tmp_path_factory):
    """A "vlm" run whose LM is a release's (init.lm_checkpoint: its conversion) with the release
    tokenizer: init grows `<image>` (the next free id) and PADDING_ROWS rows past the release's,
    which are then set to random values (as training leaves them) -> (the run's directory, its
    config and LM params, the release's directory and rows)."""
    import ml_collections
    import transformers
    from conftest import tiny_vlm_config
    from test_tokenizers_hf import bpe_release, sentencepiece_release
    from test_vlm_train import save_params_steps

    from vlm_jax import sharding
    from vlm_jax.data.vqa import run_tokenizer
    from vlm_jax.train.tasks.vlm import VLMTask
    from vlm_jax.train.trainer import init_params, to_json

    directory = tmp_path_factory.mktemp(f"vlm_{request.param}")
    make = bpe_release if request.param == "bpe" else sentencepiece_release
    release = make(directory / "release")
    rows = len(transformers.AutoTokenizer.from_pretrained(release))
    build_hf(VLM_RELEASES[request.param], torch, vocab=rows).save_pretrained(release)
    convert_cli.main(["--from", "hf", "--src", str(release), "--out", str(directory / "lm")])
    _, lm_config = common.load_converted(directory / "lm")
    config = tiny_vlm_config(**{"init.lm_checkpoint": str(directory / "lm")})
    with config.unlocked():
        config.tokenizer = lm_config.tokenizer
        config.model.lm = ml_collections.ConfigDict(
            dict(lm_config.model.lm, vocab_size=rows + 1 + PADDING_ROWS)
        )
        config.model.image_token_id, config.model.pad_id = rows, run_tokenizer(config).pad_id
    mesh = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    task = VLMTask(config, mesh)
    with jax.set_mesh(mesh):
        params, _ = init_params(task, config, mesh)
        params = jax.tree.map(np.array, task.load_pretrained(params))  # writable
    rng = np.random.default_rng(0)
    table = params["lm"]["embedder"]["embedding"]  # float[rows + 1 + PADDING_ROWS, width]
    table[rows:] = rng.normal(0, 0.5, table[rows:].shape)
    if "unembed" in params["lm"]:
        kernel = params["lm"]["unembed"]["kernel"]  # float[width, rows + 1 + PADDING_ROWS]
        kernel[:, rows:] = rng.normal(0, 0.5, kernel[:, rows:].shape)
    (directory / "vlm").mkdir()
    (directory / "vlm" / "config.json").write_text(to_json(config))
    save_params_steps(directory / "vlm" / "checkpoints", {1: params})
    return directory / "vlm", config, params["lm"], release, rows


@pytest.mark.parametrize("added_rows", ["drop", "keep"])
def test_a_vlms_lm_exports_with_or_without_the_vocabulary_it_added(vlm_run, torch, added_rows):
    """`--to hf --added_rows drop` writes the release's vocab_size and tokenizer back, `keep`
    every row and the tokenizer with `<image>`: transformers loads either, its tokenizer gives
    the ids of ours (the release's, or the VLM's), and its logits equal our LM's on the ids
    that remain."""
    import transformers
    from test_tokenizers_hf import TEXTS

    from vlm_jax.data.vqa import run_tokenizer
    from vlm_jax.models.vlm import build_decoder_lm

    run, config, lm_params, release, rows = vlm_run
    back = run.parent / f"back_{added_rows}"
    convert_cli.main(["--to", "hf", "--src", str(run), "--out", str(back),
                      "--added_rows", added_rows])  # fmt: skip

    exported = transformers.AutoModelForCausalLM.from_pretrained(
        back, attn_implementation="eager"
    ).eval()
    kept = rows if added_rows == "drop" else rows + 1 + PADDING_ROWS
    assert exported.config.vocab_size == kept
    theirs = transformers.AutoTokenizer.from_pretrained(back)
    if added_rows == "keep":  # the VLM's tokenizer: <image> = rows
        ours, want = run_tokenizer(config), {"<image>": rows}
        assert ours.special_tokens["<image>"] == rows
    else:
        ours, want = transformers.AutoTokenizer.from_pretrained(release), {}
    for text in TEXTS:
        want_ids = ours.encode(text) if want else ours(text, add_special_tokens=False)["input_ids"]
        assert theirs(text, add_special_tokens=False)["input_ids"] == want_ids, repr(text)
    assert len(theirs) == rows + len(want)
    assert {t: theirs.convert_tokens_to_ids(t) for t in want} == want

    tokens, lengths = prompts()
    tokens[0, 2], tokens[1, 1] = kept - 1, min(rows, kept - 1)  # a padding row and <image>
    lm = build_decoder_lm(config.model)
    ours_logits = lm.apply({"params": jax.tree.map(jnp.asarray, lm_params)}, tokens)[0]
    theirs_logits = hf_logits(exported, torch, tokens, lengths)
    assert_logits_match(np.asarray(ours_logits)[..., :kept], theirs_logits, lengths)


def test_dropping_needs_the_vocab_size_of_the_lm_the_vlm_grew_from(vlm_run, tmp_path):
    """The run's config.init.lm_checkpoint says how many rows the release had; where that run
    is gone, `drop` fails naming it and the way out."""
    from vlm_jax.convert import hf_lm

    params, config = common.load_converted(vlm_run[0])  # a training workdir's init is kept
    assert config.init.lm_checkpoint == vlm_run[1].init.lm_checkpoint
    config.init.lm_checkpoint = str(tmp_path / "moved")
    with pytest.raises(common.ConversionError, match=r"moved' has no config.json.*added_rows keep"):
        hf_lm.export(vlm_run[0], tmp_path / "back", params, config)


def test_a_bad_added_rows_value_is_refused_naming_the_choices(tmp_path, capsys):
    from vlm_jax.convert import hf

    with pytest.raises(SystemExit) as exit_info:
        convert_cli.cli(["--to", "hf", "--src", str(tmp_path), "--out", str(tmp_path / "back"),
                         "--added_rows", "all"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # Python 3.12+ quotes the choices, 3.11 does not
    assert re.search(r"--added_rows: invalid choice: 'all' \(choose from '?drop'?, '?keep'?\)", err)
    with pytest.raises(ValueError, match="added_rows='all' is not one of: drop, keep"):
        hf.export(tmp_path, tmp_path / "back", added_rows="all")


@pytest.mark.parametrize("mesh_shape", [(1, 2, 2), (2, 2, 2)])
def test_an_imported_lm_sharded_over_fsdp_and_tensor_equals_unsharded(torch, tmp_path, mesh_shape):
    """A converted Mistral (GQA 6/2, sliding window) on 4 and 8 CPU devices: params split by the
    default rules (embed over fsdp; heads, kv_heads, mlp, vocab over tensor), the batch over
    data x fsdp: logits and the loss's gradients equal the one-device model's."""
    import flax.linen as nn

    from vlm_jax import sharding

    build_hf("mistral", torch, vocab=264).save_pretrained(tmp_path / "hf")
    convert_cli.main(
        ["--from", "hf", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]
    )
    params, config = common.load_converted(tmp_path / "run")
    model = build_model(config.model)
    tokens = np.random.default_rng(0).integers(1, 264, (4, 9)).astype(np.int32)

    def loss(p, t):
        logits, _ = model.apply({"params": p}, t)
        labels = jax.nn.one_hot(t[:, 1:], logits.shape[-1])
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits[:, :-1]) * labels, -1)), logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    one = sharding.build_mesh((1, 1, 1), jax.devices()[:1])
    with jax.set_mesh(one):
        (want_loss, want_logits), want_grads = step(jax.tree.map(jnp.asarray, params), tokens)
    mesh = sharding.build_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    rules = tuple(config.sharding.rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
        shardings = sharding.logical_shardings(boxed, mesh, rules)
        placed = jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), params, shardings)
        assert any(len(s.device_set) > 1 and not s.is_fully_replicated
                   for s in jax.tree.leaves(shardings))  # fmt: skip
        batch = jax.device_put(tokens, sharding.batch_sharding(mesh, 2))
        (got_loss, got_logits), got_grads = step(placed, batch)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), got_grads, want_grads
    )
