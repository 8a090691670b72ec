"""TFDS datasets prepared in a local data dir (array_record format), read via Grain.

    config.data.source = "tfds"
    config.data.tfds_name = "coco_captions"          # or "imagenet2012" for zero-shot
    config.data.tfds_data_dir = "/data/tfds"         # where `tfds build` put it; no downloads
    config.data.tfds_splits = {"train": "train", "val": "validation", "zeroshot": "validation"}
    config.data.image_key = "image"
    config.data.caption_key = "captions/text"        # "/" walks nested features; of a list of
                                                     # captions the first is used
    config.data.label_key = "label"                  # zero-shot labels (a ClassLabel feature)

`tfds.data_source` gives random access over the array_record files, so Grain shuffles, shards
and checkpoints it like any source. Zero-shot class names come from the label feature's names,
unless `config.data.classnames` lists them (ImageNet's feature names are WordNet ids). A record
without a caption but with a label is captioned by the first template and its class name.
Undecodable or caption-less records raise BadRecordError; the pipeline replaces and reports them
(`vlm_jax.data.records`).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from vlm_jax.data.folder import DEFAULT_TEMPLATES
from vlm_jax.data.records import BadRecordError, as_rgb
from vlm_jax.data.sources import DATA_SOURCES
from vlm_jax.schema import REQUIRED, Key, Schema


def lookup(example: dict, key: str) -> Any:
    """example["a"]["b"] for key "a/b" (None if absent); of a list of texts, the first."""
    value: Any = example
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
        if isinstance(value, list | tuple) or (
            isinstance(value, np.ndarray) and value.dtype == object and value.ndim
        ):
            value = value[0] if len(value) else None
    return value


def as_text(value: Any) -> str:
    value = value.item() if isinstance(value, np.ndarray) else value
    if value is None:
        return ""
    return (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()


_OPTIONAL_NAMES = (tuple, type(None))
TFDS = Schema(
    {
        "tfds_name": Key(str, REQUIRED, "the TFDS builder (coco_captions, imagenet2012, ...)"),
        "tfds_data_dir": Key(str, "", "where `tfds build` put it ('': TFDS's default)"),
        "tfds_splits": Key(dict, {}, "our split -> the TFDS split, e.g. {'val': 'validation'}"),
        "image_key": Key(str, "image", "feature holding the image"),
        "caption_key": Key(str, "caption", "feature holding the caption(s); '/' walks nesting"),
        "label_key": Key(str, "label", "zero-shot label feature (a ClassLabel)"),
        "classnames": Key(_OPTIONAL_NAMES, None, "zero-shot class names; None: the labels'"),
        "templates": Key(_OPTIONAL_NAMES, None, "zero-shot prompts; None: the defaults"),
    }
)


def open_split(config: ml_collections.ConfigDict, split: str):
    """tfds.data_source over our `split`'s TFDS split (data.tfds_splits) of a prepared dataset."""
    import tensorflow_datasets as tfds

    splits = dict(config.tfds_splits)
    if split not in splits:
        raise ValueError(f"split {split!r} is not one of data.tfds_splits: {sorted(splits)}")
    return tfds.data_source(
        config.tfds_name,
        split=splits[split],
        data_dir=config.tfds_data_dir or None,
        download=False,  # prepared beforehand (`tfds build`); runs never download
    )


@DATA_SOURCES.register("tfds", schema=TFDS)
class TfdsSource:
    """Records {"image": uint8[H, W, 3], "caption", "id", ["label"]} of a prepared TFDS split."""

    def __init__(self, config: ml_collections.ConfigDict, split: str):
        self.source = open_split(config, split)
        self.image_key = config.image_key
        self.caption_key = config.caption_key
        self.label_key = config.label_key
        features = dict(self.source.dataset_info.features.items())
        label_names = getattr(features.get(self.label_key), "names", [])
        self.classnames = list(config.classnames or label_names)
        self.templates = tuple(config.templates or DEFAULT_TEMPLATES)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        example = self.source[index]
        record = {"image": as_rgb(lookup(example, self.image_key)), "id": index}
        label = lookup(example, self.label_key)
        if label is not None:
            record["label"] = int(label)
        caption = as_text(lookup(example, self.caption_key))
        if not caption and "label" in record and self.classnames:
            caption = self.templates[0].format(self.classnames[record["label"]])
        if not caption:
            raise BadRecordError("empty_caption", f"no text at {self.caption_key!r}")
        return record | {"caption": caption}
