"""Grain input pipeline: source -> augment -> tokenize -> per-process batches.

Determinism and resume come from Grain's index sampler: the order of record indices is a pure
function of (seed, process_index, process_count, num_epochs), random augmentations draw from a
generator Grain seeds per record, and the iterator state (`get_state()` -> small JSON bytes,
stored by `grain.checkpoint.CheckpointHandler`) is the position in that order. So a restored
iterator yields exactly the batches the interrupted one would have, with any worker count.
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np
from absl import flags

from vlm_jax.data import preprocess
from vlm_jax.data.sources import build_source
from vlm_jax.data.tokenizers import Tokenizer

# Record fields that reach the batch (besides "image" and "tokens"), when the source has them.
BATCH_FIELDS = ("id", "label")


def default_data_config() -> ml_collections.ConfigDict:
    """Every `config.data` key the built-in pieces read, with defaults (shapes world)."""
    return ml_collections.ConfigDict(
        {
            "source": "shapes",
            "image_size": 32,
            "flip": True,  # random horizontal flip of train records (captions mirrored)
            # The shapes world (vlm_jax.data.shapes.World).
            "seed": 0,
            "colours": ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white"),
            "kinds": ("circle", "square", "triangle", "diamond", "cross"),
            "supersample": 4,
            "relation_prob": 0.6,
            "caption_variation": 0.25,
            "train_size": 1_000_000,
            "val_size": 1_000,
            "zeroshot_size": 1_000,
        }
    )


class RandomFlip(grain.transforms.RandomMap):
    """Flip half the records left-right, keeping captions true (see preprocess.hflip_record)."""

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        return preprocess.hflip_record(record) if rng.random() < 0.5 else record


class RandomCrop(grain.transforms.RandomMap):
    """Resize the shorter side to `image_size` and take a random square crop."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        return dict(record, image=preprocess.fit_image(record["image"], self.image_size, rng))


class ToModelInputs(grain.transforms.Map):
    """Record -> {"image": float32[S, S, 3] in [-1, 1], "tokens": int32[L], "id", ["label"]}."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, image_size: int):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.image_size = image_size

    def map(self, record: dict) -> dict:
        image = preprocess.fit_image(record["image"], self.image_size)
        example = {
            "image": preprocess.to_float(image),
            "tokens": self.tokenizer.batch_encode([record["caption"]], self.max_len)[0],
        }
        example.update({key: np.int64(record[key]) for key in BATCH_FIELDS if key in record})
        return example


def _mark_absl_flags_parsed() -> None:
    """Grain's multiprocessing reads absl flags, which raises outside an absl `app.run` (tests,
    notebooks) because nothing parsed them; take their defaults there. No-op under app.run."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_pipeline(
    config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    split: str,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    worker_count: int = 0,
    drop_remainder: bool = True,
) -> grain.DataLoader:
    """Batches of `split` for one process: an iterable whose iterator has get/set_state.

    Process i of n reads a disjoint 1/n of the records (the remainder is dropped so every
    process takes the same number of steps). Train records are augmented (random crop when the
    source's images are not already `image_size`, and `config.data.flip`); other splits are
    resized and centre-cropped. Batches: {"image": float32[b, S, S, 3], "tokens": int32[b, L],
    "id": int64[b], "label": int64[b] (zeroshot)}; b == batch_size unless not drop_remainder.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    data = config.data
    source = build_source(data, split)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=grain.sharding.ShardOptions(process_index, process_count, True),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    operations = []
    if split == "train":
        operations.append(RandomCrop(data.image_size))
        if data.get("flip", False):
            operations.append(RandomFlip())
    operations += [
        ToModelInputs(tokenizer, config.tokenizer.max_len, data.image_size),
        grain.transforms.Batch(batch_size, drop_remainder=drop_remainder),
    ]
    if worker_count:
        _mark_absl_flags_parsed()
    return grain.DataLoader(
        data_source=source, sampler=sampler, operations=operations, worker_count=worker_count
    )
