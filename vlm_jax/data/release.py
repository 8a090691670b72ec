"""Tokenizers of released LMs ("hf"): a HuggingFace release directory, tokenized as transformers'
`AutoTokenizer` tokenizes it, without importing transformers.

    tokenizer.name = "hf", tokenizer.path = DIR     (DIR as `huggingface-cli download` leaves it)

DIR holds `tokenizer.json` (read by the `tokenizers` library: its normalizer, pre-tokenizer,
model, added tokens and post-processor) or else a SentencePiece `tokenizer.model` (read by
`sentencepiece`; the release's added tokens are split out first and each piece between them is
encoded with the model's own dummy prefix, as transformers does for a model without a
`tokenizer_class`). Beside it:

    tokenizer_config.json     bos/eos/unk/pad_token, added_tokens_decoder, add_bos_token (for a
                              .model; a tokenizer.json's post-processor says whether BOS leads),
                              chat_template
    special_tokens_map.json   the named special tokens of older releases (they win where
                              tokenizer_config.json has no added_tokens_decoder, as in transformers)
    generation_config.json    eos_token_id (an int or a list): every id that ends a generation
    chat_template.jinja       the chat template; it wins over tokenizer_config.json's

Conventions: `bos_id`/`eos_id` are the named tokens' ids; `pad_id` the pad token's, else the
config's `pad_id`, else EOS (a release without a pad token, as Llama's); `stop_ids` EOS and the
generation config's ids. Added special tokens (`<image>`) go into the backend as special tokens,
so encoding never splits them and ids past the vocabulary are the next free ones.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm_jax.config import MissingInput, require_package
from vlm_jax.data.spm import SentencePieceTokenizer
from vlm_jax.data.tokenizers import TOKENIZERS, Tokenizer
from vlm_jax.schema import REQUIRED, Key, Schema

NEEDED_BY = "tokenizer.name='hf'"
NAMED_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)  # fmt: skip  (transformers' SPECIAL_TOKENS_ATTRIBUTES)


@dataclasses.dataclass(frozen=True)
class Release:
    """The tokenizer files of a release directory, as transformers merges them."""

    path: Path
    config: dict[str, Any]  # tokenizer_config.json (+ special_tokens_map.json)
    generation: dict[str, Any]  # generation_config.json, {} if absent
    chat_template: str | None

    def named_tokens(self) -> dict[str, str]:
        """{"bos_token": "<s>", ...}: the named special tokens the release sets (the chat
        template's variables)."""
        named = {key: token_text(self.config.get(key)) for key in NAMED_TOKENS}
        return {key: text for key, text in named.items() if text is not None}

    def added_tokens(self) -> dict[str, int]:
        """tokenizer_config.json's added_tokens_decoder: {token text: id}."""
        decoder = self.config.get("added_tokens_decoder") or {}
        return {token_text(token): int(token_id) for token_id, token in decoder.items()}


def token_text(value: Any) -> str | None:
    """A token as tokenizer_config.json writes it: a string or {"content": ..., ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _default_template(template: Any, path: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or [{"name", "template"}] (the
    "default" one)."""
    if template is None or isinstance(template, str):
        return template
    named = {entry["name"]: entry["template"] for entry in template}
    if "default" not in named:
        raise ValueError(f"{path}: chat templates {sorted(named)} have no 'default' one")
    return named["default"]


def read_release(path: str | Path) -> Release:
    """The tokenizer files of release directory `path` (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise MissingInput(f"tokenizer.path={str(path)!r} is not a directory: expected a release")
    config = _read_json(path / "tokenizer_config.json")
    if "added_tokens_decoder" not in config:  # transformers' legacy merge
        config |= _read_json(path / "special_tokens_map.json")
    template_file = path / "chat_template.jinja"
    template = (
        template_file.read_text(encoding="utf-8")
        if template_file.is_file()
        else _default_template(config.get("chat_template"), path / "tokenizer_config.json")
    )
    return Release(path, config, _read_json(path / "generation_config.json"), template)


class ReleaseConventions:
    """What the two release tokenizers share: named ids, pad/stop conventions, chat template."""

    release: Release

    def apply_conventions(self, pad_id: int | None) -> None:
        """bos/eos/unk/pad ids from the release's named tokens; stop ids from generation."""
        named = self.release.named_tokens()
        ids = {key: self.vocabulary_id(text) for key, text in named.items()}
        for key, token_id in ids.items():
            if token_id is None:
                raise ValueError(
                    f"{self.release.path}: {key}={named[key]!r} is not a token of the vocabulary"
                )
        self.bos_id = ids.get("bos_token", self.bos_id)
        self.eos_id = ids.get("eos_token", self.eos_id)
        self.unk_id = ids.get("unk_token", self.unk_id)
        self.pad_id = ids.get("pad_token", self.eos_id if pad_id is None else pad_id)
        if self.eos_id is None or self.eos_id < 0:
            raise ValueError(f"{self.release.path}: the release names no eos_token")
        generation_eos = self.release.generation.get("eos_token_id", [])
        generation_eos = [generation_eos] if isinstance(generation_eos, int) else generation_eos
        self.extra_stop_ids = tuple(generation_eos)
        self.chat_template = self.release.chat_template
        self.template_tokens = named


RELEASE = Schema(
    {
        "path": Key(str, REQUIRED, "the release directory (tokenizer.json or tokenizer.model)"),
        "add_bos": Key((bool, type(None)), None, "start every text with BOS; None: the release's"),
        "pad_id": Key((int, type(None)), None, "without a pad token in the release; None: EOS"),
    }
)


@TOKENIZERS.register("hf", schema=RELEASE)
def release_tokenizer(path: str, add_bos: bool | None = None, pad_id: int | None = None):
    """The tokenizer of release directory `path`: tokenizer.json if it has one, else
    tokenizer.model (see the module docstring)."""
    release = read_release(path)
    if (release.path / "tokenizer.json").is_file():
        return TokenizersTokenizer(release, add_bos, pad_id)
    if (release.path / "tokenizer.model").is_file():
        return ReleaseSentencePiece(release, add_bos, pad_id)
    raise MissingInput(
        f"tokenizer.path={path!r} has neither tokenizer.json nor tokenizer.model: expected a "
        "HuggingFace release directory"
    )


class TokenizersTokenizer(ReleaseConventions, Tokenizer):
    """A release's tokenizer.json through the `tokenizers` library."""

    def __init__(self, release: Release, add_bos: bool | None = None, pad_id: int | None = None):
        tokenizers = require_package("tokenizers", NEEDED_BY, "pip install tokenizers")
        self.release = release
        self.backend = tokenizers.Tokenizer.from_file(str(release.path / "tokenizer.json"))
        self.backend.no_padding()
        self.backend.no_truncation()
        self._set_vocab_size()
        self.bos_id = self.unk_id = -1
        self.eos_id = None
        self.apply_conventions(pad_id)
        super().__init__(self.releases_bos() if add_bos is None else add_bos)

    def _set_vocab_size(self) -> None:
        """Ids run to the largest one, added tokens included (they may leave gaps)."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(
            self.backend.get_vocab_size(with_added_tokens=True), 1 + max(vocab.values())
        )

    def releases_bos(self) -> bool:
        """Whether the post-processor starts a text with BOS (as AutoTokenizer's encode does)."""
        encoding = self.backend.encode("a", add_special_tokens=True)
        return encoding.sequence_ids[0] is None and encoding.ids[0] == self.bos_id

    def encode_text(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def vocabulary_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def add_special_tokens(self, tokens: Sequence[str]) -> None:
        """Each of `tokens` becomes a special added token of the backend (its id if the
        vocabulary has it, else the next free one), never split, matched before normalization."""
        tokenizers = require_package("tokenizers", NEEDED_BY, "pip install tokenizers")
        for token in tokens:
            if self.vocabulary_id(token) is None:
                self.backend.add_special_tokens(
                    [tokenizers.AddedToken(token, special=True, normalized=False)]
                )
            self.special_tokens[token] = self.vocabulary_id(token)
        self._set_vocab_size()


class ReleaseSentencePiece(ReleaseConventions, SentencePieceTokenizer):
    """A release's SentencePiece tokenizer.model: the text as it is (no lower-casing or whitespace
    folding), the release's added and named special tokens split out first; decoding puts no
    space around them."""

    special_separator = ""

    def __init__(self, release: Release, add_bos: bool | None = None, pad_id: int | None = None):
        self.release = release
        self.release_ids = release.added_tokens()
        if add_bos is None:
            add_bos = bool(release.config.get("add_bos_token", False))
        super().__init__(str(release.path / "tokenizer.model"), add_bos=add_bos)
        model = self.model
        control = [
            model.id_to_piece(i) for i in range(model.get_piece_size()) if model.is_control(i)
        ]
        unknown = [model.id_to_piece(model.unk_id())] if model.unk_id() >= 0 else []
        named = release.named_tokens().values()
        self.add_special_tokens([*control, *unknown, *self.release_ids, *named])
        self.vocab_size = max(self.vocab_size, 1 + max(self.special_tokens.values(), default=-1))
        self.apply_conventions(pad_id)

    def canonicalize(self, text: str) -> str:
        return text

    def vocabulary_id(self, token: str) -> int | None:
        """The release's id for an added token, else the model's piece."""
        return self.release_ids.get(token, super().vocabulary_id(token))
