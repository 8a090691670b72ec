"""The "vlm" task on a VQA source other than the shapes world: a folder of real photographs
(scikit-image's samples) with a JSONL manifest of questions, read through the VQA record
contract, with `<image>` an added token of the byte tokenizer."""

import json

import ml_collections
import numpy as np
import pytest
from conftest import tiny_vlm_config
from PIL import Image
from skimage import data as photos

from vlm_jax.data.pipeline import default_data_config
from vlm_jax.data.sources import build_source
from vlm_jax.data.vqa import (
    NEUTRAL_GREY,
    build_vqa_pipeline,
    build_vqa_tokenizer,
    image_token_id,
)
from vlm_jax.evaluate.vqa import load_examples
from vlm_jax.train.trainer import train

# (file, image, what it shows, a person?)
PHOTOS = [
    ("cat.png", photos.chelsea, "a cat", "no"),
    ("coffee.png", photos.coffee, "a cup of coffee", "no"),
    ("astronaut.png", photos.astronaut, "an astronaut", "yes"),
    ("rocket.png", photos.rocket, "a rocket", "no"),
    ("camera.png", photos.camera, "a cameraman", "yes"),  # grey: read as RGB
]
QUESTIONS = [
    ("what is in the picture?", 2, "object"),
    ("<image> is there a person?", 3, "person"),  # the marker where the image goes
]


def manifest_rows() -> list[dict]:
    return [
        {"image": f"imgs/{name}", "prompt": prompt, "answer": photo[column], "question_type": kind}
        for photo in PHOTOS
        for name in [photo[0]]
        for prompt, column, kind in QUESTIONS
    ]


def write_folder(root, rows_by_split: dict) -> str:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for name, image, *_ in PHOTOS:
        Image.fromarray(image()).save(root / "imgs" / name)
    for split, rows in rows_by_split.items():
        lines = [json.dumps(row) for row in rows]
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    rows = manifest_rows()
    broken = [
        {"image": "imgs/missing.png", "prompt": "what is it?", "answer": "nothing"},
        {"image": "imgs/cat.png", "prompt": "what is it?", "answer": ""},
        {"image": "imgs/cat.png", "prompt": "<image> <image> twice?", "answer": "no"},
    ]
    return write_folder(tmp_path_factory.mktemp("vqa"), {"train": rows + broken, "val": rows})


def photo_config(path: str) -> ml_collections.ConfigDict:
    """The tiny VLM of tests/conftest.py, on the photo folder, with the byte tokenizer."""
    config = tiny_vlm_config(
        **{"eval.num_examples": "10", "train.batch_size": "8", "eval.batch_size": "8"}
    )
    with config.unlocked():
        config.data = default_data_config("vqa_folder")
        config.data.update(path=path, image_size=16, flip=False)
        config.tokenizer = ml_collections.ConfigDict({"name": "bytes", "max_len": 64})
        config.model.image_token_id = 260  # the first id past the 260 of the bytes tokenizer
        config.model.lm.vocab_size = 264
    return config


def test_records_follow_the_contract_and_bad_rows_are_counted(folder):
    config = photo_config(folder)
    source = build_source(config.data, "train")
    assert len(source) == len(manifest_rows()) and source.images_per_record == 1
    first = source[0]
    assert first["image"].shape == (300, 451, 3) and first["image"].dtype == np.uint8
    assert first["prompt"] == "user: <image> what is in the picture? assistant:"
    assert source[1]["prompt"] == "user: <image> is there a person? assistant:"
    assert (first["answer"], first["question_type"], first["id"]) == ("a cat", "object", 0)
    assert sum(source.dropped_before(i) for i in range(len(source))) == 3  # the broken rows
    tokenizer = build_vqa_tokenizer(config.tokenizer)
    assert image_token_id(tokenizer) == 260 and tokenizer.vocab_size == 261
    batch = next(iter(build_vqa_pipeline(config, tokenizer, "train", batch_size=10, seed=0)))
    assert batch["image"].shape == (10, 1, 16, 16, 3)
    assert ((batch["tokens"] == 260).sum(axis=1) == 1).all()  # one image token each
    assert batch["bad_records"].sum() == 3


def test_several_images_per_record(tmp_path):
    rows = [
        {"image": ["imgs/cat.png", "imgs/coffee.png"], "prompt": "which is the animal?",
         "answer": "the first"},
        {"image": ["imgs/rocket.png", "imgs/cat.png"], "prompt": "<image> or <image>?",
         "answer": "the second"},
        {"image": "imgs/cat.png", "prompt": "one image", "answer": "dropped"},
    ]  # fmt: skip
    config = photo_config(write_folder(tmp_path, {"train": rows}))
    source = build_source(config.data, "train")
    assert source.images_per_record == 2 and len(source) == 2
    assert source[0]["prompt"] == "user: <image> <image> which is the animal? assistant:"
    tokenizer = build_vqa_tokenizer(config.tokenizer)
    batch = next(iter(build_vqa_pipeline(config, tokenizer, "train", batch_size=2, seed=0)))
    assert batch["image"].shape == (2, 2, 16, 16, 3)
    assert ((batch["tokens"] == 260).sum(axis=1) == 2).all()


def test_a_tiny_vlm_trains_and_evaluates_on_real_photographs(folder, tmp_path):
    config = photo_config(folder)
    tokenizer = build_vqa_tokenizer(config.tokenizer)
    examples = load_examples(config, tokenizer, 10)
    assert examples["image"].shape == (10, 1, 16, 16, 3)
    assert examples["question_type"].tolist() == ["object", "person"] * 5
    assert tuple(examples["blank_colour"]) == NEUTRAL_GREY  # the folder has no background
    final = train(config, tmp_path / "run")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert metrics[-1]["step"] == 4 and np.isfinite(metrics[-1]["train/loss"])
    evaluated = {key.removeprefix("eval/") for key in final if key.startswith("eval/")}
    for probe in ("", "swapped_", "blank_"):
        assert {f"{probe}acc", f"{probe}acc_object", f"{probe}acc_person"} <= evaluated
    assert not evaluated & {"acc_colour", "absent_false_yes", "caption_token_acc"}  # shapes'
    assert final["eval/visual_tokens"] == 16 and final["eval/prefill_gflops"] > 0
