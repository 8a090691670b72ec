"""Data sources by name: `build_source(config.data, split)` -> a Grain RandomAccessDataSource.

A source is anything with `__len__` and `__getitem__(index) -> record`, where a record is
`{"image": uint8[H, W, 3], "caption": str, "id": int, ...}` and the same index always gives the
same record (Grain shuffles, shards and checkpoints by index). A record that is bad data raises
`records.BadRecordError` (or comes back bad: the pipeline's `records.RecordCheck` normalises
and checks every image and caption, grey/RGBA arrays and encoded bytes included); the pipeline
replaces it by the next good record and counts it. Register new sources with
`@DATA_SOURCES.register("name")` on a callable `(config.data, split) -> source`, in a module
named in DATA_SOURCES' `modules` (imported on the first lookup). Sources with a
zero-shot split expose `classnames` (indexed by the record's "label") and `templates`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from vlm_jax.data import shapes
from vlm_jax.registry import Registry

DATA_SOURCES = Registry(
    "data.source",
    modules=(
        "vlm_jax.data.folder",
        "vlm_jax.data.array_record_source",
        "vlm_jax.data.tfds_source",
        "vlm_jax.data.vqa",
    ),
)


def build_source(config: ml_collections.ConfigDict, split: str) -> Any:
    """`config.data` (with `source` naming the registered source) and a split name -> source."""
    return DATA_SOURCES.get(config.source)(config, split)


def shapes_world(config: ml_collections.ConfigDict) -> shapes.World:
    """The shapes world a `config.data` describes; absent keys take the World defaults."""
    defaults = shapes.World()
    sizes = dict(defaults.split_sizes)
    return shapes.World(
        image_size=config.get("image_size", defaults.image_size),
        colours=tuple(config.get("colours", defaults.colours)),
        kinds=tuple(config.get("kinds", defaults.kinds)),
        seed=config.get("seed", defaults.seed),
        supersample=config.get("supersample", defaults.supersample),
        relation_prob=config.get("relation_prob", defaults.relation_prob),
        caption_variation=config.get("caption_variation", defaults.caption_variation),
        split_sizes=tuple((split, config.get(f"{split}_size", n)) for split, n in sizes.items()),
    )


@DATA_SOURCES.register("shapes")
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
