"""Grain input pipeline: source -> augment -> tokenize -> per-process batches.

Built on `grain.MapDataset`, so every batch is a pure function of its position in the stream:
the order of record indices depends only on (seed, process_index, process_count), random
augmentations draw from generators seeded by (seed, position), and the iterator state
(`get_state()`, a small dict that `grain.checkpoint.CheckpointHandler` stores as JSON) is that
position. A restored iterator therefore yields exactly the batches the interrupted one would
have, and worker processes only change where batches are computed, not what they contain.
(`grain.DataLoader` gives the same guarantees but costs ~0.4 ms per record of thread
hand-offs, as much as drawing a shapes record; MapDataset with no reader threads does not.)
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags
from grain.multiprocessing import SharedMemoryArray

from vlm_jax.data import preprocess, shapes
from vlm_jax.data.records import (
    DEFAULT_MAX_ASPECT_RATIO,
    SUBSTITUTE,
    BadRecords,
    CheckedSource,
    RecordCheck,
    RecordError,
    counters,
)
from vlm_jax.data.sources import DATA, DATA_SOURCES, build_source
from vlm_jax.data.tokenizers import Tokenizer
from vlm_jax.schema import REQUIRED, resolve

# Record fields that reach the batch (besides "image" and "tokens"), when the source has them.
BATCH_FIELDS = ("id", "label")


def record_check_config() -> dict:
    """The `config.data` keys of the record check every source goes through (any source's
    config should hold them, so they can be set from the CLI)."""
    return {
        "on_error": "skip",  # a bad record: "skip" (replace, count, log) or "fail" (raise)
        "long_captions": "truncate",  # over tokenizer.max_len: "truncate" or "bad" (record)
        "max_aspect_ratio": DEFAULT_MAX_ASPECT_RATIO,  # images more elongated are bad records
    }


def decode_config() -> dict:
    """The `config.data` keys of image decoding (sources of encoded images read them)."""
    return {
        "decoder": "auto",  # data/decode.py: auto (the fastest installed), pil, simplejpeg, ...
        "reduced_decode": True,  # JPEGs decoded at 1/2, 1/4, 1/8 while shorter side >= image_size
    }


def crop_config() -> dict:
    """The `config.data` keys of the training crop (data/preprocess.py: TrainCrop)."""
    return {
        "crop": "resize_crop",  # or "inception": random area and aspect ratio, resized
        "crop_scale": preprocess.OPEN_CLIP_SCALE,  # inception: (min, max) area fraction
        "crop_ratio": preprocess.INCEPTION_RATIO,  # inception: (min, max) width / height
    }


def default_data_config(source: str = "shapes") -> ml_collections.ConfigDict:
    """`config.data` for `source`: every key the pipeline and that source read, at their defaults
    (the source's from its schema; the shapes world's by default), so each can be set from the
    CLI. Keys a source requires (a folder's `path`) are the caller's to add."""
    keys = DATA_SOURCES.schema(source).keys
    return ml_collections.ConfigDict(
        {
            "source": source,
            "image_size": shapes.World().image_size,
            "flip": True,  # random horizontal flip of train records (captions mirrored)
            **record_check_config(),
            **decode_config(),
            **crop_config(),
            **{k: key.default for k, key in keys.items() if key.default is not REQUIRED},
        }
    )


class RandomFlip(grain.transforms.RandomMap):
    """Flip half the records left-right, keeping captions true (see preprocess.hflip_record)."""

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        return preprocess.hflip_record(record) if rng.random() < 0.5 else record


class RandomCrop(grain.transforms.RandomMap):
    """The training crop (`preprocess.TrainCrop`, config.data.crop) of each record's image."""

    def __init__(self, crop: preprocess.TrainCrop):
        self.crop = crop

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        return dict(record, image=self.crop(record["image"], rng))


class ToModelInputs(grain.transforms.Map):
    """Record -> {"image": float32[S, S, 3] in [-1, 1], "tokens": int32[L], "id", ["label"],
    and the int32 counters of `records.COUNTERS` when the record has them; with `captions`
    also "caption": the checked caption text (evaluation: the text a retrieval gallery shows)}."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, image_size: int, captions=False):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.image_size = image_size
        self.captions = captions

    def map(self, record: dict) -> dict:
        image = preprocess.fit_image(record["image"], self.image_size)
        example = {
            "image": preprocess.to_float(image),
            "tokens": self.tokenizer.batch_encode([record["caption"]], self.max_len)[0],
        }
        example.update({key: np.int64(record[key]) for key in BATCH_FIELDS if key in record})
        example.update(counters(record))
        if self.captions:
            example["caption"] = np.str_(record["caption"])
        return example


def _in_context(where: str, transform: Any, call: Callable, record: Any, *args: Any) -> Any:
    """call(record, *args), any exception re-raised as a RecordError naming the record and
    source (transforms run deep in Grain, maybe in a worker process)."""
    try:
        return call(record, *args)
    except Exception as e:
        record_id = record.get("id") if isinstance(record, dict) else None
        raise RecordError(
            f"{where}: {type(transform).__name__} failed on record id={record_id}: "
            f"{type(e).__name__}: {e}"
        ) from e


class InContextMap(grain.transforms.Map):
    """A Map whose failures name the record and source (see _in_context)."""

    def __init__(self, transform: grain.transforms.Map, where: str):
        self.transform = transform
        self.where = where

    def map(self, record: dict) -> dict:
        return _in_context(self.where, self.transform, self.transform.map, record)


class InContextRandomMap(grain.transforms.RandomMap):
    """A RandomMap whose failures name the record and source (see _in_context)."""

    def __init__(self, transform: grain.transforms.RandomMap, where: str):
        self.transform = transform
        self.where = where

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        return _in_context(self.where, self.transform, self.transform.random_map, record, rng)


def worker_options(train: ml_collections.ConfigDict) -> dict[str, int]:
    """The Grain worker keywords of `batched` a `config.train` sets: worker processes per host
    and the batches each keeps ready (the trainer's training stream)."""
    return {"worker_count": train.worker_count, "worker_buffer_size": train.worker_buffer_size}


def _mark_absl_flags_parsed() -> None:
    """Grain's multiprocessing reads absl flags, which raises outside an absl `app.run` (tests,
    notebooks) because nothing parsed them; take their defaults there. No-op under app.run."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _leave_signals_to_the_trainer(worker_index: int, worker_count: int) -> None:
    """Grain worker init: ignore Ctrl-C and SIGTERM. A terminal's Ctrl-C (and some schedulers'
    SIGTERM) reaches the whole process group; a worker killed mid-batch would print a traceback
    and leave that batch's shared memory behind. The trainer stops them (`close_stream`)."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def close_stream(iterator: Iterator) -> None:
    """Stop a stream's worker processes and free the shared memory of the batches they made.

    Grain unlinks a batch's shared memory when its last array is garbage-collected, in a
    background thread; requests still queued at interpreter exit are dropped (multiprocessing
    stops that thread first), and the resource tracker then warns of leaked shared_memory
    objects. So: close (joins the workers, drops the buffered batches), then wait for the
    thread to finish every unlink queued so far. Batches the caller still holds are not freed.
    """
    iterator.close()
    # One thread, FIFO; a private attribute (Grain 0.2 has no public hook), hence the getattr.
    unlinker = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if unlinker is not None:
        unlinker.apply(int)  # returns once every earlier request has run


def check_shard_size(
    name: str, length: int, batch_size: int, process_count: int, drop_remainder: bool
) -> int:
    """Records per process; ValueError saying what to change when that is too few for a
    batch (drop_remainder=True: a full batch) or for any record at all."""
    shard = length // process_count
    if shard == 0:
        raise ValueError(f"{name}: {length} records cannot be split over {process_count} processes")
    if drop_remainder and shard < batch_size:
        raise ValueError(
            f"{name}: {length} records give {shard} per process ({process_count} processes), "
            f"fewer than the per-process batch size {batch_size}, so no full batch can be made: "
            f"lower the batch size to at most {shard} per process ({shard * process_count} in "
            "all) or add records to the split"
        )
    return shard


def batched(
    source,
    transforms: Sequence[grain.transforms.Map | grain.transforms.RandomMap],
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 1,
    drop_remainder: bool = True,
    name: str | None = None,
    pack: Callable[[grain.IterDataset], grain.IterDataset] | None = None,
) -> grain.IterDataset:
    """Any random-access source -> this process's stream of transformed, batched records.

    Process i of n owns records [i * m, (i + 1) * m), m = len(source) // n (the remainder is
    dropped so every process takes the same number of steps). Each epoch is a fresh seeded
    permutation of that shard; random transforms draw from generators seeded by (seed, the
    transform's place in the list, position in the stream). Workers take whole batches in
    turn, so the stream is the same for every `worker_count` (but a saved state restores only
    into the same worker_count); each keeps up to `worker_buffer_size` batches ready ahead of
    the trainer (the prefetch depth: worker_count * worker_buffer_size batches).
    num_epochs=None repeats forever. Errors raised by a transform name the record and `name`
    (default: repr(source)). With workers, close the iterator with `close_stream` when done
    (workers ignore SIGINT/SIGTERM: the owner of the stream stops them). `pack` turns the
    stream of transformed records into one of rows before batching (data/packing.py: the
    state is then a position plus nothing else, the row being built re-read on restore; with
    workers each packs the records it reads).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    name = name or repr(source)
    shard = check_shard_size(name, len(source), batch_size, process_count, drop_remainder)
    dataset = grain.MapDataset.source(source)[process_index * shard : (process_index + 1) * shard]
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs)
    for position, transform in enumerate(transforms, start=1):
        if isinstance(transform, grain.transforms.RandomMap):  # own stream: crop and flip
            dataset = dataset.random_map(InContextRandomMap(transform, name), seed=seed + position)
        else:  # (random streams of different transforms are independent)
            dataset = dataset.map(InContextMap(transform, name))
    # Records are generated by Python code that holds the GIL: reader threads only add overhead.
    read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    if pack is None:
        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
        stream = dataset.to_iter_dataset(read)
    else:
        stream = pack(dataset.to_iter_dataset(read)).batch(
            batch_size, drop_remainder=drop_remainder
        )
    if worker_count:
        _mark_absl_flags_parsed()
        options = grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
        )
        stream = stream.mp_prefetch(options, worker_init_fn=_leave_signals_to_the_trainer)
    return stream


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
    worker_buffer_size: int = 1,
    drop_remainder: bool = True,
    captions: bool = False,
) -> grain.IterDataset:
    """Batches of `split` for one process (see `batched` for sharding, epochs and workers).

    Every record is checked first (`records.CheckedSource`: bad ones are replaced, counted and
    logged, or raise, per `config.data.on_error`). Train records are then augmented (the crop
    `config.data.crop` names, and `config.data.flip`); other splits are resized and
    centre-cropped. Batches: {"image": float32[b, S, S, 3] in [-1, 1],
    "tokens": int32[b, L], "id": int64[b], "label": int64[b] (zeroshot), "bad_records":
    int32[b] (bad records stepped over to reach each), "truncated_captions": int32[b] (0/1),
    "substitute": int32[b] (1: a bad record's slot, filled by the next good record; evaluation
    drops these, see `load_split`), with `captions` "caption": str[b]};
    b == batch_size unless drop_remainder=False. The iterator's get_state() is a small
    JSON-able dict (grain.checkpoint.CheckpointHandler stores it).
    """
    data = resolve("data", config.data, DATA)
    where = f"data.source={data.source!r} split={split!r}"
    check = RecordCheck(
        tokenizer, config.tokenizer.max_len, data.long_captions, data.max_aspect_ratio
    )
    bad = BadRecords(data.on_error, where)
    transforms = []
    if split == "train":
        transforms.append(RandomCrop(preprocess.train_crop(data)))
        if data.flip:
            transforms.append(RandomFlip())
    transforms.append(ToModelInputs(tokenizer, config.tokenizer.max_len, data.image_size, captions))
    return batched(
        CheckedSource(build_source(data, split), check, bad),
        transforms,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        shuffle=shuffle,
        seed=seed,
        num_epochs=num_epochs,
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        drop_remainder=drop_remainder,
        name=where,
    )


def load_split(
    config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, batch_size: int
) -> dict[str, np.ndarray]:
    """A whole held-out split as arrays, each good record exactly once, in source order.

    The split's batches (`build_pipeline`, one epoch, no shuffling, no augmentation, captions
    kept) concatenated, minus the SUBSTITUTE rows: where a bad record was replaced by the next
    good one, that record would otherwise be evaluated twice. Arrays: those of the batches
    ("image", "tokens", "id", ["label"], "caption", the counters), N = the good records.
    """
    batches = build_pipeline(
        config,
        tokenizer,
        split,
        batch_size=batch_size,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        captions=True,
    )
    data = {}
    for batch in batches:
        for key, value in batch.items():
            data.setdefault(key, []).append(np.asarray(value))
    data = {key: np.concatenate(parts) for key, parts in data.items()}
    repeats = data.pop(SUBSTITUTE, np.zeros(0, np.int32)) > 0
    if repeats.any():
        logging.warning(
            "data.source=%r split=%r: %d bad records left out of the evaluation (%d kept)",
            config.data.source,
            split,
            int(repeats.sum()),
            int((~repeats).sum()),
        )
        data = {key: value[~repeats] for key, value in data.items()}
    return data
