"""VQA / instruction records from a folder of images with a JSONL or CSV manifest per split.

Layout of `config.data.path` (any image format PIL reads; the records follow the VQA record
contract of data/vqa.py):

    DIR/train.jsonl  {"image": "imgs/0001.jpg", "prompt": "what animal is this?",
                      "answer": "a cat", "question_type": "animal", "id": 7}
                     {"image": ["a.jpg", "b.jpg"], "prompt": "<image> or <image>: which is
                      brighter?", "answer": "the first"}      (K images: a list, K per manifest)
    DIR/val.csv      image,prompt,answer[,question_type][,id]   (header row; one image a row)

`question_type` and `id` are optional (the row's position is its id). A prompt without
`<image>` markers gets its K in front; then `data.template` puts it in the chat template
("user: {prompt} assistant:" by default, the one `python -m vlm_jax.generate` gives a bare
prompt; "{prompt}" for prompts that carry their own). As in the caption folder
(data/folder.py), rows naming missing image files, with another image count than the
manifest's, with more or fewer markers than images, or without an answer are dropped when the
manifest is read (logged and counted in the next record's "bad_records"; raising with
data.on_error="fail"), and an image that fails to decode is a bad record on access.
"""

from __future__ import annotations

import collections
from pathlib import Path

import ml_collections

from vlm_jax.data.folder import drops_before, find_manifest, read_manifest
from vlm_jax.data.records import BadRecords, decode_image
from vlm_jax.data.sources import DATA_SOURCES
from vlm_jax.data.vqa import IMAGE_PLACEHOLDER, with_image_markers
from vlm_jax.schema import REQUIRED, Key, Schema

VQA_FOLDER = Schema(
    {
        "path": Key(str, REQUIRED, "the directory (see vlm_jax/data/vqa_folder.py)"),
        "template": Key(
            str,
            "user: {prompt} assistant:",
            "the chat template each manifest prompt (with its <image> markers) goes into",
            valid=lambda template: "{prompt}" in template,
            expect="a str holding {prompt}",
        ),
    }
)


def row_images(row: dict) -> list[str]:
    """The image paths of a manifest row: one path, or (JSONL) a list of them."""
    images = row.get("image") or []
    return [images] if isinstance(images, str) else list(images)


def common_image_count(rows: list[dict]) -> int:
    """K: the image count most rows of the manifest have (1 for a manifest without images)."""
    counts = collections.Counter(len(row_images(row)) for row in rows if row_images(row))
    return counts.most_common(1)[0][0] if counts else 1


def row_problem(row: dict, root: Path, num_images: int) -> tuple[str, str] | None:
    """(reason, detail) that makes a manifest row unusable, or None."""
    images = row_images(row)
    missing = [image for image in images if not (root / image).is_file()]
    prompt = row.get("prompt") or ""
    if not images or missing:
        return "missing_file", f"image {(missing or images)!r} not under {root}"
    if len(images) != num_images:
        return "bad_image", f"{len(images)} images; the manifest's rows have {num_images}"
    if not isinstance(prompt, str) or prompt.count(IMAGE_PLACEHOLDER) not in (0, num_images):
        return "bad_prompt", f"prompt {prompt!r}: need a str with 0 or {num_images} markers"
    if not str(row.get("answer") or "").strip():
        return "bad_answer", f"answer {row.get('answer')!r}"
    return None


@DATA_SOURCES.register("vqa_folder", schema=VQA_FOLDER)
class VQAFolderSource:
    """Records {"image": uint8[H, W, 3] (or a list of K), "prompt": str in data.template with
    K markers, "answer": str, ["question_type": str], "id": int} of a split of a VQA folder."""

    def __init__(self, config: ml_collections.ConfigDict, split: str):
        manifest = find_manifest(config.path, split)
        self.root = Path(config.path)
        self.template = config.template
        bad = BadRecords(config.on_error, f"vqa_folder source {str(manifest)!r}")
        rows = read_manifest(manifest)
        self.images_per_record = common_image_count(rows)
        self.rows, positions = [], []
        for index, row in enumerate(rows):
            problem = row_problem(row, self.root, self.images_per_record)
            if problem:
                bad.report(problem[0], f"row {index} (id={row.get('id', index)}): {problem[1]}")
            else:
                self.rows.append({**row, "id": int(row.get("id", index))})
                positions.append(index)
        self.drops = drops_before(positions, len(rows))

    def __len__(self) -> int:
        return len(self.rows)

    def dropped_before(self, index: int) -> int:
        """Manifest rows dropped just before record `index` (as FolderSource's)."""
        return self.drops[index]

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        images = [
            decode_image((self.root / path).read_bytes(), f"id={row['id']} image {path!r}")
            for path in row_images(row)
        ]
        prompt = with_image_markers(row.get("prompt") or "", len(images))
        record = {
            "image": images if len(images) > 1 else images[0],
            "prompt": self.template.replace("{prompt}", prompt),
            "answer": str(row["answer"]).strip(),
            "id": row["id"],
        }
        if row.get("question_type") not in (None, ""):
            record["question_type"] = str(row["question_type"])
        return record

    def __repr__(self) -> str:
        return f"VQAFolderSource(root={str(self.root)!r}, records={len(self)})"
