"""Grain pipeline: batch layout, per-process sharding, exact resume, workers, augmentation."""

import json

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vlm_jax.data import (
    build_pipeline,
    build_source,
    build_tokenizer,
    default_data_config,
    preprocess,
    zeroshot_classnames,
    zeroshot_templates,
)


def make_config(**data_overrides) -> ml_collections.ConfigDict:
    data = default_data_config()
    data.update(data_overrides)
    return ml_collections.ConfigDict({"data": data, "tokenizer": {"name": "words", "max_len": 16}})


CONFIG = make_config()
TOKENIZER = build_tokenizer(CONFIG.tokenizer)


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_layout_and_content_match_the_source():
    loader = build_pipeline(CONFIG, TOKENIZER, "val", batch_size=8, shuffle=False, num_epochs=1)
    batch = next(iter(loader))
    counters = {"bad_records", "truncated_captions", "substitute"}
    assert batch.keys() == {"image", "tokens", "id", *counters}
    assert all(batch[key].dtype == np.int32 and not batch[key].any() for key in counters)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["tokens"].shape == (8, 16) and batch["tokens"].dtype == np.int32
    assert batch["id"].dtype == np.int64
    assert batch["bad_records"].dtype == batch["truncated_captions"].dtype == np.int32
    assert batch["bad_records"].sum() == batch["truncated_captions"].sum() == 0
    np.testing.assert_array_equal(batch["id"], np.arange(8))
    source = build_source(CONFIG.data, "val")
    records = [source[i] for i in range(8)]
    expected_images = np.stack([r["image"] for r in records]).astype(np.float64) / 127.5 - 1
    np.testing.assert_allclose(batch["image"], expected_images, atol=1e-6)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    expected_tokens = TOKENIZER.batch_encode([r["caption"] for r in records], 16)
    np.testing.assert_array_equal(batch["tokens"], expected_tokens)


def test_zeroshot_batches_carry_labels_and_classnames():
    loader = build_pipeline(CONFIG, TOKENIZER, "zeroshot", batch_size=40, shuffle=False)
    batch = next(iter(loader))
    names = zeroshot_classnames(CONFIG.data)
    assert names == zeroshot_classnames(CONFIG)
    assert len(names) == 40 and names[0] == "red circle"
    np.testing.assert_array_equal(batch["label"], np.arange(40))
    for row, label in zip(batch["tokens"], batch["label"]):
        assert TOKENIZER.decode(row).endswith(names[label])
    assert "a {}" in zeroshot_templates(CONFIG.data)


def test_processes_read_disjoint_shards_that_cover_the_split():
    config = make_config(val_size=300)
    seen = []
    for process_index in range(3):
        loader = build_pipeline(
            config,
            TOKENIZER,
            "val",
            batch_size=7,
            process_index=process_index,
            process_count=3,
            num_epochs=1,
            seed=5,
            drop_remainder=False,
        )
        ids = np.concatenate([batch["id"] for batch in loader])
        assert len(ids) == len(set(ids)) == 100
        seen.append(set(ids.tolist()))
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert set().union(*seen) == set(range(300))


def test_each_epoch_is_a_new_permutation_of_the_shard():
    config = make_config(val_size=40)
    loader = build_pipeline(
        config, TOKENIZER, "val", batch_size=10, process_index=1, process_count=2, num_epochs=2
    )
    ids = np.concatenate([batch["id"] for batch in loader])
    first, second = ids[:20], ids[20:]
    assert sorted(first) == sorted(second) == list(range(20, 40))
    assert not np.array_equal(first, second)


def test_shuffle_is_seeded():
    def first_ids(seed):
        loader = build_pipeline(CONFIG, TOKENIZER, "train", batch_size=16, seed=seed)
        return next(iter(loader))["id"]

    np.testing.assert_array_equal(first_ids(1), first_ids(1))
    assert not np.array_equal(first_ids(1), first_ids(2))


def test_resume_from_state_gives_identical_next_batches():
    def loader():
        return build_pipeline(CONFIG, TOKENIZER, "train", batch_size=8, seed=11)

    iterator = iter(loader())
    take(iterator, 3)
    state = iterator.get_state()
    expected = take(iterator, 3)
    assert len(json.dumps(state)) < 1024  # small and JSON-able: stored with each checkpoint
    restored = iter(loader())
    restored.set_state(state)
    assert_same_batches(take(restored, 3), expected)


def test_iterator_state_round_trips_through_orbax(tmp_path):
    """The trainer stores the state with Grain's Orbax handler; restoring resumes exactly."""

    def loader():
        return build_pipeline(CONFIG, TOKENIZER, "train", batch_size=8, seed=2)

    manager = ocp.CheckpointManager(
        tmp_path, item_names=("data",), item_handlers={"data": grain.checkpoint.CheckpointHandler()}
    )
    iterator = iter(loader())
    take(iterator, 2)
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = take(iterator, 2)
    restored = iter(loader())
    manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_same_batches(take(restored, 2), expected)
    manager.close()


@pytest.mark.slow
def test_workers_give_the_same_batches_and_resume():
    """Worker processes change where batches are computed, never what they contain."""

    def loader(worker_count):
        return build_pipeline(
            CONFIG, TOKENIZER, "train", batch_size=8, seed=4, worker_count=worker_count
        )

    expected = take(iter(loader(0)), 6)
    iterator = iter(loader(2))
    assert_same_batches(take(iterator, 3), expected[:3])
    state = iterator.get_state()
    restored = iter(loader(2))
    restored.set_state(state)
    assert_same_batches(take(restored, 3), expected[3:])
    iterator.close()
    restored.close()


def test_train_flips_keep_captions_true():
    """Each train example is its record, or its mirror image with left/right swapped."""
    loader = build_pipeline(CONFIG, TOKENIZER, "train", batch_size=64, shuffle=False)
    batch = next(iter(loader))
    source = build_source(CONFIG.data, "train")
    flipped = 0
    for image, tokens, index in zip(batch["image"], batch["tokens"], batch["id"]):
        record = source[int(index)]
        mirrored = preprocess.hflip_record(record)
        candidates = [
            (preprocess.to_float(r["image"]), TOKENIZER.batch_encode([r["caption"]], 16)[0])
            for r in (record, mirrored)
        ]
        matches = [np.array_equal(image, c[0]) and np.array_equal(tokens, c[1]) for c in candidates]
        assert any(matches)
        flipped += not matches[0]
    assert 10 < flipped < 54


def test_fit_image_resizes_and_crops_non_square_images():
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert preprocess.fit_image(image, 32).shape == (32, 32, 3)
    np.testing.assert_array_equal(preprocess.fit_image(image, 32), preprocess.fit_image(image, 32))
    crops = {preprocess.fit_image(image, 20, np.random.default_rng(s)).tobytes() for s in range(5)}
    assert len(crops) > 1
    np.testing.assert_array_equal(preprocess.crop(image, 40), image[:, 10:50])
    values = preprocess.to_float(np.asarray([[[0, 128, 255]]], np.uint8))
    np.testing.assert_allclose(values, [[[-1.0, 128 / 127.5 - 1, 1.0]]], atol=1e-6)


def test_bad_arguments_name_the_valid_choices():
    with pytest.raises(ValueError, match="data.source='nope' is not one of: .*shapes"):
        build_source(ml_collections.ConfigDict({"source": "nope"}), "train")
    with pytest.raises(ValueError, match="process_index=3"):
        build_pipeline(CONFIG, TOKENIZER, "val", batch_size=4, process_index=3, process_count=3)
