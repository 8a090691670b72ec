"""A folder of images with captions in JSONL or CSV: the format researchers actually have.

Layout of `config.data.path` (one manifest per split; any image format PIL reads):

    DIR/train.jsonl     {"image": "imgs/0001.jpg", "caption": "a cat on a mat", "label": 3}
    DIR/val.csv         image,caption[,label]       (header row; either format per split)
    DIR/zeroshot.jsonl  records with "label": index into classnames.txt
    DIR/classnames.txt  one class name per line (zero-shot)
    DIR/templates.txt   optional prompt templates, one per line ("a photo of a {}.")

Bad records never crash a run and never vanish silently. Missing image files, empty captions and
bad labels are found when the manifest is read (dropped and logged, or raising when
`config.data.on_error == "fail"`); each dropped row is counted in the "bad_records" of the
record after it (`FolderSource.dropped_before`), so it reaches metrics.jsonl's data/bad_records
like the bad records found later. An image that fails to decode raises BadRecordError on
access, and the pipeline's `records.CheckedSource` replaces it by the next good record.
`write_shards` decodes every image up front, so its shards hold only good records.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from vlm_jax.config import MissingInput
from vlm_jax.data.decode import image_decoder
from vlm_jax.data.records import BadRecords, decode_image
from vlm_jax.data.sources import DATA_SOURCES
from vlm_jax.schema import REQUIRED, Key, Schema

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def read_manifest(path: Path) -> list[dict]:
    """Rows of a JSONL or CSV manifest as dicts (CSV: header names the columns)."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.strip()]
    with path.open(encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


def find_manifest(root: str, split: str) -> Path:
    """DIR/<split>.jsonl or DIR/<split>.csv of the folder `root` (config.data.path)."""
    if not root or not Path(root).is_dir():
        raise MissingInput(
            f"data.path={root!r} is not a directory: expected an image folder with a manifest "
            f"per split ({split}.jsonl or {split}.csv; see vlm_jax/data/folder.py)"
        )
    candidates = [Path(root) / f"{split}.jsonl", Path(root) / f"{split}.csv"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise MissingInput(
        f"data.path={root!r}: no manifest for split {split!r}: looked for "
        f"{', '.join(map(str, candidates))}"
    )


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def zeroshot_metadata(root: Path, templates: Sequence[str] | None = None) -> tuple[list, tuple]:
    """(classnames, templates) from DIR/classnames.txt and DIR/templates.txt or `templates`
    (data.templates)."""
    classnames = read_lines(root / "classnames.txt") if (root / "classnames.txt").is_file() else []
    if templates:
        templates = tuple(templates)
    elif (root / "templates.txt").is_file():
        templates = tuple(read_lines(root / "templates.txt"))
    else:
        templates = DEFAULT_TEMPLATES
    return classnames, templates


def record_fields(row: dict, index: int) -> dict:
    """The caption/id/label fields of a manifest row (label only when given)."""
    record = {"caption": str(row.get("caption") or "").strip(), "id": int(row.get("id", index))}
    if row.get("label") not in (None, ""):
        record["label"] = int(row["label"])
    return record


def usable_rows(rows: list[dict], root: Path, bad: BadRecords) -> tuple[list[dict], list[int]]:
    """(rows whose image file exists, caption is non-empty and, when any row of the manifest
    has a label, label is a class index; their positions in `rows`). Others are reported."""
    labelled = any(row.get("label") not in (None, "") for row in rows)
    kept, positions = [], []
    for index, row in enumerate(rows):
        image, where = row.get("image") or "", f"row {index} (id={row.get('id', index)})"
        if not image or not (root / image).is_file():
            bad.report("missing_file", f"{where}: image {image!r} not under {root}")
        elif not str(row.get("caption") or "").strip():
            bad.report("empty_caption", f"{where}: image {image!r}")
        elif labelled and not str(row.get("label")).strip().isdigit():
            bad.report("bad_label", f"{where}: label {row.get('label')!r} is not a class index")
        else:
            kept.append({**row, "id": row.get("id", index)})
            positions.append(index)
    return kept, positions


def drops_before(positions: list[int], total: int) -> list[int]:
    """For each kept row (at `positions` of `total` rows), how many rows were dropped since the
    kept row before it; rows dropped after the last kept row count at the first (cyclically),
    so the counts add up to every dropped row once: [0, 2, 3] of 5 -> [1, 1, 0]."""
    previous = [positions[-1] - total, *positions[:-1]] if positions else []
    return [position - before - 1 for position, before in zip(positions, previous)]


# The keys of a source reading files under `path` (folder and array_record).
FILES = Schema(
    {
        "path": Key(str, REQUIRED, "the directory (see the module docstring for its layout)"),
        "templates": Key(
            (tuple, type(None)), None, "zero-shot prompts ('a {}.'); None: the directory's"
        ),
    }
)


@DATA_SOURCES.register("folder", schema=FILES)
class FolderSource:
    """Records {"image": uint8[H, W, 3], "caption": str, "id": int, ["label": int]} of a split
    of an image folder (see the module docstring for the layout)."""

    def __init__(self, config: ml_collections.ConfigDict, split: str):
        manifest = find_manifest(config.path, split)
        self.root = Path(config.path)
        self.bad = BadRecords(config.on_error, f"folder source {str(manifest)!r}")
        rows = read_manifest(manifest)
        self.rows, positions = usable_rows(rows, self.root, self.bad)
        self.drops = drops_before(positions, len(rows))
        self.classnames, self.templates = zeroshot_metadata(self.root, config.templates)
        self.decoder = image_decoder(config, split)

    def __len__(self) -> int:
        return len(self.rows)

    def dropped_before(self, index: int) -> int:
        """Manifest rows dropped just before record `index` (see `drops_before`); the pipeline's
        CheckedSource adds them to that record's "bad_records"."""
        return self.drops[index]

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        data = (self.root / row["image"]).read_bytes()
        image = decode_image(data, f"id={row['id']} image {row['image']!r}", self.decoder)
        return {"image": image, **record_fields(row, index)}

    def __repr__(self) -> str:
        return f"FolderSource(root={str(self.root)!r}, records={len(self)})"
