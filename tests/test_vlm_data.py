"""VQA data: answers checked against the scene geometry, token layout, pipeline resume."""

import re

import numpy as np
import pytest

from vlm_jax.data import shapes
from vlm_jax.data.pipeline import default_data_config
from vlm_jax.data.sources import build_source
from vlm_jax.data.vqa import (
    QUESTION_TYPES,
    ShapesVQASource,
    build_vqa_pipeline,
    build_vqa_tokenizer,
    encode_example,
    image_token_id,
    vocabulary,
)

SINGULAR = {plural: kind for kind, plural in shapes.PLURALS.items()}
COUNTS = {"one": 1, "two": 2, "three": 3}


def _config(split_size=400):
    import ml_collections

    config = ml_collections.ConfigDict()
    config.data = default_data_config()
    config.data.source = "shapes_vqa"
    config.data.train_size = split_size
    config.data.val_size = split_size
    config.tokenizer = ml_collections.ConfigDict(
        dict(name="words", max_len=24, words=tuple(vocabulary()))
    )
    return config


def _objects(scene, colour, noun):
    kind = SINGULAR.get(noun, noun)
    return [s for s in scene.shapes if s.kind == kind and (colour is None or s.colour == colour)]


def _direction(a, b) -> str:
    """Where `a` is relative to `b` along the dominant axis (image y points down)."""
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _check(scene, kind, question, answer):
    """An independent check of one answer from the scene's shapes (geometry, not groups)."""
    colours = "|".join(shapes.COLOURS)
    if kind == "colour":
        noun = re.fullmatch(r"what colour (?:is|are) the (\w+)\?", question).group(1)
        assert {s.colour for s in _objects(scene, None, noun)} == {answer}
    elif kind == "shape":
        colour = re.fullmatch(rf"what shape (?:is|are) the ({colours}) objects?\?", question)[1]
        assert {s.kind for s in scene.shapes if s.colour == colour} == {answer}
    elif kind == "count":
        noun = re.fullmatch(r"how many (\w+) are there\?", question).group(1)
        assert len(_objects(scene, None, noun)) == COUNTS[answer]
    elif kind == "spatial":
        relations = "|".join(shapes.RELATIONS)
        m = re.fullmatch(rf"is the (\w+) (\w+) ({relations}) the (\w+) (\w+)\?", question)
        firsts, seconds = _objects(scene, m[1], m[2]), _objects(scene, m[4], m[5])
        assert firsts and seconds
        truth = all(_direction(a, b) == m[3] for a in firsts for b in seconds)
        assert answer == ("yes" if truth else "no")
    elif kind in ("exists", "absent"):
        m = re.fullmatch(r"is there a (\w+) (\w+)\?", question)
        assert answer == ("yes" if _objects(scene, m[1], m[2]) else "no")
        assert answer == ("yes" if kind == "exists" else "no")
    else:
        assert answer == shapes.describe(scene)


@pytest.mark.parametrize("split", ["train", "val"])
def test_answers_are_true_of_the_scene(split):
    config = _config()
    source = ShapesVQASource(config.data, split)
    seen = set()
    for index in range(150):
        record = source[index]
        kind = QUESTION_TYPES[record["question_type"]]
        seen.add(kind)
        question = re.fullmatch(r"user: <image> (.*) assistant:", record["prompt"])[1]
        scene = shapes.sample_scene(source.world, split, index)
        _check(scene, kind, question, record["answer"])
        np.testing.assert_array_equal(record["image"], shapes.render(scene, source.world))
    assert seen == set(QUESTION_TYPES)


def test_every_word_is_in_the_vocabulary_and_layout_is_prefix_then_answer():
    config = _config()
    tokenizer = build_vqa_tokenizer(config.tokenizer)
    assert image_token_id(tokenizer) == 4 + vocabulary().index("<image>")  # its word id
    source = ShapesVQASource(config.data, "val")
    for index in range(100):
        record = source[index]
        example = encode_example(tokenizer, record["prompt"], record["answer"], 24)
        tokens, prefix = example["tokens"], int(example["prefix_len"])
        assert tokenizer.unk_id not in tokens
        assert (
            tokens[2] == image_token_id(tokenizer) and (tokens == tokens[2]).sum() == 1
        )  # "user :"
        answer_len = len(record["answer"].split()) + 1  # words + EOS
        np.testing.assert_array_equal(
            np.flatnonzero(example["loss_mask"]), prefix + np.arange(answer_len)
        )
        assert tokens[prefix + answer_len - 1] == tokenizer.eos_id
        assert tokenizer.decode(tokens[prefix:]) == record["answer"].replace(".", " .")


def test_held_out_types_are_balanced():
    source = ShapesVQASource(_config().data, "val")
    counts = np.bincount([source[i]["question_type"] for i in range(140)], minlength=7)
    spatial = QUESTION_TYPES.index("spatial")
    assert np.all(np.delete(counts, spatial) >= 14), counts  # 20 asked of each type
    assert counts[spatial] >= 8  # asked only of scenes with two related groups


def test_too_short_max_len_names_it():
    tokenizer = build_vqa_tokenizer(_config().tokenizer)
    with pytest.raises(ValueError, match="max_len=4"):
        encode_example(tokenizer, "user: <image> how many circles are there? assistant:", "two", 4)


def test_pipeline_batches_and_resumes_exactly():
    config = _config()
    tokenizer = build_vqa_tokenizer(config.tokenizer)
    loader = build_vqa_pipeline(config, tokenizer, "train", batch_size=4, seed=3)
    iterator = iter(loader)
    first = next(iterator)
    assert first["image"].shape == (4, 1, 32, 32, 3) and first["image"].dtype == np.float32
    assert first["tokens"].shape == (4, 24) and first["prefix_len"].shape == (4,)
    state = iterator.get_state()
    expected = next(iterator)
    resumed = iter(build_vqa_pipeline(config, tokenizer, "train", batch_size=4, seed=3))
    resumed.set_state(state)
    got = next(resumed)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_the_shapes_source_is_a_registered_vqa_source():
    source = build_source(_config().data, "val")
    assert isinstance(source, ShapesVQASource)
    assert source.question_types == QUESTION_TYPES and source.images_per_record == 1
    assert source.blank_colour == shapes.BACKGROUND  # the empty canvas of the blank probe


def test_unknown_question_type_names_valid_choices():
    config = _config()
    config.data.question_types = ("count", "colours")
    with pytest.raises(ValueError, match="colours.*one of: colour, shape, count"):
        ShapesVQASource(config.data, "train")
