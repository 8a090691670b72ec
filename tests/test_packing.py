"""Sequence packing (data.packing): LLaVA-format conversations over real photos, through a
byte-level BPE release with ChatML's template, packed several per row; every conversation's
per-token losses and the gradients equal the unpacked batch's, attention never crosses
conversations (xla and the Pallas flash kernel), nothing is dropped, and resume is exact."""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_conversations import chatml_release, good_rows, gpt, hf_config, human, tmp, write_json

from vlm_jax.data.packing import example_length
from vlm_jax.data.vqa import build_vqa_pipeline, build_vqa_tokenizer, image_token_id
from vlm_jax.models.vlm import build_vlm
from vlm_jax.train.tasks.vlm import VLMTask

__all__ = ["chatml_release", "tmp"]  # fixtures
MAX_LEN = 128
CONNECTORS = {
    "mlp": {"name": "mlp"},
    "qformer": {"name": "qformer", "num_tokens": 3, "depth": 1, "text_conditioned": True},
}


def rows() -> list[dict]:
    """The conversation test's photos (1 image each), a text-only record, and two 2-image
    records: the image budget (2 per row) and the token budget both end rows."""
    two = {
        "id": "two_images",
        "image": ["imgs/cat.jpg", "imgs/coffee.jpg"],
        "conversations": [human("<image> and <image>: which is a cat?"), gpt("the first")],
    }
    return [*good_rows(), two, {**two, "id": "two_again"}]


def packing_config(tmp, release, connector="mlp", impl="xla"):
    config = hf_config(write_json(tmp, "packing.json", rows()), release, max_images=2)
    tokenizer = build_vqa_tokenizer(config.tokenizer)
    with config.unlocked():
        config.tokenizer.max_len = MAX_LEN
        config.model.image_token_id = image_token_id(tokenizer)
        config.model.lm.vocab_size = tokenizer.vocab_size
        config.model.pad_id = tokenizer.pad_id
        config.model.attention_impl = impl
        config.model.connector = ml_collections.ConfigDict(CONNECTORS[connector])
    return config, tokenizer


def all_rows(config, tokenizer, packing: bool) -> dict[str, np.ndarray]:
    """One epoch in source order, every row, as one batch."""
    stream = build_vqa_pipeline(
        config, tokenizer, "train", batch_size=1, shuffle=False, num_epochs=1, packing=packing
    )
    batches = list(stream)
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def model_inputs(batch: dict) -> dict:  # as the task gives them
    return VLMTask.model_inputs(None, {k: jnp.asarray(v) for k, v in batch.items()})


def token_losses(model, params, batch) -> jax.Array:
    """Cross-entropy float32[B, L - 1] of each next token (0 where it is not supervised)."""
    logits = model.apply({"params": params}, **VLMTask.model_inputs(None, batch))
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, jnp.asarray(batch["tokens"])[:, 1:, None], axis=-1)[..., 0]
    return nll * (batch["loss_mask"][:, 1:] > 0)


def mean_loss(model, params, batch) -> jax.Array:
    return token_losses(model, params, batch).sum() / (batch["loss_mask"][:, 1:] > 0).sum()


@pytest.fixture(scope="module")
def packed_and_not(tmp, chatml_release):
    config, tokenizer = packing_config(tmp, chatml_release)
    return config, tokenizer, all_rows(config, tokenizer, False), all_rows(config, tokenizer, True)


def test_rows_hold_every_conversation_in_order_within_both_budgets(packed_and_not):
    config, tokenizer, plain, packed = packed_and_not
    image_id = config.model.image_token_id
    lengths = [example_length(dict(tokens=t, loss_mask=m), tokenizer.pad_id)
               for t, m in zip(plain["tokens"], plain["loss_mask"])]  # fmt: skip
    images = [int((t == image_id).sum()) for t in plain["tokens"]]
    assert len(plain["tokens"]) == len(rows()) and len(packed["tokens"]) < len(rows())
    assert packed["packed_conversations"].sum() == len(rows())
    conversation = 0
    for r, (tokens, segments) in enumerate(zip(packed["tokens"], packed["segment_ids"])):
        start = slot = 0
        for segment in range(1, packed["packed_conversations"][r] + 1):
            n, k = lengths[conversation], images[conversation]
            assert (segments[start : start + n] == segment).all()
            np.testing.assert_array_equal(
                tokens[start : start + n], plain["tokens"][conversation, :n]
            )
            np.testing.assert_array_equal(
                packed["image"][r, slot : slot + k], plain["image"][conversation, :k]
            )
            prefix = packed["prefix_mask"][r, start : start + n]
            assert prefix.sum() == plain["prefix_len"][conversation] == prefix.argmin()
            start, slot, conversation = start + n, slot + k, conversation + 1
        assert (segments[start:] == 0).all() and packed["padded_tokens"][r] == MAX_LEN - start
        assert slot <= 2
        if conversation < len(rows()):  # next-fit: the next conversation did not fit this row
            assert start + lengths[conversation] > MAX_LEN or slot + images[conversation] > 2
    assert packed["loss_mask"].sum() == plain["loss_mask"][:, 1:].sum()  # no target lost


@pytest.mark.parametrize("connector", ["mlp", "qformer"])
def test_packed_and_unpacked_give_the_same_token_losses_and_gradients(
    tmp, chatml_release, packed_and_not, connector
):
    _, _, plain, packed = packed_and_not
    config, _ = packing_config(tmp, chatml_release, connector)
    model = build_vlm(config.model)
    params = model.init(jax.random.PRNGKey(0), **model_inputs(plain))["params"]
    losses = jax.jit(functools.partial(token_losses, model))
    ours, theirs = (losses(params, b) for b in (packed, plain))
    supervised = lambda losses, batch: np.asarray(losses)[batch["loss_mask"][:, 1:] > 0]
    np.testing.assert_allclose(supervised(ours, packed), supervised(theirs, plain), atol=1e-5)
    grad = jax.jit(jax.grad(functools.partial(mean_loss, model)))
    grads = [grad(params, b) for b in (packed, plain)]
    for (path, g_packed), g_plain in zip(
        jax.tree_util.tree_leaves_with_path(grads[0]), jax.tree.leaves(grads[1]), strict=True
    ):
        np.testing.assert_allclose(g_packed, g_plain, atol=1e-5, err_msg=str(path))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_attention_never_crosses_conversations(tmp, chatml_release, packed_and_not, impl):
    """Perturb the first conversation of a packed row (its words and its image): the logits
    of every other conversation in the row stay the same (its own change)."""
    _, _, plain, packed = packed_and_not
    config, _ = packing_config(tmp, chatml_release, "qformer", impl)
    model = build_vlm(config.model)
    params = model.init(jax.random.PRNGKey(1), **model_inputs(plain))["params"]
    is_image = packed["tokens"] == config.model.image_token_id
    own_images = (is_image & (packed["segment_ids"] == 1)).sum(1)  # the first slots: its
    r = int(np.flatnonzero((packed["packed_conversations"] >= 2) & (own_images > 0))[0])
    row = {key: value[r : r + 1] for key, value in packed.items()}
    first = row["segment_ids"][0] == 1
    changed = {**row, "tokens": row["tokens"].copy(), "image": row["image"].copy()}
    words = first & ~is_image[r]
    changed["tokens"][0, np.flatnonzero(words)[1:]] = 7  # all but its first token
    changed["image"][0, : own_images[r]] *= -1  # its images
    apply = jax.jit(
        lambda batch: model.apply({"params": params}, **VLMTask.model_inputs(None, batch))
    )
    logits = lambda batch: np.asarray(apply(batch))[0]
    before, after = logits(row), logits(changed)
    others = row["segment_ids"][0] >= 2
    np.testing.assert_allclose(after[others], before[others], atol=1e-6, rtol=0)
    assert np.abs(after[first] - before[first]).max() > 1e-3  # the change is real


def test_resume_is_exact_with_packing(packed_and_not):
    config, tokenizer, _, _ = packed_and_not
    stream = lambda: iter(build_vqa_pipeline(config, tokenizer, "train", batch_size=2, seed=3,
                                             packing=True))  # fmt: skip
    interrupted = stream()
    for _ in range(5):  # past the first epoch: rows span an epoch boundary
        next(interrupted)
    state = json.loads(json.dumps(interrupted.get_state()))  # as a checkpoint stores it
    expected = [next(interrupted) for _ in range(4)]
    resumed = stream()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
