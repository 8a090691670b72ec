"""Release tokenizers ("hf"): the same ids as transformers' AutoTokenizer, on a BPE tokenizer.json
and a SentencePiece tokenizer.model trained here, each with added special tokens, the VLM's
`<image>` added on top; the release's BOS/EOS/pad/stop conventions; growing and dropping the LM's
vocabulary rows. (Real files a package ships, Mistral's .model files from mistral-common and
CLIP's BPE file from open_clip, are compared in test_tokenizers_real.py.)"""

import json

import ml_collections
import numpy as np
import pytest

from vlm_jax.data.tokenizers import build_tokenizer
from vlm_jax.models.vocab import check_vocab_rows, drop_vocab, grow_vocab, vocab_rows

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog!",
    "caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "numbers 1234 and symbols #$%^&*() and emoji \U0001f600",
    "  spaces\tand\nnewlines  ",
] * 20
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
TEXTS = [
    "Hello world",
    "  two  spaces,   three   ",
    "a\n\nb\tc\r\n",
    "caf\u00e9 \u65e5\u672c \U0001f600 \u00fcber",
    " leading space",
    "",
    "x<|end_of_text|>y",
    "<|begin_of_text|>Hi<|eot_id|> there",
    "<image> what is this?",
    "USER:<image>\nDescribe<image>it",
    "unseen words: zyxwvut qqq",
]


def bpe_release(directory):
    """A byte-level BPE tokenizer.json (Llama-3 style: BOS by the post-processor), trained here."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    return directory


def sentencepiece_release(directory):
    """A SentencePiece BPE tokenizer.model set up as Llama 2's (identity normalization, byte
    fallback, digits split, whitespace kept), with one added token in tokenizer_config.json."""
    import sentencepiece

    directory.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["<tool>"],
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        minloglevel=2,
    )
    added = {"400": {"content": "<|eot_id|>", "special": True}}
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
              "add_bos_token": True, "added_tokens_decoder": added}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def ours(directory, special_tokens=("<image>",), **options):
    config = ml_collections.ConfigDict({"name": "hf", "path": str(directory), "max_len": 32})
    config.update(options)
    return build_tokenizer(config, special_tokens=special_tokens)


def reference(directory):
    """transformers' AutoTokenizer with `<image>` added as a special token."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], True)
    return tokenizer


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def release(request, tmp_path_factory):
    make = bpe_release if request.param == "bpe" else sentencepiece_release
    return make(tmp_path_factory.mktemp("release") / request.param)


def test_same_ids_as_autotokenizer(release):
    tok, ref = ours(release), reference(release)
    assert tok.vocab_size == len(ref)
    assert tok.special_tokens["<image>"] == ref.convert_tokens_to_ids("<image>")
    for text in TEXTS:
        assert tok.prompt_ids(text) == ref(text)["input_ids"], repr(text)
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"], repr(text)


def test_image_token_is_never_split(release):
    tok = ours(release)
    image = tok.special_tokens["<image>"]
    ids = tok.encode("a<image><image>b <image>")
    assert ids.count(image) == 3
    plain = ours(release, special_tokens=())
    assert image not in plain.encode("<image>") and len(plain.encode("<image>")) > 1
    assert tok.vocab_size == plain.vocab_size + 1


def test_bpe_release_conventions_and_decode(tmp_path):
    tok, ref = ours(bpe_release(tmp_path / "bpe")), reference(tmp_path / "bpe")
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (0, 1, True)
    assert tok.pad_id == tok.eos_id  # no pad token in the release: EOS pads
    assert tok.stop_ids() == (1, 2)  # eos, then generation_config's
    assert tok.template_tokens == {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1]}
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.detokenize(ids) == ref.decode(ids) == text
    row = tok.batch_encode(["Hello world"], 32)[0]
    assert row[0] == 0 and tok.decode(row) == "Hello world"
    assert not ours(tmp_path / "bpe", add_bos=False).add_bos


def test_sentencepiece_release_conventions(tmp_path):
    tok = ours(sentencepiece_release(tmp_path / "sp"))
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.add_bos) == (0, 1, 2, 3, True)
    assert tok.special_tokens["<|eot_id|>"] == 400 and tok.special_tokens["<image>"] == 401
    assert tok.stop_ids() == (3,)


def test_bad_releases_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        ours(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        ours(tmp_path / "empty")
    directory = bpe_release(tmp_path / "bpe")
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="eos_token='<|nope|>' is not a token"):
        ours(directory)


def lm_params(vocab: int, width: int = 4, tied: bool = False) -> dict:
    rng = np.random.default_rng(0)
    params = {"embedder": {"embedding": rng.standard_normal((vocab, width), np.float32)},
              "norm_final": {"scale": np.ones(width, np.float32)}}  # fmt: skip
    if not tied:
        params["unembed"] = {"kernel": rng.standard_normal((width, vocab), np.float32)}
    return params


@pytest.mark.parametrize("tied", [True, False])
def test_grow_vocab_adds_mean_rows_and_drop_vocab_undoes_it(tied):
    params = lm_params(7, tied=tied)
    grown = grow_vocab(params, 2)
    assert vocab_rows(grown) == 9
    embedding = np.asarray(grown["embedder"]["embedding"])
    np.testing.assert_array_equal(embedding[:7], params["embedder"]["embedding"])
    np.testing.assert_allclose(embedding[7:], [params["embedder"]["embedding"].mean(0)] * 2, 1e-6)
    if not tied:
        kernel = np.asarray(grown["unembed"]["kernel"])
        np.testing.assert_allclose(kernel[:, 8], params["unembed"]["kernel"].mean(1), 1e-6)
    assert "unembed" not in grown if tied else grown["unembed"]["kernel"].shape == (4, 9)
    back = drop_vocab(grown, 7)
    for a, b in zip(np.asarray(back["embedder"]["embedding"]), params["embedder"]["embedding"]):
        np.testing.assert_array_equal(a, b)
    if not tied:
        np.testing.assert_array_equal(back["unembed"]["kernel"], params["unembed"]["kernel"])
    assert params["embedder"]["embedding"].shape == (7, 4)  # pure: the input is unchanged
    with pytest.raises(ValueError, match=r"vocab_size=10: must be in \[1, 9\]"):
        drop_vocab(grown, 10)


def test_vocabulary_larger_than_the_embedding_fails_naming_both(tmp_path):
    tok = ours(bpe_release(tmp_path / "bpe"))
    rows = vocab_rows(lm_params(300))
    with pytest.raises(ValueError, match=r"model.lm=300 embedding rows .* \(301 ids\)"):
        check_vocab_rows("model.lm", rows, tok.vocab_size)
    check_vocab_rows("model.lm", vocab_rows(grow_vocab(lm_params(300), 1)), tok.vocab_size)
