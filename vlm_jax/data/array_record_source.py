"""array_record shards of image-caption records, as written by `vlm_jax.data.write_shards`.

Layout of `config.data.path`: `{split}-{i:05d}-of-{n:05d}.array_record` shards, whose records
are msgpack maps {"image": encoded bytes, "caption": str, "id": int, ["label": int]}, and
`meta.json` with the zero-shot `classnames` and `templates` and, per split, the writer's record
and skip counts. Records are read by Grain's ArrayRecordDataSource (random access, any sharding,
resumable). A split is read only as one complete shard set (every `i < n` of a single `n`,
holding the record count meta.json names): shards of two writes, or a missing shard, are an
error naming the files, never records read twice or silently lost.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import grain
import ml_collections
import msgpack

from vlm_jax.data.decode import ImageDecoder, image_decoder
from vlm_jax.data.folder import FILES
from vlm_jax.data.records import PIL, BadRecordError, decode_image
from vlm_jax.data.sources import DATA_SOURCES


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def parse_shard_name(name: str, split: str) -> tuple[int, int] | None:
    """(index, count) of a shard file name of `split`; None for any other file."""
    match = re.fullmatch(rf"{re.escape(split)}-(\d{{5,}})-of-(\d{{5,}})\.array_record", name)
    return (int(match[1]), int(match[2])) if match else None


def split_shards(root: Path, split: str) -> dict[str, tuple[int, int]]:
    """{file name: (index, count)} of every shard of `split` in `root`, whichever write made it."""
    names = sorted(path.name for path in root.iterdir()) if root.is_dir() else []
    return {name: ids for name in names if (ids := parse_shard_name(name, split))}


def listed(names: list[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown}, ... ({len(names)} in all)"


def complete_shard_set(root: Path, split: str) -> list[Path]:
    """The shards of `split` in `root` if they are exactly {split}-{i}-of-{n} for every i < n
    of one n; otherwise an error naming the files (shards of two writes, or a missing shard)."""
    found = split_shards(root, split)
    if not found:
        raise FileNotFoundError(f"no {split!r} shards ({split}-*-of-*.array_record) in {root}")
    counts = sorted({count for _, count in found.values()})
    if len(counts) > 1:
        sets = "; ".join(
            f"-of-{n:05d}: {listed([name for name, ids in found.items() if ids[1] == n])}"
            for n in counts
        )
        raise ValueError(
            f"{root} holds {len(counts)} shard sets of split {split!r} ({sets}); "
            "rerun write_shards into this directory, or delete the stale set"
        )
    expected = [shard_name(split, i, counts[0]) for i in range(counts[0])]
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{root}: the {counts[0]} shards of split {split!r} are not one complete set: "
            f"missing [{listed(missing)}], unexpected [{listed(unexpected)}]"
        )
    return [root / name for name in expected]


def pack_record(image_bytes: bytes, fields: dict) -> bytes:
    """One shard record: encoded image bytes (as stored on disk) plus caption/id/label."""
    return msgpack.packb({"image": image_bytes, **fields}, use_bin_type=True)


def unpack_record(data: bytes, decoder: ImageDecoder = PIL) -> dict:
    """A shard record -> {"image": uint8[H, W, 3], "caption", "id", ["label"]}; a record that
    does not parse, or has no image bytes, is a BadRecordError("unreadable_record")."""
    try:
        record = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises many types on corrupt bytes; all mean unreadable
        raise BadRecordError("unreadable_record", f"{type(e).__name__}: {e}") from None
    image = record.get("image") if isinstance(record, dict) else None
    if not isinstance(image, bytes):
        raise BadRecordError("unreadable_record", f"no image bytes in {type(record).__name__}")
    return {**record, "image": decode_image(image, f"id={record.get('id')}", decoder)}


def check_written_count(meta_path: Path, meta: dict, split: str, paths: list, count: int) -> None:
    """The shards must hold the records meta.json says the writer wrote (when it says)."""
    written = meta.get("splits", {}).get(split, {}).get("written")
    if written is not None and written != count:
        raise ValueError(
            f"{meta_path} says {written} {split!r} records were written, but the shards "
            f"{listed([p.name for p in paths])} hold {count}; rerun write_shards"
        )


@DATA_SOURCES.register("array_record", schema=FILES)
class ArrayRecordSource:
    """Records of one split of a `write_shards` output directory."""

    def __init__(self, config: ml_collections.ConfigDict, split: str):
        self.root = Path(config.path)
        paths = complete_shard_set(self.root, split)
        meta_path = self.root / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.classnames = meta.get("classnames", [])
        self.templates = tuple(config.templates or meta.get("templates", ()))
        self.shards = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
        check_written_count(meta_path, meta, split, paths, len(self.shards))
        self.decoder = image_decoder(config, split)

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict:
        return unpack_record(self.shards[index], self.decoder)

    def __repr__(self) -> str:
        return f"ArrayRecordSource(root={str(self.root)!r}, records={len(self)})"
