"""CLIP's byte-level BPE tokenizer, read from the vocabulary file CLIP and open_clip ship.

The file (`bpe_simple_vocab_16e6.txt.gz`, inside the open_clip package) lists BPE merges; the
vocabulary is the 256 byte symbols, the same with an end-of-word mark, one symbol per merge, then
<start_of_text> and <end_of_text> (49,408 ids). Text is cleaned the way CLIP was trained (ftfy,
HTML unescaping, whitespace collapsed, lower-cased), so ids match the released text towers:

    [49406 (sot), content..., 49407 (eot), 0, 0, ...]   (open_clip pads with 0, which is "!")
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import itertools
from collections.abc import Sequence
from pathlib import Path

from vlm_jax.config import MissingInput, require_package
from vlm_jax.data.tokenizers import TOKENIZERS, Tokenizer
from vlm_jax.schema import Key, Schema

NEEDED_BY = "tokenizer.name='clip_bpe'"
BOS_TOKEN, EOS_TOKEN = "<start_of_text>", "<end_of_text>"
NUM_MERGES = 49152 - 256 - 2  # CLIP uses this many merges of the file (vocab 49,408)
_PATTERN = (
    rf"{BOS_TOKEN}|{EOS_TOKEN}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+"
)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode character, so BPE works on strings without whitespace/control
    characters: printable Latin-1 bytes map to themselves, the rest to chars from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    return dict(zip([*printable, *others], chars))


def default_vocab_path() -> Path:
    """The vocabulary file inside the installed open_clip package (found without importing
    open_clip, whose import pulls in torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise MissingInput(
            f"{NEEDED_BY} needs tokenizer.vocab_path=... (bpe_simple_vocab_16e6.txt.gz); "
            "open_clip, which ships it, is not installed"
        )
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def clean_text(text: str) -> str:
    """CLIP's text cleaning: fix mojibake, unescape HTML twice, collapse whitespace, lower."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


@TOKENIZERS.register(
    "clip_bpe",
    schema=Schema(
        {
            "add_bos": Key(bool, True, "start every text with BOS (<start_of_text>)"),
            "vocab_path": Key((str, type(None)), None, "the merges file; None: the bundled one"),
        }
    ),
)
class ClipBpeTokenizer(Tokenizer):
    """CLIP BPE. pad_id 0 (open_clip's padding), bos_id <start_of_text>, eos_id <end_of_text>.

    `max_len` 77 matches the released CLIP text towers; `add_bos` is on, as CLIP was trained.
    """

    pad_id = 0
    unk_id = -1  # byte-level BPE has no unknown token

    def __init__(self, add_bos: bool = True, vocab_path: str | None = None):
        super().__init__(add_bos)
        regex = require_package("regex", NEEDED_BY, "pip install regex ftfy")
        require_package("ftfy", NEEDED_BY, "pip install regex ftfy")  # clean_text, per record
        path = Path(vocab_path) if vocab_path else default_vocab_path()
        if not path.is_file():
            raise MissingInput(
                f"tokenizer.vocab_path={str(path)!r} does not exist: expected CLIP's BPE merges "
                "file (bpe_simple_vocab_16e6.txt.gz)"
            )
        with gzip.open(path, "rt", encoding="utf-8") as file:
            lines = file.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        symbols += [s + "</w>" for s in symbols]
        symbols += ["".join(pair) for pair in merges] + [BOS_TOKEN, EOS_TOKEN]
        self.encoder = {symbol: i for i, symbol in enumerate(symbols)}
        self.decoder = symbols
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self.vocab_size = len(symbols)
        self.bos_id, self.eos_id = self.encoder[BOS_TOKEN], self.encoder[EOS_TOKEN]
        self.pattern = regex.compile(_PATTERN, regex.IGNORECASE)
        self.cache = {BOS_TOKEN: [BOS_TOKEN], EOS_TOKEN: [EOS_TOKEN]}

    def bpe(self, word: str) -> list[str]:
        """One pre-token (byte symbols) -> BPE symbols: merge the lowest-ranked pair until none
        of the adjacent pairs is a known merge."""
        if word in self.cache:
            return self.cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = set(itertools.pairwise(parts))
            best = min(pairs, key=lambda pair: self.merge_rank.get(pair, float("inf")))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def vocabulary_id(self, token: str) -> int | None:
        """Only CLIP's own specials: every other symbol is a piece of a word."""
        return {BOS_TOKEN: self.bos_id, EOS_TOKEN: self.eos_id}.get(token)

    def encode_text(self, text: str) -> list[int]:
        ids = []
        for token in self.pattern.findall(clean_text(text)):
            symbols = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(symbols))
        return ids

    def detokenize_text(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a row of `batch_encode` up to EOS. Unlike the base class, id 0 before EOS is
        content ("!"), since CLIP's pad id is also a real symbol."""
        content = []
        for token in (int(i) for i in ids):
            if token == self.eos_id:
                break
            if token != self.bos_id:
                content.append(token)
        return self.detokenize(content)
