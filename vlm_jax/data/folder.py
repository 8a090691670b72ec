"""A folder of images with captions in JSONL or CSV: the format researchers actually have.

Layout of `config.data.path` (one manifest per split; any image format PIL reads):

    DIR/train.jsonl     {"image": "imgs/0001.jpg", "caption": "a cat on a mat", "label": 3}
    DIR/val.csv         image,caption[,label]       (header row; either format per split)
    DIR/zeroshot.jsonl  records with "label": index into classnames.txt
    DIR/classnames.txt  one class name per line (zero-shot)
    DIR/templates.txt   optional prompt templates, one per line ("a photo of a {}.")

Bad records never crash a run and never vanish silently. Missing image files and empty captions
are found when the manifest is read; images that fail to decode are found on access and replaced
by the next good record (so indices stay stable for Grain). Each is counted and logged as a
warning, or raises when `config.data.on_error == "fail"`. `write_shards` decodes every image up
front, so its shards hold only good records.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image

from vlm_jax.data.sources import DATA_SOURCES

ON_ERROR_CHOICES = ("skip", "fail")
DEFAULT_TEMPLATES = ("a photo of a {}.",)
# At most this many consecutive undecodable records are stepped over before giving up.
MAX_CONSECUTIVE_BAD = 100


class BadRecordError(ValueError):
    """A record that cannot be used; `reason` is one of missing_file, undecodable_image,
    empty_caption."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BadRecords:
    """Counts bad records by reason; warns (skip) or raises (fail) on each."""

    def __init__(self, on_error: str, where: str):
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"data.on_error={on_error!r} is not one of: skip, fail")
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


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8[H, W, 3] RGB; raises BadRecordError if PIL cannot decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRecordError("undecodable_image", str(e)) from None


def read_manifest(path: Path) -> list[dict]:
    """Rows of a JSONL or CSV manifest as dicts (CSV: header names the columns)."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.strip()]
    with path.open(encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


def find_manifest(root: Path, split: str) -> Path:
    candidates = [root / f"{split}.jsonl", root / f"{split}.csv"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no manifest for split {split!r}: looked for {', '.join(map(str, candidates))}"
    )


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def zeroshot_metadata(root: Path, config: ml_collections.ConfigDict) -> tuple[list, tuple]:
    """(classnames, templates) from DIR/classnames.txt and DIR/templates.txt or the config."""
    classnames = read_lines(root / "classnames.txt") if (root / "classnames.txt").is_file() else []
    if config.get("templates"):
        templates = tuple(config.templates)
    elif (root / "templates.txt").is_file():
        templates = tuple(read_lines(root / "templates.txt"))
    else:
        templates = DEFAULT_TEMPLATES
    return classnames, templates


class SkipUndecodable:
    """Random access that replaces a record failing to load (BadRecordError) by the next good
    one, cyclically, reporting each, so one bad file neither crashes a run nor shifts indices."""

    def __init__(self, load: Callable[[int], dict], length: int, bad: BadRecords):
        self.load = load
        self.length = length
        self.bad = bad

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        for offset in range(min(MAX_CONSECUTIVE_BAD, self.length)):
            candidate = (int(index) + offset) % self.length
            try:
                return self.load(candidate)
            except BadRecordError as e:
                self.bad.report(e.reason, f"record {candidate}: {e.detail}")
        raise BadRecordError(
            "too_many_bad", f"{self.bad.where}: {MAX_CONSECUTIVE_BAD} records from {index} are bad"
        )


def record_fields(row: dict, index: int) -> dict:
    """The caption/id/label fields of a manifest row (label only when given)."""
    record = {"caption": str(row.get("caption") or "").strip(), "id": int(row.get("id", index))}
    if row.get("label") not in (None, ""):
        record["label"] = int(row["label"])
    return record


def usable_rows(rows: list[dict], root: Path, bad: BadRecords) -> list[dict]:
    """Rows whose image file exists and caption is non-empty (others are reported)."""
    kept = []
    for index, row in enumerate(rows):
        image = row.get("image") or ""
        if not image or not (root / image).is_file():
            bad.report("missing_file", f"row {index}: image {image!r} not under {root}")
        elif not str(row.get("caption") or "").strip():
            bad.report("empty_caption", f"row {index}: image {image!r}")
        else:
            kept.append({**row, "id": row.get("id", index)})
    return kept


@DATA_SOURCES.register("folder")
class FolderSource(SkipUndecodable):
    """Records {"image": uint8[H, W, 3], "caption": str, "id": int, ["label": int]} of a split
    of an image folder (see the module docstring for the layout)."""

    def __init__(self, config: ml_collections.ConfigDict, split: str):
        self.root = Path(config.path)
        manifest = find_manifest(self.root, split)
        bad = BadRecords(config.get("on_error", "skip"), f"folder source {str(manifest)!r}")
        self.rows = usable_rows(read_manifest(manifest), self.root, bad)
        self.classnames, self.templates = zeroshot_metadata(self.root, config)
        super().__init__(self.load, len(self.rows), bad)

    def load(self, index: int) -> dict:
        row = self.rows[index]
        image = decode_image((self.root / row["image"]).read_bytes())
        return {"image": image, **record_fields(row, index)}

    def __repr__(self) -> str:
        return f"FolderSource(root={str(self.root)!r}, records={len(self)})"
