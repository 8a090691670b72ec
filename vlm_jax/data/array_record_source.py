"""array_record shards of image-caption records, as written by `vlm_jax.data.write_shards`.

Layout of `config.data.path`: `{split}-{i:05d}-of-{n:05d}.array_record` shards, whose records
are msgpack maps {"image": encoded bytes, "caption": str, "id": int, ["label": int]}, and
`meta.json` with the zero-shot `classnames` and `templates` and the writer's skip counts.
Records are read by Grain's ArrayRecordDataSource (random access, any sharding, resumable).
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import ml_collections
import msgpack

from vlm_jax.data.records import BadRecordError, decode_image
from vlm_jax.data.sources import DATA_SOURCES


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def pack_record(image_bytes: bytes, fields: dict) -> bytes:
    """One shard record: encoded image bytes (as stored on disk) plus caption/id/label."""
    return msgpack.packb({"image": image_bytes, **fields}, use_bin_type=True)


def unpack_record(data: bytes) -> dict:
    """A shard record -> {"image": uint8[H, W, 3], "caption", "id", ["label"]}; a record that
    does not parse, or has no image bytes, is a BadRecordError("unreadable_record")."""
    try:
        record = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises many types on corrupt bytes; all mean unreadable
        raise BadRecordError("unreadable_record", f"{type(e).__name__}: {e}") from None
    image = record.get("image") if isinstance(record, dict) else None
    if not isinstance(image, bytes):
        raise BadRecordError("unreadable_record", f"no image bytes in {type(record).__name__}")
    return {**record, "image": decode_image(image, f"id={record.get('id')}")}


@DATA_SOURCES.register("array_record")
class ArrayRecordSource:
    """Records of one split of a `write_shards` output directory."""

    def __init__(self, config: ml_collections.ConfigDict, split: str):
        self.root = Path(config.path)
        paths = sorted(self.root.glob(f"{split}-*-of-*.array_record"))
        if not paths:
            raise FileNotFoundError(f"no {split!r} shards ({split}-*.array_record) in {self.root}")
        meta_path = self.root / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.classnames = meta.get("classnames", [])
        self.templates = tuple(config.get("templates") or meta.get("templates", ()))
        self.shards = grain.sources.ArrayRecordDataSource([str(p) for p in paths])

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict:
        return unpack_record(self.shards[index])

    def __repr__(self) -> str:
        return f"ArrayRecordSource(root={str(self.root)!r}, records={len(self)})"
