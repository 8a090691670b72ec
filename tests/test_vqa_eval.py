"""VQA evaluation metrics with known answers: exact match per question type, the false-yes
rate, batching that does not divide the examples, and the swapped / blank image probes."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import tiny_vlm_config

from vlm_jax.data import preprocess
from vlm_jax.data.shapes import BACKGROUND
from vlm_jax.data.vqa import QUESTION_TYPES, build_vqa_tokenizer
from vlm_jax.evaluate import vqa
from vlm_jax.models.vlm import build_vlm

# Seven questions: (type, true answer, the stub model's answer on the question's own image).
QUESTIONS = [
    ("colour", "red", "red"),
    ("colour", "blue", "green"),
    ("count", "two", "two"),
    ("absent", "no", "yes"),
    ("absent", "no", "no"),
    ("absent", "no", "yes"),
    ("shape", "circle", "circle"),
]


@pytest.fixture(scope="module")
def config():
    return tiny_vlm_config()


@pytest.fixture(scope="module")
def tokenizer(config):
    return build_vqa_tokenizer(config.tokenizer)


def token_rows(tokenizer, words: list[str], width: int) -> np.ndarray:
    """Each word's tokens, then eos, then padding: int32[len(words), width]."""
    rows = np.full((len(words), width), tokenizer.pad_id, np.int32)
    for row, word in zip(rows, words, strict=True):
        ids = [*tokenizer.encode(word), tokenizer.eos_id]
        row[: len(ids)] = ids
    return rows


def test_exact_match_per_type_and_false_yes(tokenizer):
    types = np.asarray([t for t, _, _ in QUESTIONS])
    answers = [answer for _, answer, _ in QUESTIONS]
    outputs = token_rows(tokenizer, [said for _, _, said in QUESTIONS], width=4)
    predictions = [tokenizer.decode(row) for row in outputs]
    assert vqa._exact_match(predictions, answers, types, "p_") == {
        "p_acc": 4 / 7,
        "p_acc_colour": 1 / 2,
        "p_acc_shape": 1.0,
        "p_acc_count": 1.0,
        "p_acc_absent": 1 / 3,
        "p_absent_false_yes": 2 / 3,
    }


def test_batches_that_do_not_divide_the_examples_give_every_row_once():
    shapes = []

    def fn(a, b):
        shapes.append(a.shape)
        return a * 10 + b

    a, b = np.arange(7), np.arange(7, 14)
    np.testing.assert_array_equal(vqa._batched(fn, [a, b], batch_size=3), a * 10 + b)
    assert shapes == [(3,), (3,), (3,)]  # the last batch padded: one compiled shape


def stub_generate(tokenizer, calls: list):
    """A "model" that reads its answer off the image: example i's image is filled with
    (i + 1) / 10 and gets the answer QUESTIONS[i][2]; any other image (the blank canvas)
    gets "yes"."""
    said = [s for _, _, s in QUESTIONS]

    def generate(model, variables, images, prompt, prompt_lengths, *, max_new_tokens, **kw):
        calls.append(images.shape[0])
        codes = np.rint(np.asarray(images)[:, 0, 0, 0, 0] * 10).astype(int) - 1
        words = [said[c] if 0 <= c < len(said) else "yes" for c in codes]
        assert kw["eos_id"] == tokenizer.eos_id and kw["pad_id"] == tokenizer.pad_id
        return token_rows(tokenizer, words, max_new_tokens)

    return generate


def hand_made_examples(config, tokenizer) -> dict:
    """Real prompts of the held-out set; QUESTIONS' types, answers and coded images."""
    examples = vqa.load_examples(config, tokenizer, len(QUESTIONS))
    codes = (np.arange(len(QUESTIONS), dtype=np.float32) + 1) / 10
    images = np.broadcast_to(codes[:, None, None, None, None], examples["image"].shape)
    return examples | {
        "image": images.copy(),
        "question_type": np.asarray([t for t, _, _ in QUESTIONS]),
        "answer": [answer for _, answer, _ in QUESTIONS],
    }


def test_probes_with_a_model_that_reads_the_image(config, tokenizer, monkeypatch):
    examples = hand_made_examples(config, tokenizer)
    model = build_vlm(config.model)
    params = jax.eval_shape(
        lambda: nn.unbox(
            model.init(
                jax.random.key(0),
                examples["image"][:1],
                examples["tokens"][:1],
                examples["prefix_len"][:1],
            )
        )["params"]
    )  # shapes only: generation is the stub's, and FLOPs are counted from shapes
    calls = []
    monkeypatch.setattr(vqa, "generate", stub_generate(tokenizer, calls))
    results = {}
    for batch_size in (7, 3):
        with config.unlocked():
            config.eval.batch_size = batch_size
        calls.clear()
        results[batch_size] = vqa.evaluate_vqa(model, params, config, tokenizer, examples)
        assert calls == [batch_size] * (3 * -(-7 // batch_size))  # own, swapped, blank
    for by_batch in results.values():  # per example, from the compiled batch: may differ
        assert by_batch.pop("prefill_gflops") > 0
    assert results[3] == results[7]
    results = results[3]
    assert results == {
        # own images: as test_exact_match_per_type_and_false_yes
        "acc": 4 / 7,
        "acc_colour": 1 / 2,
        "acc_shape": 1.0,
        "acc_count": 1.0,
        "acc_absent": 1 / 3,
        "absent_false_yes": 2 / 3,
        # question i sees image i - 1: says circle red green two yes no yes
        "swapped_acc": 1 / 7,
        "swapped_acc_colour": 0.0,
        "swapped_acc_shape": 0.0,
        "swapped_acc_count": 0.0,
        "swapped_acc_absent": 1 / 3,
        "swapped_absent_false_yes": 1 / 3,  # two, yes, no
        # blank canvas: "yes" to everything
        "blank_acc": 0.0,
        "blank_acc_colour": 0.0,
        "blank_acc_shape": 0.0,
        "blank_acc_count": 0.0,
        "blank_acc_absent": 0.0,
        "blank_absent_false_yes": 1.0,
        "visual_tokens": 16.0,
    }


def test_held_out_examples_name_their_types_and_the_sources_blank_canvas(config, tokenizer):
    examples = vqa.load_examples(config, tokenizer, 7)
    assert examples["question_type"].tolist() == list(QUESTION_TYPES)  # held-out: cycled
    blank = vqa.blank_images(examples["image"], examples["blank_colour"])
    assert blank.shape == examples["image"].shape == (7, 1, 16, 16, 3)
    background = preprocess.to_float(np.asarray(BACKGROUND, np.uint8))
    np.testing.assert_array_equal(blank, np.broadcast_to(background, blank.shape))
