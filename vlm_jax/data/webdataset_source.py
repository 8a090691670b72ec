"""webdataset tar shards, as img2dataset writes them (LAION, DataComp, CC12M), read by index.

    config.data.source = "webdataset"
    config.data.train_shards = "/data/{00000..01023}.tar"   # a path, glob or brace range, or a
    config.data.val_shards = ("/data/val/*.tar",)           # list of them, per split
    config.data.caption_key = ".txt"                        # the KEY.txt member; "caption":
                                                            # that key of KEY.json ("a/b" nests)
    config.data.label_key = "label"                         # class index in KEY.json

A shard holds the members of each sample one after another (`KEY.jpg` | `.jpeg` | `.png` |
`.webp`, `KEY.txt`, `KEY.json`); as in webdataset, a sample's key is the member path up to the
first "." of its basename, and consecutive members with one key make one sample. Its id is the
key's basename as an int when it is all digits (img2dataset's keys are), else its index in the
split.

Random access, so Grain shuffles, shards and checkpoints by index and a resume is exact: each
shard's members (name, data offset, size) are found once by reading the tar headers (`tarfile`,
no data read) and cached as JSON beside the shard (`00000.tar.idx.json`), or in
`data.index_dir` when the shard's directory is not writable. A cached index is used only while
the shard keeps the size and mtime it was built from; otherwise it is rebuilt.

Bad data never crashes a run and never vanishes silently (the folder source's accounting):
samples without an image member or without their caption member (or .json) are dropped when
the index is read and counted in the "bad_records" of the record after them (`dropped_before`).
A truncated or corrupt tar (a tarfile error, data past the end of the file, no end-of-archive
marker) keeps the samples before the cut; the sample the cut falls in (the last one read: more
of its members may have followed) is dropped and counted, and samples wholly past the cut leave
no trace to count. An image that does not decode, an empty caption and a bad label raise
BadRecordError naming the shard and key on access; the pipeline replaces and counts them.
Zero-shot class names and templates come from
`classnames.txt` / `templates.txt` beside a split's first shard, or `data.classnames` /
`data.templates`. Labels are read where class names are known and the split's first record's
.json holds `data.label_key`; then every record needs a class index there.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from vlm_jax.config import MissingInput
from vlm_jax.data.array_record_source import listed
from vlm_jax.data.decode import image_decoder
from vlm_jax.data.folder import drops_before, zeroshot_metadata
from vlm_jax.data.records import BadRecordError, BadRecords, decode_image
from vlm_jax.data.shapes import SPLIT_IDS
from vlm_jax.data.sources import DATA_SOURCES
from vlm_jax.data.tfds_source import as_text, lookup
from vlm_jax.schema import Key, Schema

SPLITS = tuple(SPLIT_IDS)  # train, val, zeroshot: one `{split}_shards` key each
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a sample's image member, first found
INDEX_VERSION = 1
BLOCK = tarfile.BLOCKSIZE
GLOB_CHARS = re.compile(r"[*?\[]")


# -- shard lists: paths, globs and brace ranges -------------------------------------------------
def outer_brace(pattern: str) -> tuple[int, int] | None:
    """(start, end) of the first top-level {...} of `pattern`, or None."""
    depth, start = 0, 0
    for i, char in enumerate(pattern):
        if char == "{":
            start, depth = (i if depth == 0 else start), depth + 1
        elif char == "}" and depth:
            depth -= 1
            if depth == 0:
                return start, i
    return None


def split_top_level(body: str) -> list[str]:
    """`body` split at the commas outside nested braces: "a,{b,c}" -> ["a", "{b,c}"]."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    return [*parts, body[start:]]


def expand_braces(pattern: str) -> list[str]:
    """Shell brace expansion: "/d/{00..02}.tar" -> /d/00.tar, /d/01.tar, /d/02.tar; "{a,b}"
    lists (nested too); ranges keep their bounds' zero padding and may count down; several
    braces expand left to right. ValueError for a brace that is neither (named)."""
    span = outer_brace(pattern)
    if span is None:
        return [pattern]
    head, body, tail = pattern[: span[0]], pattern[span[0] + 1 : span[1]], pattern[span[1] + 1 :]
    if bounds := re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body):
        first, last = int(bounds[1]), int(bounds[2])
        padded = any(re.fullmatch(r"-?0\d+", bound) for bound in bounds.groups())
        width = max(map(len, bounds.groups())) if padded else 0
        step = 1 if last >= first else -1
        options = [f"{i:0{width}d}" for i in range(first, last + step, step)]
    elif len(options := split_top_level(body)) == 1:
        raise ValueError(
            f"{pattern!r}: {{{body}}} is neither a range ({{00000..00099}}) nor a list ({{a,b}})"
        )
    return [path for option in options for path in expand_braces(head + option + tail)]


def expand_pattern(pattern: str) -> tuple[list[str], list[str]]:
    """(existing files, missing paths) of one pattern: braces expanded, then globs matched
    (a glob matching nothing is missing); paths in the pattern's order, globs sorted."""
    found, missing = [], []
    for path in expand_braces(os.path.expanduser(pattern)):
        matches = sorted(glob.glob(path)) if GLOB_CHARS.search(path) else [path]
        files = [match for match in matches if os.path.isfile(match)]
        found += files
        missing += [path] if not files else [match for match in matches if match not in files]
    return found, missing


def shard_paths(patterns: str | tuple | list | None, key: str) -> list[Path]:
    """The shard files of config key `key` (a pattern or a list of them), each once, in order;
    MissingInput naming the pattern when it is empty or names a path that is not a file."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns or ())
    if not any(patterns):
        raise MissingInput(
            f"{key}={patterns or None!r} names no shards: set it to the split's tar shards (a "
            "path, a glob such as '/data/*.tar', a brace range such as "
            "'/data/{00000..00099}.tar', or a list of them)"
        )
    paths: dict[Path, None] = {}
    for pattern in patterns:
        try:
            found, missing = expand_pattern(pattern)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        if missing:
            raise MissingInput(
                f"{key}={pattern!r}: {len(missing)} of its shards are not files: "
                f"[{listed(missing)}] ({len(found)} found)"
            )
        paths.update(dict.fromkeys(map(Path, found)))
    return list(paths)


# -- the member index of one shard --------------------------------------------------------------
def sample_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member path as webdataset groups them: "d/0001.seg.png" ->
    ("d/0001", "seg.png"); None for a basename without a stem or an extension."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not stem or not dot or not extension:
        return None
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def read_members(path: Path) -> tuple[list[tuple[str, int, int]], str | None]:
    """([(name, data offset, size)] of the regular files before any damage, why the archive
    is cut or None): tarfile reads only headers; a complete archive ends in a zero block."""
    members: list[tuple[str, int, int]] = []
    with path.open("rb") as file:
        try:
            with tarfile.open(fileobj=file, mode="r:") as tar:
                for info in tar:  # a member's data past the end of file raises on the next one
                    if info.isfile():
                        members.append((info.name, info.offset_data, info.size))
                end = tar.offset
        except tarfile.TarError as e:
            return members, f"{type(e).__name__}: {e}"
        file.seek(end)
        marker = file.read(BLOCK)
    if not marker or marker.strip(b"\0"):  # tarfile stops silently at a cut or bad header
        return members, f"no end-of-archive marker at byte {end} (a cut or corrupt header)"
    return members, None


def scan_shard(path: Path) -> dict:
    """The index of one shard: {"samples": [[key, {extension: [offset, size]}]] of its complete
    samples, "cut": None or {"error", "key" of the sample the cut falls in}}."""
    members, error = read_members(path)
    samples: list[list] = []
    for name, offset, size in members:
        parsed = sample_key(name)
        if parsed is None:
            continue
        key, extension = parsed
        if not samples or samples[-1][0] != key:
            samples.append([key, {}])
        samples[-1][1][extension] = [offset, size]
    cut = {"error": error, "key": samples.pop()[0] if samples else None} if error else None
    return {"samples": samples, "cut": cut}


def index_paths(shard: Path, index_dir: str) -> list[Path]:
    """Where the index of `shard` is cached: beside it, else under `index_dir` (data.index_dir;
    '': ~/.cache/vlm_jax/webdataset) by a digest of the shard's absolute path."""
    cache = Path(index_dir or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "vlm_jax")
    cache = cache.expanduser() / ("" if index_dir else "webdataset")
    digest = hashlib.sha1(str(shard.resolve()).encode()).hexdigest()[:16]
    return [shard.with_name(f"{shard.name}.idx.json"), cache / f"{shard.name}.{digest}.idx.json"]


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None where it is absent, unreadable or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_index(index: dict, candidates: list[Path]) -> Path | None:
    """Write `index` (whole, then renamed) to the first candidate path that takes it."""
    for path in candidates:
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(index), encoding="utf-8")
            temporary.replace(path)
            return path
        except OSError:
            temporary.unlink(missing_ok=True)
    logging.warning("webdataset: no writable place for the index of a shard: %s", candidates)
    return None


def shard_index(shard: Path, index_dir: str) -> dict:
    """The member index of `shard`: a cached one while the shard keeps the size and mtime it
    was built from, else scanned anew and cached (see `index_paths`)."""
    stat = shard.stat()
    stamp = {"version": INDEX_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    candidates = index_paths(shard, index_dir)
    for path in candidates:
        index = read_json(path)
        if isinstance(index, dict) and all(index.get(k) == v for k, v in stamp.items()):
            return index
    index = {**stamp, **scan_shard(shard)}
    write_index(index, candidates)
    return index


# -- the source ---------------------------------------------------------------------------------
_OPTIONAL_NAMES = (tuple, type(None))
_SHARDS = "a path, glob or brace range ('/data/{00000..00099}.tar'), or a list of them"
WEBDATASET = Schema(
    {
        **{
            f"{split}_shards": Key((str, tuple, type(None)), None, f"{split} tar shards: {_SHARDS}")
            for split in SPLITS
        },
        "caption_key": Key(
            str,
            ".txt",
            "the caption: '.EXT' a sample's member (KEY.txt), else a key of its .json ('a/b')",
            valid=lambda key: bool(key.strip(".")),
            expect="a member extension ('.txt') or a JSON key ('caption')",
        ),
        "label_key": Key(str, "label", "class index in a sample's .json; '': no labels"),
        "classnames": Key(_OPTIONAL_NAMES, None, "class names; None: classnames.txt beside"),
        "templates": Key(_OPTIONAL_NAMES, None, "zero-shot prompts; None: templates.txt beside"),
        "index_dir": Key(str, "", "member indexes of shards in unwritable dirs ('': ~/.cache)"),
    },
    doc="img2dataset-style webdataset tar shards (vlm_jax.data.webdataset_source)",
)
# Per kept sample: its shard and the (offset, size) of its image, caption text and .json
# members (-1 where it has none); keys and ids apart.
MEMBERS = ("image", "text", "json")
_TABLE = np.dtype(
    [("shard", np.int32)] + [(f"{m}_{f}", np.int64) for m in MEMBERS for f in ("offset", "size")]
)


def sample_problem(members: dict, caption_member: str | None) -> tuple | None:
    """(reason, detail) why a sample of the index is unusable, or None."""
    if not any(extension in members for extension in IMAGE_EXTENSIONS):
        return "missing_file", f"no image member (.{', .'.join(IMAGE_EXTENSIONS)})"
    needed = caption_member or "json"
    if needed not in members:
        return "empty_caption", f"no .{needed} member holding the caption"
    return None


def sample_id(key: str, index: int) -> int:
    """A sample's id: its key's basename as an int when all digits (img2dataset), else `index`."""
    name = key.rpartition("/")[2]
    return int(name) if name.isdigit() else index


@DATA_SOURCES.register("webdataset", schema=WEBDATASET)
class WebdatasetSource:
    """Records {"image": uint8[H, W, 3], "caption": str, "id": int, ["label": int]} of a
    split's tar shards (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, split: str):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of: {', '.join(SPLITS)}")
        key = f"data.{split}_shards"
        self.shards = shard_paths(config[f"{split}_shards"], key)
        self.bad = BadRecords(config.on_error, f"webdataset source {key}")
        self.classnames, self.templates = zeroshot_metadata(self.shards[0].parent, config.templates)
        self.classnames = list(config.classnames or self.classnames)
        self.caption_key = caption = config.caption_key
        self.caption_member = caption[1:].lower() if caption.startswith(".") else None
        self.table, self.keys, positions, total = self.read_indexes(config.index_dir)
        self.drops = drops_before(positions, total)
        self.label_key = config.label_key if self.labelled(config.label_key) else ""
        self.ids = np.asarray([sample_id(k, i) for i, k in enumerate(self.keys)], np.int64)
        self.decoder = image_decoder(config, split)

    def read_indexes(self, index_dir: str) -> tuple[np.ndarray, list[str], list[int], int]:
        """(the table of kept samples, their keys, their positions among all samples read,
        that count): every shard's index, its unusable samples and cut reported."""
        rows, keys, positions, total = [], [], [], 0
        for shard_id, shard in enumerate(self.shards):
            index = shard_index(shard, index_dir)
            for key, members in index["samples"]:
                problem = sample_problem(members, self.caption_member)
                if problem:
                    self.bad.report(problem[0], f"{shard}: sample {key!r}: {problem[1]}")
                else:
                    rows.append((shard_id, *self.member_spans(members)))
                    keys.append(key)
                    positions.append(total)
                total += 1
            if cut := index["cut"]:
                lost = f"sample {cut['key']!r}" if cut["key"] else "its first sample"
                self.bad.report("unreadable_record", f"{shard}: {cut['error']}; {lost} is cut")
                total += 1
        return np.asarray(rows, _TABLE), keys, positions, total

    def labelled(self, label_key: str) -> bool:
        """Whether records carry labels: class names are known and the first record's .json
        holds `label_key` (then every record needs a class index there, as a folder manifest
        with any label needs one on every row)."""
        if not (label_key and self.classnames and len(self)):
            return False
        try:
            return lookup(self.parse_json(self.read(0)["json"]), label_key) is not None
        except BadRecordError:
            return False

    def member_spans(self, members: dict) -> list[int]:
        """[offset, size] of the image, caption text and .json members ([-1, -1]: none)."""
        image = next(ext for ext in IMAGE_EXTENSIONS if ext in members)
        spans = [members[image], members.get(self.caption_member or ""), members.get("json")]
        return [value for span in spans for value in (span or (-1, -1))]

    def __len__(self) -> int:
        return len(self.table)

    def dropped_before(self, index: int) -> int:
        """Samples dropped just before record `index` (see `folder.drops_before`); the
        pipeline's CheckedSource adds them to that record's "bad_records"."""
        return self.drops[index]

    def read(self, index: int) -> dict[str, bytes | None]:
        """The image, caption text and .json members of record `index` (None where absent)."""
        row = self.table[index]
        members: dict[str, bytes | None] = {}
        with self.shards[row["shard"]].open("rb") as file:
            for member in MEMBERS:
                offset, size = int(row[f"{member}_offset"]), int(row[f"{member}_size"])
                file.seek(max(offset, 0))
                members[member] = file.read(size) if offset >= 0 else None
                if offset >= 0 and len(members[member]) != size:
                    raise BadRecordError("unreadable_record", f"{member} member cut short")
        return members

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        where = f"{self.shards[self.table[index]['shard']]}: sample {self.keys[index]!r}"
        try:
            members = self.read(index)
            image = decode_image(members["image"], "image", self.decoder)
            meta = self.parse_json(members["json"])
        except BadRecordError as e:
            raise BadRecordError(e.reason, f"{where}: {e.detail}") from None
        text = members["text"] if self.caption_member else lookup(meta, self.caption_key)
        try:
            caption = as_text(text)
        except UnicodeDecodeError as e:
            raise BadRecordError("bad_caption", f"{where}: caption is not UTF-8: {e}") from None
        if not caption:
            raise BadRecordError("empty_caption", f"{where}: caption {self.caption_key!r} empty")
        record = {"image": image, "caption": caption, "id": int(self.ids[index])}
        if self.label_key:
            record["label"] = self.label(lookup(meta, self.label_key), where)
        return record

    @staticmethod
    def parse_json(data: bytes | None) -> dict:
        if data is None:
            return {}
        try:
            meta = json.loads(data)
        except ValueError as e:
            raise BadRecordError("unreadable_record", f".json member: {e}") from None
        return meta if isinstance(meta, dict) else {}

    def label(self, value: Any, where: str) -> int:
        """The class index `value` of a record; BadRecordError naming the valid range if not."""
        digits = isinstance(value, str) and value.strip().isdigit()
        number = digits or (isinstance(value, int) and not isinstance(value, bool))
        if not number or not 0 <= int(value) < len(self.classnames):
            raise BadRecordError(
                "bad_label",
                f"{where}: {self.label_key}={value!r} is not a class index in "
                f"[0, {len(self.classnames)})",
            )
        return int(value)

    def __repr__(self) -> str:
        return f"WebdatasetSource(shards={len(self.shards)}, records={len(self)})"
