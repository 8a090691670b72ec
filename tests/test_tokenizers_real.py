"""Real tokenizers against their reference implementations, offline.

CLIP BPE is compared with open_clip's tokenizer on the vocabulary file open_clip ships;
SentencePiece with HuggingFace's SiglipTokenizer and with sentencepiece itself, on a tiny model
trained here and on Mistral's models, which the mistral-common package ships (the [test] extra
installs a version whose numpy pin fits ours; found without importing it): as a release
directory ("hf") they give transformers' AutoTokenizer and sentencepiece's ids on multilingual
text. Added special tokens (the VLM's `<image>`)
are one id in each, past the vocabulary or the model's own.
"""

import importlib.util
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from vlm_jax.data import bpe, spm  # noqa: F401  (registers the tokenizers)
from vlm_jax.data.tokenizers import build_tokenizer

TEXTS = [
    "a photo of a cat.",
    "A Photo Of A DOG!!",
    "two   red circles,\tleft of a blue square",
    "caf\u00e9 na\u00efve \u00fcber",  # non-ASCII letters
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",  # CJK
    "Tom &amp; Jerry's 3rd film: 1987",  # HTML entity, contraction, digits
    "emoji \U0001f600 and symbols #$%^&*()",
    "",
    "word " * 40,  # longer than max_len: truncated, EOS kept last
]


def tokenizer(name: str, special_tokens=(), **options):
    config = ml_collections.ConfigDict({"name": name, "max_len": 16, **options})
    return build_tokenizer(config, special_tokens=special_tokens)


PROMPT = ("USER: ", "<image>", " What is in the picture?")  # text, special token, text


def check_special_token_is_one_id(tok, plain, token_id: int) -> None:
    """`tok` (with "<image>" added) encodes PROMPT as `plain` (without it) encodes each text
    piece, with `token_id` for the marker; `plain` cuts the marker into several pieces."""
    assert tok.special_tokens == {"<image>": token_id}
    before, _, after = PROMPT
    ids = tok.encode("".join(PROMPT))
    assert ids == [*plain.encode(before), token_id, *plain.encode(after)]
    assert len(plain.encode("<image>")) > 1 and token_id not in plain.encode("".join(PROMPT))
    assert "<image>" in tok.decode(tok.batch_encode(["".join(PROMPT)], 32)[0])


@pytest.fixture(scope="module")
def open_clip():
    from vlm_jax.convert.torch_compat import import_open_clip

    return import_open_clip()


@pytest.mark.parametrize("max_len", [77, 16])
def test_clip_bpe_matches_open_clip(open_clip, max_len):
    ours = tokenizer("clip_bpe").batch_encode(TEXTS, max_len)
    reference = open_clip.tokenize(TEXTS, context_length=max_len).numpy()
    np.testing.assert_array_equal(ours, reference)


def test_clip_bpe_conventions_and_decode():
    tok = tokenizer("clip_bpe")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49408, 49406, 49407, 0)
    row = tok.batch_encode(["Hello, World!"], 16)[0]
    assert row[0] == tok.bos_id and list(row).index(tok.eos_id) == 5
    assert tok.decode(row) == "hello , world !"


def test_clip_bpe_image_token_is_the_first_id_past_the_vocabulary(open_clip):
    tok, plain = tokenizer("clip_bpe", special_tokens=("<image>",)), tokenizer("clip_bpe")
    assert (tok.vocab_size, plain.vocab_size) == (49409, 49408)
    check_special_token_is_one_id(tok, plain, 49408)
    before, _, after = PROMPT
    for text in (before, after):  # the pieces as open_clip encodes them (no sot/eot/pad)
        reference = open_clip.tokenize([text], context_length=16).numpy()[0]
        assert plain.encode(text) == [i for i in reference[1:] if i not in (0, 49407)]


def train_sentencepiece(tmp_path, **ids) -> str:
    import sentencepiece

    corpus = [t.lower() for t in TEXTS[:7]] * 20 + ["the quick brown fox jumps over the dog"] * 20
    prefix = str(tmp_path / "tiny")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=prefix,
        vocab_size=100,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        minloglevel=2,
        **ids,
    )
    return prefix + ".model"


def test_sentencepiece_matches_hf_siglip_tokenizer(tmp_path):
    from transformers import SiglipTokenizer

    model_path = train_sentencepiece(tmp_path, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    reference = SiglipTokenizer(vocab_file=model_path, model_max_length=16)
    expected = reference(TEXTS, padding="max_length", max_length=16, truncation=True)["input_ids"]
    ours = tokenizer(
        "sentencepiece", model_path=model_path, lower=True, strip_punctuation=True, pad_id=1
    ).batch_encode(TEXTS, 16)
    np.testing.assert_array_equal(ours, np.asarray(expected))


def test_sentencepiece_gemma_style_bos(tmp_path):
    import sentencepiece

    model_path = train_sentencepiece(tmp_path, pad_id=0, eos_id=1, bos_id=2, unk_id=3)
    tok = tokenizer("sentencepiece", model_path=model_path, add_bos=True)
    reference = sentencepiece.SentencePieceProcessor(model_file=model_path)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    rows = tok.batch_encode(TEXTS[:3], 32)
    for text, row in zip(TEXTS[:3], rows):
        ids = reference.encode(" ".join(text.split()), add_bos=True, add_eos=True)
        np.testing.assert_array_equal(row[: len(ids)], ids)
        assert (row[len(ids) :] == 0).all()
        assert tok.decode(row) == reference.decode(ids)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tokenizer("sentencepiece", model_path=str(tmp_path / "nope.model"))
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        tokenizer("clip_bpe", vocab_path=str(tmp_path / "nope.txt.gz"))


def test_sentencepiece_image_token_is_added_or_the_models_own(tmp_path):
    model_path = train_sentencepiece(tmp_path, pad_id=0, eos_id=1, bos_id=2, unk_id=3)
    plain = tokenizer("sentencepiece", model_path=model_path)
    tok = tokenizer("sentencepiece", special_tokens=("<image>",), model_path=model_path)
    assert tok.vocab_size == plain.vocab_size + 1
    check_special_token_is_one_id(tok, plain, plain.vocab_size)
    (tmp_path / "own").mkdir()
    own = train_sentencepiece(
        tmp_path / "own", pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["<image>"]
    )
    tok = tokenizer("sentencepiece", special_tokens=("<image>",), model_path=own)
    assert tok.special_tokens["<image>"] == 4 and tok.vocab_size == tok.model.get_piece_size()


def mistral_model(name: str) -> Path:
    """A SentencePiece model mistral-common ships (the [test] extra installs it), found without
    importing the package (its code is not needed, only the files)."""
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None and spec.submodule_search_locations, (
        "mistral-common (which ships Mistral's SentencePiece models) is not installed: "
        "pip install -e '.[test]'"
    )
    return Path(spec.submodule_search_locations[0]) / "data" / name


MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog.",
    "Voix ambiguë d'un cœur qui, au zéphyr, préfère les jattes de kiwis.",
    "Falsches Üben von Xylophonmusik quält jeden größeren Zwerg.",
    "Съешь же ещё этих мягких французских булок.",  # Russian
    "我能吞下玻璃而不伤身体。",  # Chinese
    "いろはにほへと ちりぬるを テキスト",
    "다람쥐 헌 쳇바퀴에 타고파",  # Korean
    "صِف خَلقَ خَودِ",  # Arabic
    "ऋषियों को सताने",  # Hindi
    "emoji 😀👩‍💻 and symbols #$%^&*() €100",
    "  leading, double  spaces,\ttabs\nand\n\nnewlines  ",
    "def f(x):\n    return x ** 2  # code",
    "[INST] brackets that look like control tokens [/INST]",
    "",
]
# (file in mistral-common's data/, its vocabulary): Llama-style v1, v3 (control tokens), Tekken-
# era v7 SentencePiece.
MISTRAL_MODELS = [
    ("tokenizer.model.v1", 32000),
    ("mistral_instruct_tokenizer_240323.model.v3", 32768),
    ("mistral_instruct_tokenizer_241114.model.v7", 32768),
]


@pytest.mark.parametrize("name, vocab", MISTRAL_MODELS, ids=["v1", "v3", "v7"])
def test_mistral_release_tokenizer_matches_autotokenizer_and_sentencepiece(tmp_path, name, vocab):
    """Mistral's model as a release directory (tokenizer.model + tokenizer_config.json, BOS
    first as Mistral's releases set it): our "hf" tokenizer gives the ids of transformers'
    AutoTokenizer and of sentencepiece itself on multilingual text, and decodes them as
    sentencepiece does."""
    import json
    import shutil

    import sentencepiece
    from transformers import AutoTokenizer

    shutil.copyfile(mistral_model(name), tmp_path / "tokenizer.model")
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = tokenizer("hf", path=str(tmp_path))
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    model = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (vocab, 1, 2)
    controls = {p: i for p in ("[INST]", "[/INST]") if model.is_control(i := model.piece_to_id(p))}
    for text in MULTILINGUAL:
        ids = ours.encode(text)
        assert ids == reference(text, add_special_tokens=False)["input_ids"], repr(text)
        if any(token in text for token in controls):  # one id each, as transformers splits them
            assert ids[0] == controls["[INST]"] and ids[-1] == controls["[/INST]"], repr(text)
        else:  # sentencepiece itself never matches a control piece in text
            assert ids == model.encode(text), repr(text)
            assert ours.decode(ids) == model.decode(ids), repr(text)
        assert ours.prompt_ids(text) == reference(text)["input_ids"], repr(text)


def test_mistral_sentencepiece_image_token():
    path = str(mistral_model("mistral_instruct_tokenizer_240323.model.v3"))
    plain = tokenizer("sentencepiece", model_path=path, add_bos=True)
    tok = tokenizer("sentencepiece", special_tokens=("<image>",), model_path=path, add_bos=True)
    assert (plain.vocab_size, plain.bos_id, plain.eos_id) == (32768, 1, 2)
    check_special_token_is_one_id(tok, plain, 32768)
    own = tokenizer("sentencepiece", special_tokens=("[IMG]",), model_path=path)
    assert own.special_tokens == {"[IMG]": 10} and own.vocab_size == 32768  # its control piece
