"""Tokenizers: round trips, the shared [bos]? content eos pad layout, truncation, registry."""

import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_jax.data import build_tokenizer, shapes
from vlm_jax.data.tokenizers import ByteTokenizer, WordTokenizer

WORLD = shapes.World()


def captions(n: int = 300) -> list[str]:
    """Train captions (with rewordings) and canonical held-out ones."""
    return [shapes.make_record(WORLD, s, i)["caption"] for s in ("train", "val") for i in range(n)]


def test_words_round_trip_every_caption_and_prompt_without_unk():
    tokenizer = WordTokenizer()
    prompts = [t.format(c) for c in shapes.classnames(WORLD) for t in shapes.ZEROSHOT_TEMPLATES]
    texts = captions() + prompts
    tokens = tokenizer.batch_encode(texts, max_len=16)
    assert tokens.dtype == np.int32 and tokens.shape == (len(texts), 16)
    assert not (tokens == tokenizer.unk_id).any()
    assert [tokenizer.decode(row) for row in tokens] == texts


def test_words_lowercase_punctuation_and_unknown_words():
    tokenizer = WordTokenizer()
    ids = tokenizer.encode("A RED circle, wobbly!")
    assert tokenizer.detokenize(ids) == "a red circle <unk> <unk> <unk>"
    assert ids[3:] == [tokenizer.unk_id] * 3


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_bytes_round_trip_any_text(text):
    tokenizer = ByteTokenizer()
    row = tokenizer.batch_encode([text], max_len=len(text.encode()) + 1)[0]
    assert tokenizer.decode(row) == text
    assert row.max() < tokenizer.vocab_size


@pytest.mark.parametrize("tokenizer", [WordTokenizer(), ByteTokenizer(add_bos=True)])
def test_layout_padding_and_truncation_keep_eos(tokenizer):
    short, long = "a red", "two small red circles left of a large blue square " * 3
    tokens = tokenizer.batch_encode([short, long], max_len=16)
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    expected_short = [*bos, *tokenizer.encode(short), tokenizer.eos_id]
    np.testing.assert_array_equal(
        tokens[0], expected_short + [tokenizer.pad_id] * (16 - len(expected_short))
    )
    kept = tokenizer.encode(long)[: 15 - len(bos)]
    np.testing.assert_array_equal(tokens[1], [*bos, *kept, tokenizer.eos_id])
    assert tokenizer.decode(tokens[1]) == tokenizer.detokenize(kept)
    assert tokenizer.pad_id == 0
    with pytest.raises(ValueError, match="leaves no room for EOS"):
        tokenizer.batch_encode([short], max_len=1 if tokenizer.add_bos else 0)


def test_build_tokenizer_from_config():
    config = ml_collections.ConfigDict({"name": "words", "max_len": 16, "add_bos": True})
    tokenizer = build_tokenizer(config)
    assert isinstance(tokenizer, WordTokenizer) and tokenizer.add_bos
    assert tokenizer.vocab_size == 4 + len(shapes.vocabulary())
    assert build_tokenizer(ml_collections.ConfigDict({"name": "bytes"})).vocab_size == 260
    with pytest.raises(ValueError, match="tokenizer='nope' is not one of: .*bytes.*words"):
        build_tokenizer(ml_collections.ConfigDict({"name": "nope"}))


def test_added_special_tokens_take_the_vocabularys_id_or_the_next_one():
    words = WordTokenizer(words=(*shapes.vocabulary(), "<image>"))
    size = words.vocab_size
    words.add_special_tokens(["<image>", "<image>"])  # in the vocabulary: its own id, once
    assert words.special_tokens == {"<image>": size - 1} and words.vocab_size == size
    plain = WordTokenizer()  # without it: the first id past the vocabulary
    plain.add_special_tokens(["<image>"])
    assert plain.special_tokens == {"<image>": size - 1} and plain.vocab_size == size
    config = ml_collections.ConfigDict({"name": "bytes", "max_len": 8})
    tokenizer = build_tokenizer(config, special_tokens=("<image>", "<img>"))
    assert tokenizer.special_tokens == {"<image>": 260, "<img>": 261}
    assert tokenizer.vocab_size == 262


@given(st.lists(st.sampled_from(["<image>", "<img>", "<", "image>", "a b", " ", "é"]), max_size=8))
@settings(max_examples=100, deadline=None)
def test_text_with_special_tokens_encodes_each_as_one_id(pieces):
    tokenizer = ByteTokenizer()
    tokenizer.add_special_tokens(["<img>", "<image>"])
    text = "".join(pieces)
    expected, rest = [], text
    while rest:  # the longest special token at this point, else one character's bytes
        token = next((t for t in ("<image>", "<img>") if rest.startswith(t)), None)
        if token:
            expected.append(tokenizer.special_tokens[token])
        else:
            expected += ByteTokenizer().encode(rest[0])
        rest = rest[len(token or rest[0]) :]
    assert tokenizer.encode(text) == expected
    row = tokenizer.batch_encode([text], max_len=64)[0]
    assert tokenizer.decode(row).replace(" ", "") == text.replace(" ", "")


def test_a_special_token_is_not_split_by_the_word_tokenizer():
    tokenizer = WordTokenizer(words=(*shapes.vocabulary(), "<image>"))
    assert tokenizer.detokenize(tokenizer.encode("<image>")) == "<unk> image <unk>"  # split
    tokenizer.add_special_tokens(["<image>"])
    ids = tokenizer.encode("a <image> red circle")
    assert ids.count(tokenizer.special_tokens["<image>"]) == 1 and tokenizer.unk_id not in ids
    assert tokenizer.detokenize(ids) == "a <image> red circle"
