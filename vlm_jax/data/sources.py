"""Data sources by name: `build_source(config.data, split)` -> a Grain RandomAccessDataSource.

A source is anything with `__len__` and `__getitem__(index) -> record`, where a record is
`{"image": uint8[H, W, 3], "caption": str, "id": int, ...}` and the same index always gives the
same record (Grain shuffles, shards and checkpoints by index). A record that is bad data raises
`records.BadRecordError` (or comes back bad: the pipeline's `records.RecordCheck` normalises
and checks every image and caption, grey/RGBA arrays and encoded bytes included); the pipeline
replaces it by the next good record and counts it. Register new sources with
`@DATA_SOURCES.register("name", schema=...)` on a callable `(config.data, split) -> source`, in a
module named in DATA_SOURCES' `modules` (imported on the first lookup); the schema holds the keys
it reads beside the pipeline's (PIPELINE), and `build_source` hands it the section resolved
against both. A source whose captions describe its whole image refuses training crops that can
cut objects out, in its schema's check (SHAPES: `refuse_cutting_crops`). Sources with a
zero-shot split expose `classnames` (indexed by the record's "label") and `templates`. Sources
of the "vlm" task give VQA / instruction records instead (image(s), prompt, answer, optional
question type: the record contract in data/vqa.py), as "shapes_vqa" and "vqa_folder" do, or
multi-turn conversations ("llava_json", "messages_json", "conversation_shards",
"conversation_tfds": data/conversations.py).
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from vlm_jax.data import decode, preprocess, shapes
from vlm_jax.data.records import DEFAULT_MAX_ASPECT_RATIO, LONG_CAPTION_CHOICES, ON_ERROR_CHOICES
from vlm_jax.registry import Registry
from vlm_jax.schema import REQUIRED, Key, Schema, Select, positive, resolve

DATA_SOURCES = Registry(
    "data.source",
    modules=(
        "vlm_jax.data.folder",
        "vlm_jax.data.array_record_source",
        "vlm_jax.data.tfds_source",
        "vlm_jax.data.vqa",
        "vlm_jax.data.vqa_folder",
        "vlm_jax.data.conversations",
        "vlm_jax.data.webdataset_source",
    ),
)


def is_range(value: Any) -> bool:
    """A (min, max) pair of finite numbers with 0 < min <= max."""
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in value)
    return len(value) == 2 and numbers and 0 < value[0] <= value[1] < math.inf


# The config.data keys of the pipeline, whatever the source (the record check and augmentation).
PIPELINE = Schema(
    {
        "image_size": Key(
            int,
            REQUIRED,
            "side of the model's input images",
            valid=positive,
            expect="a positive int",
        ),
        "flip": Key(bool, False, "random horizontal flip of train records (captions mirrored)"),
        "on_error": Key(
            str,
            "skip",
            "a bad record: skip (replace, count, log) or fail (raise)",
            choices=ON_ERROR_CHOICES,
        ),
        "long_captions": Key(
            str,
            "truncate",
            "over tokenizer.max_len: truncate, or a bad record",
            choices=LONG_CAPTION_CHOICES,
        ),
        "max_aspect_ratio": Key(
            float, DEFAULT_MAX_ASPECT_RATIO, "images more elongated are bad records"
        ),
        "decoder": Key(
            str,
            "auto",
            "image decoder of encoded sources (data/decode.py); auto: the fastest installed",
            choices=decode.decoder_choices,
            valid=decode.available,
            expect="a decoder whose package is installed ("
            + "; ".join(f"{name}: {install}" for name, (_, install) in decode.PACKAGES.items())
            + ")",
        ),
        "reduced_decode": Key(
            bool,
            True,
            "decode JPEGs at 1/2, 1/4 or 1/8 size while the shorter side >= what the crop needs "
            "(image_size; with crop=inception, TrainCrop.min_source_side)",
        ),
        "crop": Key(
            str,
            "resize_crop",
            "crop of train records: resize_crop (shorter side to image_size, random square) or "
            "inception (random area and aspect ratio, resized; data/preprocess.py)",
            choices=preprocess.CROPS,
        ),
        "crop_scale": Key(
            tuple,
            preprocess.OPEN_CLIP_SCALE,
            "crop=inception: (min, max) area of the crop, a fraction of the image's (open_clip's)",
            valid=lambda scale: is_range(scale) and scale[1] <= 1,
            expect="(min, max) area fractions with 0 < min <= max <= 1",
        ),
        "crop_ratio": Key(
            tuple,
            preprocess.INCEPTION_RATIO,
            "crop=inception: (min, max) aspect ratio (width / height) of the crop",
            valid=is_range,
            expect="(min, max) aspect ratios (width / height) with 0 < min <= max",
        ),
    }
)
DATA = Select(DATA_SOURCES, by="source", base=PIPELINE)  # config.data


def build_source(config: ml_collections.ConfigDict, split: str) -> Any:
    """`config.data` (with `source` naming the registered source) and a split name -> source."""
    return DATA_SOURCES.get(config.source)(resolve("data", config, DATA), split)


def refuse_cutting_crops(path: str, data: dict) -> None:
    """The shapes world's captions (and VQA answers) name every object of the scene and their
    relations; a crop that can cut objects out (crop=inception) would make them false."""
    if data["crop"] != "resize_crop":
        raise ValueError(
            f"{path}.crop={data['crop']!r} is refused for {path}.source={data['source']!r}: its "
            "captions name every object in the scene and their relations, and this crop can cut "
            f"objects out, making them false; use {path}.crop='resize_crop' (the scenes are drawn "
            "at image_size, so it keeps them whole)"
        )


_WORLD = shapes.World()
SHAPES = Schema(
    {
        "seed": Key(int, _WORLD.seed, "the world's seed (scenes of every split)"),
        "colours": Key(tuple, _WORLD.colours, "colour names the scenes use"),
        "kinds": Key(tuple, _WORLD.kinds, "shape kinds the scenes use"),
        "supersample": Key(int, _WORLD.supersample, "drawing resolution factor (antialiasing)"),
        "relation_prob": Key(float, _WORLD.relation_prob, "share of captions with a relation"),
        "caption_variation": Key(float, _WORLD.caption_variation, "share of varied wordings"),
        **{
            f"{split}_size": Key(int, size, f"records of the {split} split")
            for split, size in _WORLD.split_sizes
        },
    },
    doc="the embedded shapes world (vlm_jax.data.shapes)",
    check=refuse_cutting_crops,
)


def shapes_world(config: ml_collections.ConfigDict) -> shapes.World:
    """The shapes world a `config.data` describes (resolved: absent keys take SHAPES's defaults,
    the World's)."""
    data = resolve("data", config, DATA)
    return shapes.World(
        image_size=data.image_size,
        colours=tuple(data.colours),
        kinds=tuple(data.kinds),
        seed=data.seed,
        supersample=data.supersample,
        relation_prob=data.relation_prob,
        caption_variation=data.caption_variation,
        split_sizes=tuple((split, data[f"{split}_size"]) for split, _ in _WORLD.split_sizes),
    )


@DATA_SOURCES.register("shapes", schema=SHAPES)
class ShapesSource:
    """Records of the embedded shapes world (see `vlm_jax.data.shapes`), drawn on access."""

    templates = shapes.ZEROSHOT_TEMPLATES

    def __init__(self, config: ml_collections.ConfigDict, split: str):
        self.world = shapes_world(config)
        self.split = split
        self.length = self.world.split_size(split)
        self.classnames = shapes.classnames(self.world)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return shapes.make_record(self.world, self.split, int(index))

    def __repr__(self) -> str:
        return f"ShapesSource(split={self.split!r}, world={self.world})"


def _data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.data` of a full experiment config, or `config` itself if it is the data part."""
    return config.data if "data" in config else config


def zeroshot_classnames(config: ml_collections.ConfigDict) -> list[str]:
    """Class names of the zeroshot split (config or config.data), indexed by "label"."""
    return list(build_source(_data_config(config), "zeroshot").classnames)


def zeroshot_templates(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Prompt templates ("a {}", ...) for the zero-shot classes (config or config.data)."""
    return tuple(build_source(_data_config(config), "zeroshot").templates)
