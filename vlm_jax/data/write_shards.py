"""Write an image folder (see `vlm_jax.data.folder`) as array_record shards.

    python -m vlm_jax.data.write_shards --src DIR --out OUT [--splits train,val,zeroshot]
        [--num_shards 4] [--on_error skip|fail]

Every image is decoded once here, so the shards hold only good records; missing files, empty
captions and undecodable images are counted per split, logged, and recorded in OUT/meta.json
(or stop the run with --on_error fail). The original encoded bytes are stored, not pixels.

Writing into an OUT that already holds shards of a split replaces them: the new set is written
in full first (as .tmp files), then renamed into place, and only then are the split's earlier
shards that are not part of it deleted, so an interrupted write never loses the earlier set and
a finished one never leaves shards of two writes (which `ArrayRecordSource` refuses to read).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from array_record.python.array_record_module import ArrayRecordWriter

from vlm_jax.data import folder
from vlm_jax.data.array_record_source import pack_record, shard_name, split_shards
from vlm_jax.data.records import ON_ERROR_CHOICES, BadRecordError, BadRecords, decode_image


def good_records(root: Path, split: str, bad: BadRecords) -> list[bytes]:
    """The packed records of a split whose files exist, decode and have a caption."""
    rows, _ = folder.usable_rows(folder.read_manifest(folder.find_manifest(root, split)), root, bad)
    packed = []
    for row in rows:
        data = (root / row["image"]).read_bytes()
        try:
            decode_image(data)
        except BadRecordError as e:
            bad.report(e.reason, f"image {row['image']!r}: {e.detail}")
            continue
        packed.append(pack_record(data, folder.record_fields(row, int(row["id"]))))
    return packed


def write_split(records: list[bytes], out: Path, split: str, num_shards: int) -> None:
    """Contiguous chunks of `records` into `num_shards` shards (record order is kept), which
    replace the split's earlier shards once all of them are written (see the module doc)."""
    names = [shard_name(split, i, num_shards) for i in range(num_shards)]
    bounds = [len(records) * i // num_shards for i in range(num_shards + 1)]
    for i, name in enumerate(names):
        writer = ArrayRecordWriter(str(out / f"{name}.tmp"), "group_size:1")
        for record in records[bounds[i] : bounds[i + 1]]:
            writer.write(record)
        writer.close()
    stale = sorted(set(split_shards(out, split)) - set(names))
    for name in names:
        (out / f"{name}.tmp").replace(out / name)
    for name in stale:
        (out / name).unlink()
    if stale:
        logging.info("write_shards: %s: removed %d earlier shards", split, len(stale))


def write_meta(out: Path, meta: dict) -> None:
    """OUT/meta.json, replaced whole (a reader never sees it half written)."""
    temporary = out / "meta.json.tmp"
    temporary.write_text(json.dumps(meta, indent=2))
    temporary.replace(out / "meta.json")


def write_shards(
    src: str | Path, out: str | Path, splits: Sequence[str], num_shards: int, on_error: str
) -> dict:
    """Convert every split of folder `src` into shards in `out`; returns (and writes) meta,
    which keeps the counts of splits already in `out` that this call does not rewrite."""
    root, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classnames, templates = folder.zeroshot_metadata(root)
    earlier = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    meta = {"classnames": classnames, "templates": list(templates)}
    meta["splits"] = earlier.get("splits", {})
    for split in splits:
        bad = BadRecords(on_error, f"write_shards {split!r}")
        records = good_records(root, split, bad)
        write_split(records, out, split, max(1, min(num_shards, len(records))))
        meta["splits"][split] = {"written": len(records), "skipped": dict(bad.counts)}
        logging.info("write_shards: %s: %s", split, meta["splits"][split])
        write_meta(out, meta)  # after each split: meta.json always matches the shards
    return meta


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="image folder with {split}.jsonl/.csv")
    parser.add_argument("--out", required=True, help="output directory for the shards")
    parser.add_argument("--splits", default="train,val,zeroshot")
    parser.add_argument("--num_shards", type=int, default=4)
    parser.add_argument("--on_error", choices=ON_ERROR_CHOICES, default="skip")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    splits = [s for s in args.splits.split(",") if s]
    meta = write_shards(args.src, args.out, splits, args.num_shards, args.on_error)
    print(json.dumps({split: meta["splits"][split] for split in splits}))


if __name__ == "__main__":
    main()
