"""Conversation data for the "vlm" task: LLaVA-format JSON and `messages` files read as they
are, prompts built through a chat template, the loss on assistant turns only.

    data.source = "llava_json"    (or "messages_json"; "conversation_shards": their array_record
                                   shards, python -m vlm_jax.data.write_shards --conversations;
                                   "conversation_tfds": a prepared TFDS dataset of the same
                                   records, the turns as a JSON text feature)
    data.path = "/data/llava/{split}.json"   ("{split}": the split's name; .json or .jsonl)
    data.image_root = "/data/llava/images"   (image paths resolve against it; "": the file's dir)

llava_json rows:    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
                     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                                       {"from": "gpt", "value": "..."}, ...]}
messages_json rows: {"id": 7, "images": ["a.jpg", "b.jpg"],
                     "messages": [{"role": "system" | "user" | "assistant", "content": ...}]}

"image" (or "images") is absent for a text-only record, a path, or a list of paths; a content
may also be a list of parts ({"type": "image"} is a marker, {"type": "text", "text": ...}).
There is one `<image>` marker per image, where its visual tokens go. Examples have
K = data.max_images image slots (a record with fewer fills the rest with blank images that no
marker places, so early fusion never reads them; with cross-attention fusion every slot is
media, blank ones included).

A record becomes tokens through `data.chat_template`: "tokenizer" (the LM's Jinja template,
`tokenizer.chat_template`, rendered one assistant turn at a time: the text before each
assistant turn is the template's generation prompt, the turn's own text what the template adds
after it), or a named one ("llava_v1": Vicuna's "USER: ... ASSISTANT: ...</s>", "plain":
"user: ... assistant: ...", for the word and byte tokenizers); "auto" is "tokenizer" where the
tokenizer has a template, else "plain". Each piece is encoded on its own, so the prompt's
tokens are those generation is given, and only assistant pieces (with their end-of-turn) carry
loss (`loss_mask`); `prefix_len` ends before the first of them.

Every record's supervision is checked at pipeline build time on its first records, and on
every record with `data.check_supervision`: the supervised tokens, decoded run by run, must be
one run per assistant turn that holds that turn's text (whitespace and case aside); else
`SupervisionMismatch` names the record and shows both strings (never a silent zero loss).

Over-long records (more than tokenizer.max_len tokens, each `<image>` one of them; the model's
spliced sequence is tokenizer.max_len + K * (visual tokens - 1) for every example) are cut on
the text side (`data.long_sequences = "truncate"`, counted as data/truncated_sequences) or are
bad records ("drop": reason long_sequence). A cut that would remove an `<image>` or every
assistant token makes the record a long_sequence bad record too.

Bad records (replaced, counted in data/bad_records and logged with the record's id, or fatal
with data.on_error="fail"): markers != images (bad_prompt), a missing image file
(missing_file), an empty assistant turn (bad_answer), a conversation that is not user /
assistant turns in turn ending on an assistant turn, or with a value that is not a str
(bad_conversation), more images than data.max_images (bad_image), too long (long_sequence).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import grain
import ml_collections
import msgpack
import numpy as np

from vlm_jax.config import MissingInput, check_choice
from vlm_jax.data.array_record_source import check_written_count, complete_shard_set
from vlm_jax.data.chat_template import ChatTemplateError, compile_template, render_chat
from vlm_jax.data.records import BadRecordError, as_rgb, decode_image
from vlm_jax.data.sources import DATA_SOURCES
from vlm_jax.data.tfds_source import TFDS, as_text, open_split
from vlm_jax.data.tokenizers import Tokenizer
from vlm_jax.data.vqa import IMAGE_PLACEHOLDER, NEUTRAL_GREY, image_token_id
from vlm_jax.registry import Registry
from vlm_jax.schema import REQUIRED, Key, Schema, positive

LONG_SEQUENCE_CHOICES = ("truncate", "drop")
ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
STORED_FIELDS = ("images", "messages", "id", "name")  # a shard record (pack_conversation)
CHECKED_FIRST = 8  # records whose supervision is checked when the pipeline is built


@dataclasses.dataclass(frozen=True)
class TurnFormat:
    """A template without Jinja: `system` / `user` format their content ("{}"); each assistant
    turn is `assistant`, then (supervised) " " + content + EOS."""

    user: str
    assistant: str
    system: str = "{} "
    default_system: str = ""


CHAT_FORMATS = Registry("data.chat_template")
CHAT_FORMATS.register("llava_v1")(
    TurnFormat(
        "USER: {} ",
        "ASSISTANT:",
        default_system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    )
)
CHAT_FORMATS.register("plain")(TurnFormat("user: {} ", "assistant:"))


def template_choices() -> tuple[str, ...]:
    """data.chat_template: auto, tokenizer (the LM's Jinja template), or a CHAT_FORMATS name."""
    return ("auto", "tokenizer", *CHAT_FORMATS.names())


CONVERSATION = Schema(
    {
        "max_images": Key(
            int, 1, "K: image slots per example (fewer: blank slots)", valid=positive
        ),
        "chat_template": Key(
            str,
            "auto",
            "tokenizer (the LM's Jinja template), llava_v1, plain, or auto (tokenizer's if any)",
            choices=template_choices,
        ),
        "long_sequences": Key(
            str,
            "truncate",
            "over tokenizer.max_len: truncate the text side, or drop (a bad record)",
            choices=LONG_SEQUENCE_CHOICES,
        ),
        "check_supervision": Key(
            bool,
            False,
            "decode every record's supervised tokens against its assistant text (debug)",
        ),
        "packing": Key(
            bool,
            False,
            "train rows hold several conversations (tokenizer.max_len tokens, max_images "
            "images shared), attention and positions kept per conversation",
        ),
    }
)
JSON_FILES = CONVERSATION | Schema(
    {
        "path": Key(str, REQUIRED, "the .json / .jsonl file; '{split}' in it: the split's name"),
        "image_root": Key(str, "", "image paths resolve against it ('': the file's directory)"),
    }
)
SHARDS = CONVERSATION | Schema(
    {"path": Key(str, REQUIRED, "the write_shards --conversations output directory")}
)


class SupervisionMismatch(ValueError):
    """The supervised tokens do not decode to the assistant turns: a template bug."""


class TemplateNotIncremental(ValueError):
    """The chat template renders a turn differently once more turns follow it."""


def bad(detail: str, reason: str = "bad_conversation") -> BadRecordError:
    return BadRecordError(reason, detail)


# -- reading rows -------------------------------------------------------------------------------


def split_path(path: str, split: str) -> Path:
    """data.path for `split`: "{split}" replaced; a path without it serves only "train"."""
    if "{split}" not in path and split != "train":
        raise MissingInput(
            f"data.path={path!r} has no '{{split}}', so it is only the train split; split "
            f"{split!r} needs a path such as '/data/{{split}}.json'"
        )
    resolved = Path(path.replace("{split}", split))
    if not resolved.is_file():
        raise MissingInput(f"data.path={path!r}: no file {str(resolved)!r} for split {split!r}")
    return resolved


def read_rows(path: Path) -> list:
    """The rows of a JSON list or a JSONL file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = json.loads(text)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a conversation file holds a JSON list, not a {type(rows)}")
    return rows


def content_text(content: Any) -> Any:
    """A content as text: a str as it is; a list of parts joined ({"type": "image"} the
    marker, {"type": "text", "text": ...}); anything else as it is (the check refuses it)."""
    if not isinstance(content, list) or not content:
        return content
    kinds = [part.get("type") if isinstance(part, dict) else None for part in content]
    texts = [IMAGE_PLACEHOLDER if k == "image" else p.get("text") for k, p in zip(kinds, content)]
    if not all(k in ("image", "text") for k in kinds) or not all(isinstance(t, str) for t in texts):
        return content
    return "".join(texts)


def turn_messages(row: dict, key: str, message_of, shape: str) -> list[dict]:
    """The row's `key` list as messages, each turn through `message_of` (None: not a turn)."""
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise bad(f"{key!r} is {type(turns).__name__}, not a non-empty list")
    messages = [message_of(turn) if isinstance(turn, dict) else None for turn in turns]
    for i, (turn, message) in enumerate(zip(turns, messages)):
        if message is None:
            raise bad(f"turn {i}: {turn!r} is not {shape}")
    return messages


def llava_message(turn: dict) -> dict | None:
    role = LLAVA_ROLES.get(turn.get("from"))
    return {"role": role, "content": turn.get("value")} if role else None


def chat_message(turn: dict) -> dict | None:
    if turn.get("role") not in ROLES:
        return None
    return {"role": turn["role"], "content": content_text(turn.get("content"))}


def llava_messages(row: dict) -> list[dict]:
    shape = "{'from': human | gpt | system, 'value': ...}"
    return turn_messages(row, "conversations", llava_message, shape)


def chat_messages(row: dict) -> list[dict]:
    shape = f"{{'role': {' | '.join(ROLES)}, 'content': ...}}"
    return turn_messages(row, "messages", chat_message, shape)


def image_paths(row: dict) -> list[str]:
    images = row.get("images", row.get("image"))
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise bad(f"image {images!r} is not a path or a list of paths")
    return images


def decoded(stored: dict) -> dict:
    """A stored record ({"images": encoded bytes, "messages", "id", "name"}) as the sources give
    it: {"image": [uint8[H, W, 3]], "messages", "id", "name"}."""
    where = f"id {stored['name']!r}"
    images = [decode_image(data, f"{where} image {i}") for i, data in enumerate(stored["images"])]
    return {
        "image": images,
        "messages": stored["messages"],
        "id": stored["id"],
        "name": stored["name"],
    }


class ConversationSource:
    """Records {"image": [uint8[H, W, 3]] (0..K), "messages": [{"role", "content"}], "id": the
    row's index, "name": the row's "id" as a str} of one split's JSON file."""

    conversations = True

    def __init__(self, config: ml_collections.ConfigDict, split: str, messages_of):
        self.path = split_path(config.path, split)
        self.root = Path(config.image_root) if config.image_root else self.path.parent
        self.rows = read_rows(self.path)
        self.messages_of = messages_of
        self.config = config
        self.images_per_record = config.max_images

    def __len__(self) -> int:
        return len(self.rows)

    def stored(self, index: int) -> dict:
        """Record `index` with its images as the encoded bytes of their files."""
        row = self.rows[index]
        if not isinstance(row, dict):
            raise bad(f"row {index} is a {type(row).__name__}, not an object")
        name = str(row.get("id", index))
        try:
            messages = self.messages_of(row)
            paths = image_paths(row)
        except BadRecordError as e:
            raise bad(f"id {name!r}: {e.detail}", e.reason) from None
        missing = [path for path in paths if not (self.root / path).is_file()]
        if missing:
            raise bad(f"id {name!r}: image {missing[0]!r} not under {self.root}", "missing_file")
        images = [(self.root / path).read_bytes() for path in paths]
        return {"images": images, "messages": messages, "id": index, "name": name}

    def __getitem__(self, index: int) -> dict:
        return decoded(self.stored(int(index)))

    def record_check(self, tokenizer: Tokenizer, max_len: int) -> ConversationCheck:
        return ConversationCheck(tokenizer, max_len, self.config)

    def __repr__(self) -> str:  # Grain checks it on restore
        return f"ConversationSource(path={str(self.path)!r}, records={len(self)})"


@DATA_SOURCES.register("llava_json", schema=JSON_FILES)
def llava_json(config: ml_collections.ConfigDict, split: str) -> ConversationSource:
    return ConversationSource(config, split, llava_messages)


@DATA_SOURCES.register("messages_json", schema=JSON_FILES)
def messages_json(config: ml_collections.ConfigDict, split: str) -> ConversationSource:
    return ConversationSource(config, split, chat_messages)


def pack_conversation(stored: dict) -> bytes:
    """One shard record: the stored record as msgpack (images as their encoded bytes)."""
    return msgpack.packb(stored, use_bin_type=True)


@DATA_SOURCES.register("conversation_shards", schema=SHARDS)
class ConversationShards:
    """The records of a conversation source from its array_record shards (write_shards
    --conversations): the same records as the source itself gives."""

    conversations = True

    def __init__(self, config: ml_collections.ConfigDict, split: str):
        self.root = Path(config.path)
        paths = complete_shard_set(self.root, split)
        self.shards = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
        meta_path = self.root / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        check_written_count(meta_path, meta, split, paths, len(self.shards))
        self.config = config
        self.images_per_record = config.max_images

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict:
        try:
            stored = msgpack.unpackb(self.shards[int(index)], raw=False)
        except Exception as e:  # msgpack raises many types on corrupt bytes; all mean unreadable
            raise bad(f"record {index}: {type(e).__name__}: {e}", "unreadable_record") from None
        if not isinstance(stored, dict) or not set(STORED_FIELDS) <= set(stored):
            raise bad(
                f"record {index}: not a map of {', '.join(STORED_FIELDS)}", "unreadable_record"
            )
        return decoded(stored)

    record_check = ConversationSource.record_check

    def __repr__(self) -> str:
        return f"ConversationShards(root={str(self.root)!r}, records={len(self)})"


TFDS_FORMATS = {"llava": llava_messages, "messages": chat_messages}
TFDS_LOCATION = ("tfds_name", "tfds_data_dir", "tfds_splits")
CONVERSATION_TFDS = (
    CONVERSATION
    | Schema({key: TFDS.keys[key] for key in TFDS_LOCATION})
    | Schema(
        {
            "images_key": Key(str, "images", "feature of the record's images (a Sequence)"),
            "conversation_key": Key(str, "conversations", "text feature: the turns as a JSON list"),
            "conversation_format": Key(
                str,
                "llava",
                "the JSON's turns: llava ({'from', 'value'}) or messages ({'role', 'content'})",
                choices=tuple(TFDS_FORMATS),
            ),
            "id_key": Key(str, "id", "text feature naming the record ('': its index)"),
        }
    )
)


@DATA_SOURCES.register("conversation_tfds", schema=CONVERSATION_TFDS)
class ConversationTfds:
    """The records of a conversation source from a prepared TFDS dataset (array_record, read
    through tfds.data_source): per example, the turns as JSON text in `conversation_key` (a
    llava_json row's "conversations" or a messages_json row's "messages"), its images (encoded
    bytes or decoded uint8[H, W, 3], 0 for a text-only record) in `images_key`, its name in
    `id_key`: the same records as the JSON file of those rows."""

    conversations = True

    def __init__(self, config: ml_collections.ConfigDict, split: str):
        check_choice("data.conversation_format", config.conversation_format, tuple(TFDS_FORMATS))
        self.source = open_split(config, split)
        self.messages_of = TFDS_FORMATS[config.conversation_format]
        self.key = {"llava": "conversations", "messages": "messages"}[config.conversation_format]
        self.config = config
        self.images_per_record = config.max_images

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        example = self.source[index]
        name = as_text(example.get(self.config.id_key)) if self.config.id_key else ""
        name = name or str(index)
        try:
            turns = json.loads(as_text(example.get(self.config.conversation_key)))
        except json.JSONDecodeError as e:
            raise bad(f"id {name!r}: {self.config.conversation_key!r} is not JSON: {e}") from None
        try:
            messages = self.messages_of({self.key: turns})
        except BadRecordError as e:
            raise bad(f"id {name!r}: {e.detail}", e.reason) from None
        images = example.get(self.config.images_key, [])
        where = f"id {name!r} image"
        images = [
            decode_image(image, f"{where} {i}") if isinstance(image, bytes) else image
            for i, image in enumerate(images)
        ]
        return {"image": images, "messages": messages, "id": index, "name": name}

    record_check = ConversationSource.record_check

    def __repr__(self) -> str:
        return f"ConversationTfds(name={self.config.tfds_name!r}, records={len(self)})"


# -- checking and encoding ----------------------------------------------------------------------


def checked_messages(messages: list[dict]) -> list[dict]:
    """`messages` if they are an optional system turn, then user / assistant turns in turn
    ending on an assistant turn, every content a str and every assistant's non-empty; else a
    BadRecordError (bad_conversation, bad_answer, bad_prompt)."""
    for i, message in enumerate(messages):
        if not isinstance(message["content"], str):
            kind = type(message["content"]).__name__
            raise bad(f"turn {i} ({message['role']}): the value is a {kind}, not a str")
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    roles = [message["role"] for message in turns]
    if not turns or roles != expected[: len(roles)]:
        raise bad(f"turns {roles}: need user and assistant turns in turn, the user's first")
    if roles[-1] != "assistant":
        raise bad(f"the conversation ends on a {roles[-1]} turn, not an assistant turn")
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise bad(f"turn {i}: empty assistant turn {message['content']!r}", "bad_answer")
        if message["role"] == "assistant" and IMAGE_PLACEHOLDER in message["content"]:
            raise bad(f"turn {i}: {IMAGE_PLACEHOLDER} in an assistant turn", "bad_prompt")
    return messages


def template_segments(tokenizer: Tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """[(text, supervised)] of the tokenizer's Jinja template, one assistant turn at a time."""
    render = functools.partial(render_chat, tokenizer.chat_template, **tokenizer.template_tokens)
    segments, done = [], ""
    try:
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = render(messages[:i], add_generation_prompt=True)
            full = render(messages[: i + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise TemplateNotIncremental(
                    "the chat template does not render a conversation one turn at a time (the "
                    f"text up to assistant turn {i} is not a prefix of the text after it): "
                    f"{prompt!r} then {full!r}; use data.chat_template='llava_v1' or 'plain'"
                )
            segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
    except ChatTemplateError as e:  # it parsed (ConversationCheck compiles it): a refusal
        raise bad(str(e)) from None
    return segments


def format_segments(form: TurnFormat, messages: list[dict]) -> list[tuple[str, bool]]:
    """[(text, supervised)] of a named template (EOS follows each supervised text)."""
    segments, pending = [], ""
    if messages[0]["role"] != "system" and form.default_system:
        pending = form.system.format(form.default_system)
    for message in messages:
        if message["role"] == "system":
            pending += form.system.format(message["content"])
        elif message["role"] == "user":
            pending += form.user.format(message["content"])
        else:
            segments += [(pending + form.assistant, False), (" " + message["content"], True)]
            pending = ""
    return segments


def normalised(text: str) -> str:
    return "".join(text.split()).casefold()


def supervised_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The ids of each maximal run of supervised positions."""
    runs, previous = [], 0
    for token, supervised in zip(ids, mask):
        if supervised and not previous:
            runs.append([])
        if supervised:
            runs[-1].append(token)
        previous = supervised
    return runs


class ConversationCheck:
    """A conversation record -> the record with K images uint8[H, W, 3] (blank slots filled),
    "tokens" / "loss_mask" int32[max_len], "prefix_len", "truncated_sequences" (0/1), and the
    first exchange as "prompt" / "answer"; BadRecordError for a bad record (module docstring)."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, config: ml_collections.ConfigDict):
        check_choice("data.long_sequences", config.long_sequences, LONG_SEQUENCE_CHOICES)
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.images_per_record = config.max_images
        self.long_sequences = config.long_sequences
        self.verify_every = config.check_supervision
        self.max_aspect_ratio = config.max_aspect_ratio
        self.template = self.template_name(config.chat_template)
        if self.template == "tokenizer":
            compile_template(tokenizer.chat_template)  # a template that does not parse: now
        self.image_id = image_token_id(tokenizer)

    def template_name(self, name: str) -> str:
        has_template = self.tokenizer.chat_template is not None
        if name == "auto":
            return "tokenizer" if has_template else "plain"
        if name == "tokenizer" and not has_template:
            raise ValueError(
                "data.chat_template='tokenizer' but the tokenizer has no chat template; use one "
                f"of: {', '.join(CHAT_FORMATS.names())}"
            )
        return name

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        if self.template == "tokenizer":
            return template_segments(self.tokenizer, messages)
        return format_segments(CHAT_FORMATS.get(self.template), messages)

    def encode(self, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of the segments, each encoded on its own."""
        named = self.template != "tokenizer"
        ids = [self.tokenizer.bos_id] if named and self.tokenizer.add_bos else []
        mask = [0] * len(ids)
        for text, supervised in segments:
            piece = self.tokenizer.encode(text) + [self.tokenizer.eos_id] * (named and supervised)
            ids += piece
            mask += [int(supervised)] * len(piece)
        return ids, mask

    def verify(self, ids: list[int], mask: list[int], messages: list[dict], name: str) -> None:
        """SupervisionMismatch unless the supervised runs decode to the assistant turns."""
        stops = {*self.tokenizer.stop_ids(), self.tokenizer.pad_id}
        runs = supervised_runs(ids, mask)
        decoded = [self.tokenizer.detokenize([i for i in run if i not in stops]) for run in runs]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        if len(decoded) != len(answers) or not all(
            normalised(answer) in normalised(text) for text, answer in zip(decoded, answers)
        ):
            raise SupervisionMismatch(
                f"record id {name!r}: the supervised tokens decode to {decoded!r}, but the "
                f"assistant turns are {answers!r} (data.chat_template={self.template!r})"
            )

    def fit(self, ids: list[int], mask: list[int]) -> tuple[list[int], list[int], int]:
        """(ids, mask, truncated 0/1) within max_len, or BadRecordError("long_sequence")."""
        if len(ids) <= self.max_len:
            return ids, mask, 0
        detail = f"{len(ids)} tokens > tokenizer.max_len={self.max_len}"
        if self.long_sequences == "drop":
            raise bad(f"{detail} (data.long_sequences='drop')", "long_sequence")
        if ids[self.max_len :].count(self.image_id):
            raise bad(f"{detail}, and cutting it would cut an {IMAGE_PLACEHOLDER}", "long_sequence")
        if not any(mask[: self.max_len]):
            raise bad(f"{detail}, and no assistant token is within it", "long_sequence")
        return ids[: self.max_len], mask[: self.max_len], 1

    def images(self, images: list, messages: list[dict]) -> list[np.ndarray]:
        """The K image slots; BadRecordError unless markers == images <= K."""
        markers = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if markers != len(images):
            raise bad(
                f"{markers} {IMAGE_PLACEHOLDER} markers for {len(images)} images", "bad_prompt"
            )
        if len(images) > self.images_per_record:
            detail = f"{len(images)} images > data.max_images={self.images_per_record}"
            raise bad(detail, "bad_image")
        rgb = [as_rgb(image, self.max_aspect_ratio) for image in images]
        blank = np.full((1, 1, 3), NEUTRAL_GREY, np.uint8)
        return rgb + [blank] * (self.images_per_record - len(rgb))

    def __call__(self, record: dict, verify: bool = False) -> dict:
        name = record.get("name", record.get("id"))
        try:
            messages = checked_messages(record["messages"])
            images = self.images(record["image"], messages)
            segments = self.segments(messages)
        except BadRecordError as e:
            raise bad(f"id {name!r}: {e.detail}", e.reason) from None
        ids, mask = self.encode(segments)
        if verify or self.verify_every or not any(mask):  # no loss tokens: always an error
            self.verify(ids, mask, messages, name)
        try:
            ids, mask, truncated = self.fit(ids, mask)
        except BadRecordError as e:
            raise bad(f"id {name!r}: {e.detail}", e.reason) from None
        tokens = np.full((self.max_len,), self.tokenizer.pad_id, np.int32)
        tokens[: len(ids)] = ids
        loss_mask = np.zeros((self.max_len,), np.int32)
        loss_mask[: len(mask)] = mask
        first = mask.index(1)
        return {
            **record,
            "image": images,
            "tokens": tokens,
            "loss_mask": loss_mask,
            "prefix_len": np.int32(first),
            "truncated_sequences": truncated,
            "prompt": "".join(text for text, _ in segments[:1]),
            "answer": next(m["content"] for m in messages if m["role"] == "assistant").strip(),
        }

    def check_first(self, source: Any, count: int = CHECKED_FIRST) -> None:
        """The supervision check on the source's first `count` records (bad ones aside)."""
        for index in range(min(count, len(source))):
            try:
                self(source[index], verify=True)
            except BadRecordError:
                continue
