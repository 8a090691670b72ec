"""Tokenizers: text <-> int ids, one interface for word, byte, SentencePiece and BPE models.

A subclass only says how text becomes content ids and back (`encode_text`, `detokenize_text`)
and which ids are special; padding, EOS placement, truncation and decoding up to EOS are shared
here, so every tokenizer feeds the text tower the same layout:

    [bos]? content... eos pad pad ...      (pad_id == 0; EOS kept when truncating)

Added special tokens (`build_tokenizer(config, special_tokens=("<image>",))`, as the VLM task
asks for its image placeholder) are strings that encoding never splits: each is one id, the
tokenizer's own where its vocabulary holds the string as one token (`vocabulary_id`: the word
tokenizer's `<image>` of `vqa.vocabulary()`), else the next id past the vocabulary, so
`vocab_size` grows by one (CLIP BPE's `<image>` is 49408, a byte tokenizer's 260).

Register a new one with `@TOKENIZERS.register("name", schema=...)` (its constructor's keyword
arguments, as config keys) in a module named in TOKENIZERS' `modules` (imported on the first
lookup); `build_tokenizer(config.tokenizer)` resolves the section and passes every key except
`name` and `max_len` (the pipeline's) to the constructor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import ml_collections
import numpy as np

from vlm_jax.data import shapes
from vlm_jax.registry import Registry
from vlm_jax.schema import REQUIRED, Key, Schema, Select, positive, resolve

TOKENIZERS = Registry(
    "tokenizer", modules=("vlm_jax.data.bpe", "vlm_jax.data.spm", "vlm_jax.data.release")
)
TOKENIZER = Select(  # config.tokenizer: name, max_len and the named tokenizer's options
    TOKENIZERS,
    base=Schema(
        {
            "max_len": Key(
                int,
                REQUIRED,
                "tokens per text, EOS and padding included",
                valid=positive,
                expect="a positive int",
            )
        }
    ),
)
ADD_BOS = Schema({"add_bos": Key(bool, False, "start every text with BOS")})
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0, 1, 2, 3 in the built-in tokenizers
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class Tokenizer:
    """Base class. Subclasses set the ids below and implement `encode` and `detokenize`."""

    vocab_size: int
    pad_id: int = 0
    eos_id: int = 1
    bos_id: int = 2
    unk_id: int = 3
    special_separator: str = " "  # between an added special token and the text beside it
    extra_stop_ids: tuple[int, ...] = ()  # ids beside EOS that end a generation
    chat_template: str | None = None  # Jinja source (vlm_jax.data.chat_template), if any
    template_tokens: Mapping[str, str] = MappingProxyType({})  # its bos_token, eos_token, ...

    def __init__(self, add_bos: bool = False):
        self.add_bos = add_bos
        self.special_tokens: dict[str, int] = {}  # added special token -> its id
        self.special_pattern: re.Pattern | None = None  # matches any of them, longest first

    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a generation: EOS first."""
        return tuple(dict.fromkeys((self.eos_id, *self.extra_stop_ids)))

    def prompt_ids(self, text: str) -> list[int]:
        """A prompt to continue: [bos]? content (no EOS, no padding)."""
        return [self.bos_id] * self.add_bos + self.encode(text)

    def encode_text(self, text: str) -> list[int]:
        """Content ids of text without added special tokens (the subclass's own encoding)."""
        raise NotImplementedError

    def detokenize_text(self, ids: Sequence[int]) -> str:
        """Text of content ids (no specials among them)."""
        raise NotImplementedError

    def vocabulary_id(self, token: str) -> int | None:
        """The id of `token` where the vocabulary holds it as one token, else None."""
        return None

    def add_special_tokens(self, tokens: Sequence[str]) -> None:
        """Make each of `tokens` one id that `encode` never splits (see the module docstring)."""
        for token in tokens:
            if token in self.special_tokens:
                continue
            token_id = self.vocabulary_id(token)
            if token_id is None:
                token_id = self.vocab_size
                self.vocab_size += 1
            self.special_tokens[token] = token_id
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        self.special_pattern = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    def encode(self, text: str) -> list[int]:
        """Content ids of `text`, without BOS/EOS/padding; each added special token one id."""
        if self.special_pattern is None:
            return self.encode_text(text)
        ids = []
        # split() with one group: text, special, text, special, ..., text
        for position, piece in enumerate(self.special_pattern.split(text)):
            if position % 2:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self.encode_text(piece))
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of content ids; an added special token's id reads as the token."""
        names = {token_id: token for token, token_id in self.special_tokens.items()}
        pieces, run = [], []
        for token_id in (int(i) for i in ids):
            if token_id in names:
                pieces += [self.detokenize_text(run), names[token_id]]
                run = []
            else:
                run.append(token_id)
        pieces.append(self.detokenize_text(run))
        return self.special_separator.join(piece for piece in pieces if piece)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a row of `batch_encode`: stops at EOS, skips PAD and BOS."""
        content = []
        for token in (int(i) for i in ids):
            if token == self.eos_id:
                break
            if token not in (self.pad_id, self.bos_id):
                content.append(token)
        return self.detokenize(content)

    def batch_encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """int32[n, max_len]: [bos]? content eos, then pad_id. Too long -> content is cut, the
        EOS stays last (the text tower pools at EOS)."""
        if max_len < 1 + self.add_bos:
            raise ValueError(f"max_len={max_len} leaves no room for EOS (add_bos={self.add_bos})")
        tokens = np.full((len(texts), max_len), self.pad_id, np.int32)
        for row, text in enumerate(texts):
            ids = ([self.bos_id] if self.add_bos else []) + self.encode(text)
            ids = [*ids[: max_len - 1], self.eos_id]
            tokens[row, : len(ids)] = ids
        return tokens


@TOKENIZERS.register(
    "words",
    schema=ADD_BOS
    | Schema({"words": Key((tuple, type(None)), None, "the vocabulary; None: the shapes world's")}),
)
class WordTokenizer(Tokenizer):
    """Lower-cased words and single punctuation marks over a fixed vocabulary.

    The default vocabulary is every word of the shapes world's captions and zero-shot prompts,
    so it needs no training pass and is identical everywhere; other words map to <unk>.
    """

    def __init__(self, add_bos: bool = False, words: Sequence[str] | None = None):
        super().__init__(add_bos)
        words = list(shapes.vocabulary() if words is None else words)
        clash = sorted(set(words) & set(SPECIALS))
        if clash or len(set(words)) != len(words):
            raise ValueError(f"vocabulary words must be unique and not specials; bad: {clash}")
        self.words = [*SPECIALS, *words]
        self.ids = {word: i for i, word in enumerate(self.words)}
        self.vocab_size = len(self.words)

    def encode_text(self, text: str) -> list[int]:
        return [self.ids.get(word, self.unk_id) for word in _WORD.findall(text.lower())]

    def detokenize_text(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[i] for i in ids)

    def vocabulary_id(self, token: str) -> int | None:
        return self.ids.get(token)


@TOKENIZERS.register("bytes", schema=ADD_BOS)
class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted past the specials: any text, no vocabulary, no <unk>."""

    vocab_size = len(SPECIALS) + 256

    def encode_text(self, text: str) -> list[int]:
        return [len(SPECIALS) + b for b in text.encode("utf-8")]

    def detokenize_text(self, ids: Sequence[int]) -> str:
        data = bytes(i - len(SPECIALS) for i in ids if i >= len(SPECIALS))
        return data.decode("utf-8", errors="replace")


def build_tokenizer(
    config: ml_collections.ConfigDict, special_tokens: Sequence[str] = ()
) -> Tokenizer:
    """`config.tokenizer` -> Tokenizer; keys other than name/max_len go to the constructor.
    `special_tokens`: strings the task needs as single ids (`Tokenizer.add_special_tokens`)."""
    tokenizer = TOKENIZERS.get(config.name)
    given = {key: value for key, value in config.items() if key != "max_len"}  # the pipeline's
    options = resolve("tokenizer", given, Select(TOKENIZERS))
    tokenizer = tokenizer(**{key: value for key, value in options.items() if key != "name"})
    if special_tokens:
        tokenizer.add_special_tokens(special_tokens)
    return tokenizer
