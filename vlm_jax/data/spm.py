"""SentencePiece tokenizers (SigLIP's T5/c4 models, Gemma's for SigLIP 2), from a local .model.

Released towers were trained with specific text conventions, which the config must reproduce:

    SigLIP (big_vision c4_en, HF SiglipTokenizer): lower=True, strip_punctuation=True,
        add_bos=False, pad_id=1 (pads with EOS), max_len=64, text pool "last"
    SigLIP 2 (Gemma vocabulary):                    lower=True, add_bos=False, pad_id=0, max_len=64
    Gemma-style decoders:                           add_bos=True, pad_id=0

`pad_id=None` takes the model's own pad id (0 if it has none). EOS and BOS come from the model.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

from vlm_jax.config import MissingInput, require_package
from vlm_jax.data.tokenizers import ADD_BOS, TOKENIZERS, Tokenizer
from vlm_jax.schema import REQUIRED, Key, Schema

NEEDED_BY = "tokenizer.name='sentencepiece'"
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@TOKENIZERS.register(
    "sentencepiece",
    schema=ADD_BOS
    | Schema(
        {
            "model_path": Key(str, REQUIRED, "the SentencePiece .model file"),
            "lower": Key(bool, False, "lower-case texts first"),
            "strip_punctuation": Key(bool, False, "drop ASCII punctuation first"),
            "pad_id": Key((int, type(None)), None, "None: the model's pad id (or 0)"),
        }
    ),
)
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with the source's lower-casing, punctuation and padding rules."""

    def __init__(
        self,
        model_path: str,
        add_bos: bool = False,
        lower: bool = False,
        strip_punctuation: bool = False,
        pad_id: int | None = None,
    ):
        super().__init__(add_bos)
        sentencepiece = require_package("sentencepiece", NEEDED_BY, "pip install sentencepiece")
        if not Path(model_path).is_file():
            raise MissingInput(
                f"tokenizer.model_path={model_path!r} does not exist: expected a SentencePiece "
                ".model file"
            )
        self.model = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = self.model.get_piece_size()
        self.eos_id, self.bos_id, self.unk_id = (
            self.model.eos_id(),
            self.model.bos_id(),
            self.model.unk_id(),
        )
        if self.eos_id < 0 or (add_bos and self.bos_id < 0):
            raise ValueError(
                f"sentencepiece model {model_path!r} lacks EOS (eos_id={self.eos_id}) or, with "
                f"add_bos=True, BOS (bos_id={self.bos_id})"
            )
        self.pad_id = max(self.model.pad_id(), 0) if pad_id is None else pad_id
        self.lower = lower
        self.strip_punctuation = strip_punctuation

    def canonicalize(self, text: str) -> str:
        """The text normalisation the tower was trained with (SigLIP: lower, no punctuation)."""
        if self.lower:
            text = text.lower()
        if self.strip_punctuation:
            text = text.translate(_PUNCTUATION)
        return " ".join(text.split())

    def encode_text(self, text: str) -> list[int]:
        return list(self.model.encode(self.canonicalize(text)))

    def detokenize_text(self, ids: Sequence[int]) -> str:
        return self.model.decode([int(i) for i in ids])

    def vocabulary_id(self, token: str) -> int | None:
        """The model's piece `token` (a control or user-defined symbol such as PaliGemma's
        `<image>`, or any piece spelled exactly so); None if it has none."""
        token_id = self.model.piece_to_id(token)
        return token_id if self.model.id_to_piece(token_id) == token else None
