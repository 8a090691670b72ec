"""Duplicate-aware targets (loss.positives) and hard negatives (loss.hard_negatives), plain and
chunked on 8 CPU devices, against dense references written here with explicit positive masks
and pair weights; the diagonal form is today's loss bit for bit; a tiny run trains with them."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import TINY_CONTRASTIVE, tiny_contrastive_config
from test_chunked_losses import ARGNUMS, sharded_inputs

from vlm_jax import sharding
from vlm_jax.config import ConfigError, parse_cli
from vlm_jax.losses import (
    HardNegatives,
    batch_ids,
    build_loss,
    caption_ids,
    hard_negative_miner,
    sigmoid_loss,
    softmax_loss,
)
from vlm_jax.train.tasks.contrastive import ContrastiveTask

BATCH, DIM, LENGTH = 48, 16, 6
SCALE, BIAS = jnp.float32(7.0), jnp.float32(-3.0)
MESH_CASES = [((8, 1, 1), ("data", "fsdp"), 4), ((2, 4, 1), ("data", "fsdp"), 3)]


def loss_config(name, chunked=False, positives="diagonal", tile_size=4, **hard):
    return ml_collections.ConfigDict(
        dict(
            name=name,
            chunked=chunked,
            tile_size=tile_size,
            positives=positives,
            hard_negatives=hard or dict(k=0),
        )
    )


def duplicate_batch(seed: int = 0):
    """tokens int32[B, L] of 10 captions (many duplicates), labels of 4 classes that cut across
    the captions, and the explicit masks a reference uses: same caption, same label."""
    rng = np.random.default_rng(seed)
    captions = rng.integers(2, 50, (10, LENGTH)).astype(np.int32)
    caption_of = rng.integers(0, 10, BATCH)
    labels = rng.integers(0, 4, BATCH).astype(np.int32)
    masks = {
        "same_caption": caption_of[:, None] == caption_of[None, :],
        "same_label": labels[:, None] == labels[None, :],
        "diagonal": np.eye(BATCH, dtype=bool),
    }
    return {"tokens": captions[caption_of], "label": labels}, masks


def dense_reference(name, image, text, scale, bias, positive, weight):
    """float32 jnp on the full B x B matrix: explicit positive mask P and pair weights A."""
    logits = scale * image @ text.T + (bias if name == "sigmoid" else 0.0)
    if name == "sigmoid":
        signs = 2.0 * positive - 1.0
        return -jnp.sum(weight * jax.nn.log_sigmoid(signs * logits)) / len(image)
    shifted = logits + jnp.log(weight)  # a pair counted a_ij times in the partition function
    rows = -(positive / positive.sum(1, keepdims=True)) * jax.nn.log_softmax(shifted, axis=1)
    cols = -(positive / positive.sum(0, keepdims=True)) * jax.nn.log_softmax(shifted, axis=0)
    return (jnp.sum(rows) + jnp.sum(cols)) / (2 * len(image))


def value_and_grads(loss_fn, image, text, **pair_ids):
    step = jax.jit(jax.value_and_grad(lambda *a: loss_fn(*a, **pair_ids), ARGNUMS))
    return jax.tree.leaves(step(image, text, SCALE, BIAS))


def assert_close(got, want, tol=1e-5):
    for have, expected in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(have), np.asarray(expected), rtol=tol, atol=tol)


def reference_grads(name, image, text, positive, weight):
    reference = lambda i, t, s, b: dense_reference(name, i, t, s, b, positive, weight)
    return value_and_grads(reference, image, text)


# -- duplicate-aware targets --------------------------------------------------------------------
@pytest.mark.parametrize("positives", ["same_caption", "same_label"])
@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
def test_duplicate_aware_losses_equal_a_dense_reference(name, positives):
    batch, masks = duplicate_batch()
    ids = batch_ids(positives, HardNegatives(), batch)
    positive = jnp.asarray(masks[positives], jnp.float32)
    mesh_shape, axes, tile = MESH_CASES[positives == "same_label"]
    mesh = sharding.build_mesh(mesh_shape)
    image, text = sharded_inputs(mesh, axes, BATCH, DIM)
    want = reference_grads(name, image, text, positive, jnp.ones_like(positive))
    plain = build_loss(loss_config(name, positives=positives))
    chunked = build_loss(loss_config(name, True, positives, tile), mesh)
    assert_close(value_and_grads(plain, image, text, **ids), want)
    assert_close(value_and_grads(chunked, image, text, **ids), want)
    diagonal = value_and_grads(build_loss(loss_config(name)), image, text)
    assert abs(float(want[0]) - float(diagonal[0])) > 1e-3  # the duplicates change the loss


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
def test_diagonal_is_todays_loss_bit_for_bit(name):
    mesh = sharding.build_mesh((8, 1, 1))
    image, text = sharded_inputs(mesh, ("data", "fsdp"), BATCH, DIM)
    today = {"sigmoid": sigmoid_loss, "softmax": softmax_loss}[name]
    old_keys = ml_collections.ConfigDict(dict(name=name, chunked=True, tile_size=4))
    pairs = [
        (today, build_loss(loss_config(name))),
        (build_loss(old_keys, mesh), build_loss(loss_config(name, True, "diagonal"), mesh)),
    ]
    for before, now in pairs:
        for a, b in zip(value_and_grads(before, image, text), value_and_grads(now, image, text)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The duplicate-aware form with every example its own id is the same loss (other rounding).
    distinct = {"positive_ids": jnp.arange(BATCH, dtype=jnp.int32)[:, None]}
    pair_form = build_loss(loss_config(name, True, "same_label"), mesh)
    assert_close(
        value_and_grads(pair_form, image, text, **distinct), value_and_grads(today, image, text)
    )


def test_caption_ids_are_equal_exactly_for_equal_token_rows():
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 32000, (40, 12)).astype(np.int32)
    rows[10:20] = rows[0:10]  # exact duplicates
    rows[20:30] = rows[0:10]
    rows[20:30, rng.integers(0, 12, 10)] += 1  # one token off
    rows[30:40] = rows[0:10, ::-1]  # permuted
    rows[39] = 0  # all padding
    ids = np.asarray(caption_ids(jnp.asarray(rows)))
    assert ids.shape == (40, 2) and ids.dtype == np.int32
    same_ids = (ids[:, None] == ids[None]).all(-1)
    np.testing.assert_array_equal(same_ids, (rows[:, None] == rows[None]).all(-1))


def test_bad_positives_and_hard_negative_keys_name_the_valid_choices():
    with pytest.raises(ConfigError, match="same_captoin' is not one of: diagonal, same_caption"):
        build_loss(loss_config("sigmoid", positives="same_captoin"))
    with pytest.raises(ConfigError, match=r"hard_negatives.k=-1: expected a number of texts"):
        build_loss(loss_config("sigmoid", k=-1))
    with pytest.raises(ConfigError, match=r"hard_negatives.wieght is not a known key.*weight"):
        build_loss(loss_config("sigmoid", k=2, wieght=1.0))
    with pytest.raises(ValueError, match="needs caption_ids"):
        build_loss(loss_config("sigmoid", k=2))(jnp.ones((4, 2)), jnp.ones((4, 2)), 1.0, 0.0)


# -- hard negatives ---------------------------------------------------------------------------
def brute_force_hard_negatives(image, text, positive, same_caption, k, guard):
    """numpy: per image, the k most similar texts that are not positive, not of the same
    caption and not above the guard, by descending similarity; -1 pads."""
    sims = np.asarray(image, np.float64) @ np.asarray(text, np.float64).T
    mined = np.full((len(sims), k), -1)
    for i, row in enumerate(sims):
        candidates = [j for j in range(len(row)) if not positive[i, j]]
        candidates = [j for j in candidates if not same_caption[i, j] and row[j] <= guard]
        best = sorted(candidates, key=lambda j: -row[j])[:k]
        mined[i, : len(best)] = best
    return mined


def weights_of(mined, weight):
    """float32[B, B]: 1 + weight on each image's mined texts."""
    weights = np.ones((len(mined), len(mined)), np.float32)
    for i, row in enumerate(mined):
        weights[i, row[row >= 0]] += weight
    return jnp.asarray(weights)


# Random 16-d unit vectors: similarities ~ N(0, 1/16); guard 0.3 excludes some texts, guard
# -0.2 most, leaving some images fewer than k candidates (-1 entries).
@pytest.mark.parametrize("positives,k,guard", [("diagonal", 5, 0.3), ("same_label", 12, -0.2)])
def test_mined_indices_equal_a_brute_force_reference_on_8_devices(positives, k, guard):
    batch, masks = duplicate_batch(2)
    mesh = sharding.build_mesh((2, 4, 1))
    image, text = sharded_inputs(mesh, ("data", "fsdp"), BATCH, DIM, seed=2)
    hard = HardNegatives(k=k, weight=1.0, guard=guard)
    ids = batch_ids(positives, hard, batch)
    positive_ids = ids.get("positive_ids", jnp.arange(BATCH, dtype=jnp.int32)[:, None])
    want = brute_force_hard_negatives(
        image, text, masks[positives], masks["same_caption"], hard.k, hard.guard
    )
    ring = hard_negative_miner(hard, 4, mesh, ("data", "fsdp"))
    for miner in (ring, hard_negative_miner(hard)):
        mined = jax.jit(miner)(image, text, positive_ids, ids["caption_ids"])
        np.testing.assert_array_equal(np.asarray(mined), want)
    assert (want == -1).any() == (guard < 0)


def test_the_guard_excludes_identical_captions():
    """Texts of the image's own caption are made its most similar ones: with diagonal
    positives only the caption guard keeps them out; without it they are what gets mined."""
    batch, masks = duplicate_batch(3)
    rng = np.random.default_rng(3)
    caption_of = np.unique(batch["tokens"], axis=0, return_inverse=True)[1].ravel()
    centres = rng.normal(size=(BATCH, DIM))[caption_of]  # one direction per caption
    image, text = (centres + 0.3 * rng.normal(size=(BATCH, DIM)) for _ in range(2))
    image, text = (
        (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32) for x in (image, text)
    )
    hard = HardNegatives(k=3, weight=1.0, guard=1.0)
    miner = jax.jit(hard_negative_miner(hard, 4, sharding.build_mesh((8, 1, 1)), ("data",)))
    own = jnp.arange(BATCH, dtype=jnp.int32)[:, None]
    mined = np.asarray(miner(image, text, own, caption_ids(jnp.asarray(batch["tokens"]))))
    assert (mined >= 0).all()
    assert not masks["same_caption"][np.arange(BATCH)[:, None], mined].any()
    unguarded = np.asarray(miner(image, text, own, own))  # every caption "distinct"
    duplicates = masks["same_caption"][np.arange(BATCH)[:, None], unguarded]
    assert duplicates.any(1).mean() > 0.9  # nearly every image mines a duplicate


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
def test_hard_negative_weighted_loss_equals_a_dense_reference(name):
    batch, masks = duplicate_batch(4)
    mesh = sharding.build_mesh((8, 1, 1))
    image, text = sharded_inputs(mesh, ("data", "fsdp"), BATCH, DIM, seed=4)
    config = dict(k=4, weight=2.5, guard=0.35)
    ids = batch_ids("same_caption", HardNegatives(**config), batch)
    mined = brute_force_hard_negatives(
        image, text, masks["same_caption"], masks["same_caption"], 4, 0.35
    )
    positive = jnp.asarray(masks["same_caption"], jnp.float32)
    want = reference_grads(name, image, text, positive, weights_of(mined, 2.5))
    plain = build_loss(loss_config(name, False, "same_caption", **config))
    chunked = build_loss(loss_config(name, True, "same_caption", 5, **config), mesh)
    assert_close(value_and_grads(plain, image, text, **ids), want)
    assert_close(value_and_grads(chunked, image, text, **ids), want)
    unweighted = reference_grads(name, image, text, positive, jnp.ones_like(positive))
    assert float(want[0]) > float(unweighted[0]) + 1e-3  # the weights count


def test_chunked_duplicate_aware_loss_memory_is_bounded_by_the_tile():
    """Ids, mined indices and masks never reach B x B in the ring: temp memory as the diagonal
    ring's bound (test_chunked_losses), far below one b_local x B logit matrix per device."""
    from test_chunked_losses import compiled_temp_bytes

    mesh, batch, dim, tile = sharding.build_mesh((8, 1, 1)), 16384, 8, 64
    config = loss_config("sigmoid", True, "same_label", tile, k=4, weight=1.0, guard=0.9)
    loss_fn = build_loss(config, mesh)
    ids = (jnp.arange(batch, dtype=jnp.int32) % 10)[:, None]
    with_ids = lambda *args: loss_fn(*args, positive_ids=ids, caption_ids=jnp.tile(ids, (1, 2)))
    b_local = batch // 8
    temp_bytes = compiled_temp_bytes(with_ids, mesh, batch, dim)
    assert temp_bytes <= 8 * tile * tile * 4 + 16 * b_local * dim * 4
    assert temp_bytes < b_local * batch * 4 / 50


def test_gradcache_with_duplicate_aware_targets_equals_the_plain_step():
    """The task binds the batch's pair ids to the loss; gradient caching's strided chunks put
    the embeddings back in batch order before the loss, so the ids still match them."""
    from test_gradcache import assert_trees_close, plain_value_and_grad, setup

    from vlm_jax.train.gradcache import gradcache_value_and_grad

    apply_fn, params, batch = setup(batch=12)
    batch["tokens"] = jnp.tile(batch["tokens"][:3], (4, 1))  # 3 captions, 4 copies each
    hard = HardNegatives(k=2, weight=1.5, guard=0.99)
    loss_fn = build_loss(loss_config("sigmoid", positives="same_caption", **hard._asdict()))
    bound = functools.partial(loss_fn, **batch_ids("same_caption", hard, batch))
    want = jax.jit(lambda p, b: plain_value_and_grad(apply_fn, bound, p, b))(params, batch)
    step = jax.jit(lambda p, b: gradcache_value_and_grad(apply_fn, bound, p, b, num_chunks=3))
    assert_trees_close(step(params, batch), want)


# -- through the trainer --------------------------------------------------------------------
@pytest.mark.slow
def test_a_tiny_run_with_same_caption_targets_trains(tmp_path):
    """The keys from the command line; evaluation off, as only the training loss is checked."""
    from test_extending import losses

    from vlm_jax.train.trainer import train
    from vlm_jax.train.validate import CONFIG

    flags = TINY_CONTRASTIVE | {
        "loss.positives": "same_caption",
        "loss.hard_negatives.k": "2",
        "eval.tasks": "()",
    }
    argv = ["--config", "configs/siglip_shapes.py", "--workdir", str(tmp_path / "run")]
    config, options = parse_cli(argv + [f"--config.{k}={v}" for k, v in flags.items()], CONFIG)
    workdir = options["workdir"]
    assert (config.loss.positives, config.loss.hard_negatives.k) == ("same_caption", 2)
    train(config, workdir)
    logged = losses(Path(workdir))
    assert len(logged) == 3 and np.isfinite(logged).all() and logged[-1] < logged[0], logged


def test_same_label_on_a_source_without_train_labels_says_so():
    config = tiny_contrastive_config()
    config.unlock()
    config.loss.positives = "same_label"
    task = ContrastiveTask(config, sharding.build_mesh((8, 1, 1)))
    assert task.batch_spec(16)["label"].shape == (16,)
    with pytest.raises(ValueError, match="same_label' but data.source='shapes' gives"):
        next(iter(task.train_data(16, 0, 1, 0)))
    labelled = task._int32_labels({"label": np.array([3, 1], np.int64)})  # a folder's batch
    assert labelled["label"].dtype == np.int32 and labelled["label"].tolist() == [3, 1]
