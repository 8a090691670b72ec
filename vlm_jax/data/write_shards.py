"""Write an image folder (see `vlm_jax.data.folder`) as array_record or webdataset tar shards.

    python -m vlm_jax.data.write_shards --src DIR --out OUT [--splits train,val,zeroshot]
        [--num_shards 4] [--on_error skip|fail] [--format array_record|webdataset]
    python -m vlm_jax.data.write_shards --conversations llava_json|messages_json
        --src '/data/{split}.json' [--image_root DIR] --out OUT --splits train

Conversations (data/conversations.py) go into array_record shards for the
"conversation_shards" source: each record its turns and its images' encoded bytes.

Every image is decoded once here, so the shards hold only good records; missing files, empty
captions and undecodable images are counted per split, logged, and recorded in OUT/meta.json
(or stop the run with --on_error fail). The original encoded bytes are stored, not pixels.

array_record (the default): `{split}-{i:05d}-of-{n:05d}.array_record` for `ArrayRecordSource`.
webdataset: img2dataset's layout, `{split}-{i:05d}.tar` holding `KEY.{jpg,png,...}`, `KEY.txt`
(the caption) and `KEY.json` ({"caption", "id", ["label"]}) per record, KEY the id as 9 digits,
plus classnames.txt and templates.txt, for `WebdatasetSource` (data.train_shards = the brace
range meta.json names per split). Images in formats webdataset readers do not take as image
members (.bmp, .gif, ...) are stored as PNG.

Writing into an OUT that already holds shards of a split replaces them: the new set is written
in full first (as .tmp files), then renamed into place, and only then are the split's earlier
shards that are not part of it deleted, so an interrupted write never loses the earlier set and
a finished one never leaves shards of two writes (which `ArrayRecordSource` refuses to read).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from vlm_jax.data import conversations, folder
from vlm_jax.data.array_record_source import pack_record, shard_name, split_shards
from vlm_jax.data.records import ON_ERROR_CHOICES, BadRecordError, BadRecords, decode_image
from vlm_jax.data.sources import build_source
from vlm_jax.data.webdataset_source import IMAGE_EXTENSIONS

Sample = tuple[bytes, str, dict]  # (encoded image as on disk, its file extension, fields)


def good_records(root: Path, split: str, bad: BadRecords) -> list[Sample]:
    """The samples of a split whose files exist, decode and have a caption; fields are the
    record's caption, id and label (`folder.record_fields`)."""
    rows, _ = folder.usable_rows(folder.read_manifest(folder.find_manifest(root, split)), root, bad)
    samples = []
    for row in rows:
        data = (root / row["image"]).read_bytes()
        try:
            decode_image(data)
        except BadRecordError as e:
            bad.report(e.reason, f"image {row['image']!r}: {e.detail}")
            continue
        extension = Path(row["image"]).suffix.lower().lstrip(".")
        samples.append((data, extension, folder.record_fields(row, int(row["id"]))))
    return samples


def write_records(path: Path, records: Iterable[bytes]) -> None:
    """One array_record shard of already serialised records."""
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()


def write_array_record(path: Path, samples: list[Sample]) -> None:
    write_records(path, (pack_record(data, fields) for data, _, fields in samples))


def tar_image(data: bytes, extension: str) -> tuple[bytes, str]:
    """(bytes, extension) of an image member: as given, or PNG where webdataset readers would
    not take the extension as an image."""
    if extension in IMAGE_EXTENSIONS:
        return data, extension
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(decode_image(data))).save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def write_tar(path: Path, samples: list[Sample]) -> None:
    """One webdataset shard: KEY.<image>, KEY.txt, KEY.json per sample (KEY: the id, 9 digits;
    zero mtimes, so the same samples give the same bytes)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for data, extension, fields in samples:
            key = f"{fields['id']:09d}"
            image, extension = tar_image(data, extension)
            members = {
                f"{key}.{extension}": image,
                f"{key}.txt": fields["caption"].encode("utf-8"),
                f"{key}.json": json.dumps(fields).encode("utf-8"),
            }
            for name, payload in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def tar_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}.tar"


def tar_shards(out: Path, split: str) -> list[str]:
    """Names of the split's tar shards in `out`, whichever write made them."""
    pattern = re.compile(rf"{re.escape(split)}-\d{{5,}}\.tar")
    return sorted(path.name for path in out.iterdir() if pattern.fullmatch(path.name))


@dataclasses.dataclass(frozen=True)
class ShardFormat:
    name: Callable[[str, int, int], str]  # (split, index, count) -> a shard's file name
    existing: Callable[[Path, str], list[str]]  # the split's shard names in OUT, of any write
    write: Callable[[Path, list[Sample]], None]  # one shard of samples
    pattern: Callable[[str, int], str]  # (split, count) -> the set's names as one pattern


FORMATS = {
    "array_record": ShardFormat(
        shard_name,
        lambda out, split: sorted(split_shards(out, split)),
        write_array_record,
        lambda split, count: f"{split}-*-of-{count:05d}.array_record",
    ),
    "webdataset": ShardFormat(
        tar_name,
        tar_shards,
        write_tar,
        lambda split, count: f"{split}-{{00000..{count - 1:05d}}}.tar",
    ),
}


def write_split(
    samples: list[Sample], out: Path, split: str, num_shards: int, form: ShardFormat
) -> None:
    """Contiguous chunks of `samples` into `num_shards` shards (record order is kept), which
    replace the split's earlier shards once all of them are written (see the module doc); a
    file derived from a replaced or removed shard (a cached index, `NAME.*`) goes with it."""
    names = [form.name(split, i, num_shards) for i in range(num_shards)]
    bounds = [len(samples) * i // num_shards for i in range(num_shards + 1)]
    for i, name in enumerate(names):
        form.write(out / f"{name}.tmp", samples[bounds[i] : bounds[i + 1]])
    stale = sorted(set(form.existing(out, split)) - set(names))
    for name in names:
        (out / f"{name}.tmp").replace(out / name)
    for name in stale:
        (out / name).unlink()
    for name in names + stale:
        for derived in out.glob(f"{glob.escape(name)}.*"):
            derived.unlink()
    if stale:
        logging.info("write_shards: %s: removed %d earlier shards", split, len(stale))


def write_meta(out: Path, meta: dict) -> None:
    """OUT/meta.json, replaced whole (a reader never sees it half written)."""
    temporary = out / "meta.json.tmp"
    temporary.write_text(json.dumps(meta, indent=2))
    temporary.replace(out / "meta.json")


def write_zeroshot_files(out: Path, classnames: list[str], templates: Sequence[str]) -> None:
    """OUT/classnames.txt (where the folder has class names) and OUT/templates.txt: the
    webdataset source reads them beside the shards (ArrayRecordSource reads meta.json)."""
    if classnames:
        (out / "classnames.txt").write_text("".join(f"{name}\n" for name in classnames))
    (out / "templates.txt").write_text("".join(f"{template}\n" for template in templates))


def write_shards(
    src: str | Path,
    out: str | Path,
    splits: Sequence[str],
    num_shards: int,
    on_error: str,
    shard_format: str = "array_record",
) -> dict:
    """Convert every split of folder `src` into shards of `shard_format` (a FORMATS name) in
        `out`; returns (and writes) meta, which keeps the counts of splits already in `out` that
        this call does not rewrite, and names each split's shards (meta["shards"][split]: a pattern
    that `data.{split}_shards` of the webdataset source takes)."""
    if shard_format not in FORMATS:
        raise ValueError(f"format={shard_format!r} is not one of: {', '.join(FORMATS)}")
    form = FORMATS[shard_format]
    root, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classnames, templates = folder.zeroshot_metadata(root)
    write_zeroshot_files(out, classnames, templates)
    earlier = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    meta = {"classnames": classnames, "templates": list(templates)}
    meta["splits"] = earlier.get("splits", {})
    meta["shards"] = earlier.get("shards", {})
    for split in splits:
        bad = BadRecords(on_error, f"write_shards {split!r}")
        samples = good_records(root, split, bad)
        count = max(1, min(num_shards, len(samples)))
        write_split(samples, out, split, count, form)
        meta["splits"][split] = {"written": len(samples), "skipped": dict(bad.counts)}
        meta["shards"][split] = str(out / form.pattern(split, count))
        logging.info("write_shards: %s: %s", split, meta["splits"][split])
        write_meta(out, meta)  # after each split: meta.json always matches the shards
    return meta


CONVERSATION_SOURCES = ("llava_json", "messages_json")
CONVERSATION_SHARDS = ShardFormat(  # records: pack_conversation's bytes
    shard_name,
    FORMATS["array_record"].existing,
    write_records,
    FORMATS["array_record"].pattern,
)


def stored_conversations(source, bad: BadRecords) -> list[bytes]:
    """The source's records as shard records; those whose images are missing or do not decode,
    or whose turns do not parse, are reported to `bad` (the rest of the checks run on read)."""
    records = []
    for index in range(len(source)):
        try:
            stored = source.stored(index)
            for data in stored["images"]:
                decode_image(data, f"id {stored['name']!r}")
        except BadRecordError as e:
            bad.report(e.reason, f"record {index}: {e.detail}")
            continue
        records.append(conversations.pack_conversation(stored))
    return records


def write_conversation_shards(
    src: str,
    out: str | Path,
    splits: Sequence[str],
    num_shards: int,
    on_error: str,
    source_name: str = "llava_json",
    image_root: str = "",
) -> dict:
    """The splits of conversation file `src` (data.path of `source_name`: '{split}' in it is
    the split) as array_record shards in `out` for data.source="conversation_shards"; returns
    (and writes) meta as `write_shards` does."""
    if source_name not in CONVERSATION_SOURCES:
        choices = ", ".join(CONVERSATION_SOURCES)
        raise ValueError(f"conversations={source_name!r} is not one of: {choices}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    earlier = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    meta = {"source": source_name, **{k: earlier.get(k, {}) for k in ("splits", "shards")}}
    for split in splits:
        data = {"source": source_name, "path": src, "image_root": image_root, "image_size": 1}
        source = build_source(ml_collections.ConfigDict(data), split)  # image_size: unread
        bad = BadRecords(on_error, f"write_shards {split!r}")
        records = stored_conversations(source, bad)
        count = max(1, min(num_shards, len(records)))
        write_split(records, out, split, count, CONVERSATION_SHARDS)
        meta["splits"][split] = {"written": len(records), "skipped": dict(bad.counts)}
        meta["shards"][split] = str(out / CONVERSATION_SHARDS.pattern(split, count))
        logging.info("write_shards: %s: %s", split, meta["splits"][split])
        write_meta(out, meta)
    return meta


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="image folder with {split}.jsonl/.csv")
    parser.add_argument("--out", required=True, help="output directory for the shards")
    parser.add_argument("--splits", default="train,val,zeroshot")
    parser.add_argument("--num_shards", type=int, default=4)
    parser.add_argument("--on_error", choices=ON_ERROR_CHOICES, default="skip")
    parser.add_argument("--format", choices=tuple(FORMATS), default="array_record")
    parser.add_argument(
        "--conversations",
        choices=CONVERSATION_SOURCES,
        help="--src is a conversation file of this format ('{split}' in it: the split)",
    )
    parser.add_argument("--image_root", default="", help="with --conversations: image paths' root")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    splits = [s for s in args.splits.split(",") if s]
    if args.conversations:
        if args.format != "array_record":
            parser.error("--conversations writes array_record shards only")
        options = (args.on_error, args.conversations, args.image_root)
        meta = write_conversation_shards(args.src, args.out, splits, args.num_shards, *options)
    else:
        options = (args.on_error, args.format)
        meta = write_shards(args.src, args.out, splits, args.num_shards, *options)
    print(json.dumps({split: meta["splits"][split] for split in splits}))


if __name__ == "__main__":
    main()
