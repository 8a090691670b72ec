"""Evaluation on real data (vlm_jax/evaluate/answers.py, vqa_file.py, perplexity.py): answer
normalisation, VQA soft accuracy and POPE metrics against hand-computed cases; the text-only
guardrail of a VLM initialised from an LM run equals that run's perplexity on the same file;
"vqa_file" and "pope" end to end over files of scikit-image photos."""

import json

import jax
import numpy as np
import pytest
import skimage.data
from compile_cache import compilation_cache  # noqa: F401 (autouse: compiles go through the cache)
from conftest import tiny_lm_config, tiny_vlm_config
from PIL import Image
from test_evaluators import with_eval
from test_vlm_train import save_params_steps

from vlm_jax import sharding
from vlm_jax.config import ConfigError, MissingInput
from vlm_jax.evaluate.answers import normalise_answer, pope_metrics, soft_accuracy, yes_no
from vlm_jax.evaluate.vqa import generated_answers
from vlm_jax.train import trainer
from vlm_jax.train.tasks.vlm import VLMTask
from vlm_jax.train.trainer import init_params, to_json
from vlm_jax.train.validate import validate_config

TEXTS = ["a red circle left of a blue square", "two green triangles", "one yellow cross"]


@pytest.mark.parametrize(
    "answer, normalised",
    [
        ("Two!", "2"),
        ("  The   Dog. ", "dog"),
        ("black-and-white", "black and white"),
        ("1,000", "1000"),
        ("3.5 m", "3.5 m"),
        ("dont know", "don't know"),
        ("a man's hat", "man's hat"),
        ("Yes, it is.", "yes it is"),
    ],
)
def test_answer_normalisation(answer, normalised):
    assert normalise_answer(answer) == normalised


def test_soft_accuracy_counts_matching_references_up_to_three():
    ten = ["bat", "Bat", "a bat", "club", "stick", "stick", "racket", "pole", "wood", "rod"]
    assert soft_accuracy("bat", ten) == 1.0  # three references, normalised, match
    assert soft_accuracy("stick", ten) == pytest.approx(2 / 3)
    assert soft_accuracy("pole.", ten) == pytest.approx(1 / 3)
    assert soft_accuracy("ball", ten) == 0.0
    assert soft_accuracy("two", ["2"]) == 1.0  # one reference: exact match after normalising
    assert soft_accuracy("2 bats", ["2"]) == 0.0


def test_pope_metrics_by_hand():
    predictions = [yes_no(t) for t in ("Yes.", "yes, there is", "No", "there is not", "yes")]
    assert predictions == ["yes", "yes", "no", "no", "yes"]
    labels = ["yes", "no", "no", "yes", "yes"]  # tp 2, fp 1, tn 1, fn 1
    assert pope_metrics(predictions, labels) == pytest.approx(
        {"acc": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 3 / 5}
    )
    assert pope_metrics(["no", "no"], ["yes", "no"]) == {
        "acc": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0,
    }  # fmt: skip


def only_eval(config, **eval_keys):
    """`config` evaluating with `eval_keys` alone (beside eval.batch_size)."""
    with config.unlocked():
        config.eval = {"batch_size": config.eval.batch_size, **eval_keys}
    return config


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """(held-out text file, an "lm" run's workdir, its final metrics: perplexity on the file)."""
    directory = tmp_path_factory.mktemp("lm_run")
    text_path = write_jsonl(directory / "held_out.jsonl", [{"text": t} for t in TEXTS])
    lm_config = with_eval(tiny_lm_config(**{"train.total_steps": "2"}), text_path=text_path)
    return text_path, directory / "lm", trainer.train(lm_config, directory / "lm")


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["early", "cross_attention"])
def test_text_guardrail_of_a_vlm_from_an_lm_run_equals_the_lm_runs_perplexity(lm_run, fusion):
    text_path, lm_dir, lm = lm_run
    mesh = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    losses = {}
    for init in ("", str(lm_dir)):
        config = tiny_vlm_config(
            arg="stage1", **{"model.fusion": fusion, "init.lm_checkpoint": init}
        )
        config = only_eval(config, tasks=("text_perplexity",), text_path=text_path)
        validate_config(config)
        task = VLMTask(config, mesh)
        with jax.set_mesh(mesh):
            params, _ = init_params(task, config, mesh)
            results = task.evaluate(task.load_pretrained(params))  # step 0 of the VLM run
        assert results["text_perplexity"] == pytest.approx(np.exp(results["text_loss"]))
        losses[init] = results
    from_lm = losses[str(lm_dir)]
    assert from_lm["text_loss"] == pytest.approx(lm["eval/loss"], abs=1e-5)
    assert from_lm["text_token_acc"] == pytest.approx(lm["eval/token_acc"], abs=1e-6)
    assert abs(losses[""]["text_loss"] - lm["eval/loss"]) > 1e-3  # a fresh LM is another one


def test_the_guardrail_needs_its_text_file():
    config = with_eval(tiny_vlm_config(), tasks=("vqa", "text_perplexity"))
    with pytest.raises(ConfigError, match=r"eval.text_path"):
        validate_config(config)


PHOTOS = {"astronaut": skimage.data.astronaut, "coffee": skimage.data.coffee,
          "chelsea": skimage.data.chelsea, "rocket": skimage.data.rocket}  # fmt: skip


def photo_files(directory) -> list[str]:
    (directory / "images").mkdir()
    for name, load in PHOTOS.items():
        Image.fromarray(load()).save(directory / "images" / f"{name}.png")
    return [f"images/{name}.png" for name in PHOTOS]


def tiny_vlm_eval_run(workdir, **eval_keys):
    """A "vlm" run (config.json, fresh params at step 1) evaluating with `eval_keys`."""
    config = only_eval(tiny_vlm_config(), **eval_keys)
    mesh = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    task = VLMTask(config, mesh)
    with jax.set_mesh(mesh):
        params, _ = init_params(task, config, mesh)
    workdir.mkdir()
    (workdir / "config.json").write_text(to_json(config))
    save_params_steps(workdir / "checkpoints", {1: params})
    return config, task, params


@pytest.mark.slow
def test_vqa_file_and_pope_evaluate_a_run_on_photos(tmp_path):
    images = photo_files(tmp_path)
    questions = ["what colour is the object?", "is there a circle?", "how many squares are there?",
                 "what shape is the red object?"]  # fmt: skip
    placeholder = [{"image": i, "question": q, "answer": "yes"} for i, q in zip(images, questions)]
    vqa_path = write_jsonl(tmp_path / "probe.jsonl", placeholder)
    config, task, params = tiny_vlm_eval_run(
        tmp_path / "probe_run", tasks=("vqa_file",), vqa_path=vqa_path
    )
    # the run's own greedy answers, as the evaluator asks for them
    examples = task.built_evaluators["vqa_file"].examples()
    said = generated_answers(task.model, params, task.tokenizer, examples, examples["image"], 3, 4)
    assert len(said) == 4

    other = "zzz" if "zzz" not in said else "qqq"
    rows = [
        {"image": images[0], "question": questions[0], "answers": [said[0]] * 3 + [other] * 7,
         "question_type": "colour"},  # 3 of 10 annotators: 1
        {"image": images[1], "question": questions[1], "answers": [said[1]] * 2 + [other] * 8,
         "question_type": "exists"},  # 2 of 10: 2/3
        {"image": images[2], "question": questions[2], "answer": other, "question_type": "count"},
        {"image": images[3], "question": questions[3], "answer": said[3].upper() + ".",
         "question_type": "colour"},  # one answer: exact after normalising
    ]  # fmt: skip
    flipped = {"yes": "no", "no": "yes"}
    labels = [yes_no(s) for s in said[:3]] + [flipped[yes_no(said[3])]]  # 3 of 4 right
    pope = [{"image": i, "text": q, "label": y} for i, q, y in zip(images, questions, labels)]
    workdir = tmp_path / "run"
    config, _, _ = tiny_vlm_eval_run(
        workdir,
        tasks=("vqa_file", "pope"),
        vqa_path=write_jsonl(tmp_path / "vqa.jsonl", rows),
        pope_path=write_jsonl(tmp_path / "pope.jsonl", pope),
        max_new_tokens=3,
    )
    results = trainer.evaluate_checkpoint(config, workdir)
    assert results["step"] == 1
    assert results["eval/vqa_acc"] == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)
    assert results["eval/vqa_acc_colour"] == 1.0
    assert results["eval/vqa_acc_exists"] == pytest.approx(2 / 3)
    assert results["eval/vqa_acc_count"] == 0.0
    assert results["eval/pope_acc"] == 0.75
    yes = sum(yes_no(s) == "yes" for s in said) / 4
    assert results["eval/pope_yes_ratio"] == yes
    for prefix in ("swapped_", "blank_"):  # the grounding probes on the file's questions
        for name in ("vqa_acc", "pope_acc", "pope_f1", "pope_yes_ratio"):
            assert 0.0 <= results[f"eval/{prefix}{name}"] <= 1.0
    assert (workdir / "eval_1.json").is_file()


def test_a_question_file_with_a_missing_image_or_a_bad_label_fails_naming_the_row(tmp_path):
    images = photo_files(tmp_path)
    good = {"image": images[0], "question": "is there a circle?", "answer": "yes"}
    missing = write_jsonl(tmp_path / "missing.jsonl", [good, {**good, "image": "nope.png"}])
    config = only_eval(tiny_vlm_config(), tasks=("pope",), pope_path=missing)
    validate_config(config)
    mesh = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    evaluator = VLMTask(config, mesh).built_evaluators["pope"]
    with pytest.raises(MissingInput, match=r"missing.jsonl' line 2: image 'nope.png' not under"):
        evaluator.examples()
    with config.unlocked():
        config.eval.pope_path = write_jsonl(tmp_path / "bad.jsonl", [{**good, "answer": "maybe"}])
    evaluator = VLMTask(config, mesh).built_evaluators["pope"]
    with pytest.raises(ValueError, match=r"answer 'maybe' is not 'yes' or 'no'"):
        evaluator.examples()
