"""Every record is checked before it reaches the model; bad ones are counted, logged and skipped.

`build_pipeline` wraps any source in a `CheckedSource`: record `index` is read from the source
and normalised by a `RecordCheck` (image -> uint8[H, W, 3] RGB, caption -> non-empty str that
the tokenizer encodes). A record that fails raises `BadRecordError` with a reason from
`REASONS`; it is then replaced by the next good record (cyclically, so indices stay stable and
a resumed stream is exact), counted by reason and logged with its index, id, source and split,
or the run stops when `config.data.on_error == "fail"`. Each record carries "bad_records": the
bad records stepped over to reach it, plus those its source dropped just before it when it was
built (`source.dropped_before(index)`, e.g. a folder manifest's rows naming missing files); and
"truncated_captions": whether its caption was cut to `tokenizer.max_len` (a conversation's
"truncated_sequences", data/conversations.py). So per-batch sums
reach the main process even when records are made in Grain worker processes.

Any other exception while reading or checking a record becomes a `RecordError` naming the
record and its source/split: it is a bug or a broken source, never silently skipped, and it
pickles (Grain re-raises worker exceptions in the main process; one that fails to pickle would
end the stream without a word).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from vlm_jax.config import check_choice
from vlm_jax.data.decode import ImageDecoder
from vlm_jax.data.tokenizers import Tokenizer

ON_ERROR_CHOICES = ("skip", "fail")
LONG_CAPTION_CHOICES = ("truncate", "bad")  # data.long_captions: cut to max_len, or a bad record
REASONS = (
    "missing_file",  # the manifest names an image file that is not there
    "unreadable_record",  # the stored record cannot be parsed (e.g. corrupt msgpack)
    "undecodable_image",  # image bytes the decoder (data.decoder) cannot decode
    "bad_image",  # an image array of the wrong type, dtype, shape or aspect ratio
    "empty_caption",  # missing, empty or whitespace-only caption
    "bad_caption",  # a caption that is not a str
    "long_caption",  # more tokens than tokenizer.max_len (data.long_captions == "bad")
    "tokenizer_error",  # the tokenizer raised on the caption
    "bad_label",  # a labelled split's record without a class index as its label
    "bad_prompt",  # a VQA record's prompt: not a str, or <image> markers != its images
    "bad_answer",  # a VQA record's answer: missing, empty or not a str
    "bad_conversation",  # turns not user/assistant in turn ending on assistant, or not strs
    "long_sequence",  # a conversation over tokenizer.max_len (dropped, or no cut keeps it whole)
)
# int fields every checked record carries ("truncated_sequences": conversations cut to max_len)
# packed_conversations / padded_tokens: rows of data.packing (data/packing.py)
COUNTERS = (
    "bad_records",
    "truncated_captions",
    "truncated_sequences",
    "packed_conversations",
    "padded_tokens",
)
# 1 where a bad record's slot holds the next good record instead, i.e. a repeat of a record
# the pass also reads at its own index: training keeps it, evaluation drops it.
SUBSTITUTE = "substitute"
MAX_CONSECUTIVE_BAD = 100  # more bad records in a row than this: the data is broken, stop
DEFAULT_MAX_ASPECT_RATIO = 20.0  # longer/shorter side; beyond it resizing would explode
PIL = ImageDecoder("pil")  # full-size decode of bytes a record carries (as_rgb)


class BadRecordError(ValueError):
    """A record that cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        check_choice("BadRecordError reason", reason, REASONS)
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # pickles across Grain worker processes with reason and detail
        return type(self), (self.reason, self.detail)


class RecordError(RuntimeError):
    """An unexpected exception while making a record, with the record and source named."""


class BadRecords:
    """Counts bad records by reason; warns (on_error="skip") or raises (on_error="fail")."""

    def __init__(self, on_error: str, where: str):
        check_choice("data.on_error", on_error, ON_ERROR_CHOICES)
        self.on_error = on_error
        self.where = where
        self.counts: collections.Counter[str] = collections.Counter()

    def report(self, reason: str, detail: str) -> None:
        if self.on_error == "fail":
            raise BadRecordError(reason, f"{self.where}: {detail} (data.on_error='fail')")
        self.counts[reason] += 1
        logging.warning(
            "%s: skipping record (%s: %s); skipped so far: %s",
            self.where,
            reason,
            detail,
            dict(self.counts),
        )

    def note_truncated(self, detail: str) -> None:
        """Count a caption cut to max_len; logged at the 1st, 2nd, 4th, 8th, ... of them."""
        self.counts["truncated_caption"] += 1
        count = self.counts["truncated_caption"]
        if count & (count - 1) == 0:
            logging.warning("%s: %d captions truncated (last: %s)", self.where, count, detail)


def decode_image(data: bytes, what: str = "image", decoder: ImageDecoder = PIL) -> np.ndarray:
    """Encoded image bytes -> uint8[H, W, 3] RGB by `decoder` (data/decode.py; sources pass
    the one `config.data` names); BadRecordError if it cannot decode them."""
    try:
        return decoder(data)
    except Exception as e:  # malformed files make decoders raise many types; all undecodable
        raise BadRecordError("undecodable_image", f"{what}: {type(e).__name__}: {e}") from None


def as_rgb(image: Any, max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> np.ndarray:
    """Encoded bytes, uint8[H, W] or uint8[H, W, 1 | 3 | 4] -> uint8[H, W, 3] (grey repeated,
    alpha dropped); anything else is a BadRecordError("bad_image")."""
    if isinstance(image, bytes | bytearray):
        image = decode_image(bytes(image))
    if not isinstance(image, np.ndarray):
        raise BadRecordError("bad_image", f"image is a {type(image).__name__}, not an array")
    shape = f"{image.dtype}{list(image.shape)}"
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise BadRecordError("bad_image", f"{shape} is not uint8[H, W] or uint8[H, W, C]")
    image = image[..., None] if image.ndim == 2 else image
    height, width, channels = image.shape
    if channels not in (1, 3, 4) or not height or not width:
        raise BadRecordError("bad_image", f"{shape}: need H, W > 0 and C in (1, 3, 4)")
    if max(height, width) > max_aspect_ratio * min(height, width):
        raise BadRecordError("bad_image", f"{shape}: aspect ratio above {max_aspect_ratio}")
    return np.repeat(image, 3, axis=-1) if channels == 1 else image[..., :3]


def check_caption(caption: Any) -> str:
    """The caption without surrounding whitespace; BadRecordError if not a non-empty str."""
    if not isinstance(caption, str):
        raise BadRecordError("bad_caption", f"caption is a {type(caption).__name__}, not a str")
    if not caption.strip():
        raise BadRecordError("empty_caption", f"caption {caption[:40]!r}")
    return caption.strip()


def check_image(record: dict) -> dict:
    """The record with its image as uint8[H, W, 3]: the check of records without captions."""
    return {**record, "image": as_rgb(record.get("image"))}


def counters(record: dict) -> dict[str, np.int32]:
    """The COUNTERS and SUBSTITUTE fields of a checked record, as they go into a batch."""
    return {key: np.int32(record[key]) for key in (*COUNTERS, SUBSTITUTE) if key in record}


class RecordCheck:
    """record -> the record with image uint8[H, W, 3], a clean caption, and
    "truncated_captions" (1 when the caption's tokens exceed max_len and are cut, else 0)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_len: int,
        long_captions: str = "truncate",
        max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    ):
        check_choice("data.long_captions", long_captions, LONG_CAPTION_CHOICES)
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.long_captions = long_captions
        self.max_aspect_ratio = max_aspect_ratio

    def token_count(self, caption: str) -> int:
        """Tokens the caption needs in a row of `batch_encode` (BOS and EOS included)."""
        try:
            content = self.tokenizer.encode(caption)
        except Exception as e:  # any tokenizer failure is this record's, not the run's
            raise BadRecordError("tokenizer_error", f"{type(e).__name__}: {e}") from None
        return len(content) + self.tokenizer.add_bos + 1

    def __call__(self, record: dict) -> dict:
        image = as_rgb(record.get("image"), self.max_aspect_ratio)
        caption = check_caption(record.get("caption"))
        count = self.token_count(caption)
        if count > self.max_len and self.long_captions == "bad":
            detail = f"{count} tokens > tokenizer.max_len={self.max_len}"
            raise BadRecordError("long_caption", detail)
        truncated = int(count > self.max_len)
        return {**record, "image": image, "caption": caption, "truncated_captions": truncated}


class CheckedSource:
    """Random access to checked records of `source`: a bad record is reported to `bad` and
    replaced by the next good one (flagged SUBSTITUTE); each record carries "bad_records", the
    number stepped over plus `source.dropped_before(index)` where the source has it (records
    it dropped up front)."""

    def __init__(self, source: Any, check: Callable[[dict], dict], bad: BadRecords):
        self.source = source
        self.check = check
        self.bad = bad
        self.length = len(source)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        for skipped in range(min(MAX_CONSECUTIVE_BAD, self.length)):
            candidate = (index + skipped) % self.length
            try:
                record = self.checked(candidate)
            except BadRecordError as e:
                self.bad.report(e.reason, f"record {candidate}: {e.detail}")
                continue
            if record.get("truncated_captions"):
                self.bad.note_truncated(f"record {candidate} id={record.get('id')}")
            bad_records = skipped + self.dropped_before(index)
            return {**record, "bad_records": bad_records, SUBSTITUTE: int(skipped > 0)}
        raise RecordError(
            f"{self.bad.where}: records {index}.. are all bad ({MAX_CONSECUTIVE_BAD} in a row "
            f"at most); skipped so far: {dict(self.bad.counts)}"
        )

    def dropped_before(self, index: int) -> int:
        """Records the source dropped when it was built, counted at the index after them: each
        index is read once per pass, so each dropped record is counted once per pass."""
        dropped = getattr(self.source, "dropped_before", None)
        return dropped(index) if dropped else 0

    def checked(self, index: int) -> dict:
        """Record `index`, checked: BadRecordError naming its id, or RecordError on a bug."""
        record: Any = None
        try:
            record = self.source[index]
            return self.check(record)
        except BadRecordError as e:
            record_id = record.get("id") if isinstance(record, dict) else None
            if record_id is None:
                raise
            raise BadRecordError(e.reason, f"id={record_id}: {e.detail}") from None
        except Exception as e:
            raise RecordError(f"{self.bad.where}: record {index}: {type(e).__name__}: {e}") from e

    def __repr__(self) -> str:
        return f"CheckedSource({self.bad.where})"
