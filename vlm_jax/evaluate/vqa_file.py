"""Evaluation on real data from files of questions: the "vqa_file" and "pope" evaluators
(plug-ins of the "vlm" task; scoring in answers.py).

    eval.vqa_path  = "/data/vqav2/val.jsonl"   {"image": "coco/000001.jpg", "question": "what
                      is the man holding?", "answers": ["bat", "bat", "a bat", ...] (or
                      "answer": "bat"), "question_type": "what is" (optional)}
    eval.pope_path = "/data/pope/adversarial.jsonl"   {"image": ..., "question": "is there a
                      dog in the image?", "answer": "yes" | "no"} (POPE's own "text" / "label"
                      fields are read too)
    eval.image_root: image paths resolve against it ('': the file's directory)
    eval.prompt_template: the prompt each question goes into ("{question}", with an `<image>`
                      marker put in front of a question without one)

"vqa_file" reports `vqa_acc` (VQA-v2-style soft accuracy, answers normalised) and
`vqa_acc_<type>` per question type; "pope" reports `pope_acc`, `pope_precision`,
`pope_recall`, `pope_f1` and `pope_yes_ratio`. Both also report the grounding probes of the
"vqa" evaluator (vqa.py): the same metrics prefixed `swapped_` (each image swapped for the next
question's) and `blank_` (a grey canvas), for a model that reads images. Each row is one image;
a missing image file or a row without a question or answer fails naming the row (held-out
data is not silently thinned).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vlm_jax.config import MissingInput
from vlm_jax.data import preprocess
from vlm_jax.data.records import as_rgb, decode_image
from vlm_jax.data.vqa import NEUTRAL_GREY, encode_example, with_image_markers
from vlm_jax.evaluate import EVALUATORS, Evaluator
from vlm_jax.evaluate.answers import pope_metrics, soft_accuracy, yes_no
from vlm_jax.evaluate.vqa import ANSWERS, generated_answers, grounding_probes
from vlm_jax.schema import REQUIRED, Key, Schema

QUESTION_FILE = Schema(
    {
        "image_root": Key(
            str, "", "question files' image paths resolve against it ('': the file's)"
        ),
        "prompt_template": Key(
            str,
            "user: {question} assistant:",
            "the prompt of each question of a question file",
            valid=lambda template: "{question}" in template,
            expect="a str holding {question}",
        ),
        "max_new_tokens": ANSWERS.keys["max_new_tokens"],
    }
)


def question_file_schema(path_key: str, answers: str) -> Schema:
    """QUESTION_FILE's keys and `path_key`, the file (JSONL of image, question, `answers`)."""
    doc = f"a JSONL of image, question, {answers} (vlm_jax/evaluate/vqa_file.py)"
    return QUESTION_FILE | Schema({path_key: Key(str, REQUIRED, doc)})


def read_question_rows(path: str, key: str) -> list[dict]:
    """The rows of a JSONL question file (`key`: its config key, for errors)."""
    file = Path(path)
    if not file.is_file():
        raise MissingInput(f"eval.{key}={path!r}: no such file")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines]
    if not rows:
        raise ValueError(f"eval.{key}={path!r} holds no questions")
    return rows


def row_answers(row: dict, where: str) -> list[str]:
    """A row's reference answers: "answers" (a list), else "answer" / "label" (one)."""
    answers = row.get("answers", row.get("answer", row.get("label")))
    answers = [answers] if isinstance(answers, str) else answers
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: 'answers' {answers!r} is not a str or a non-empty list of str")
    return answers


def question_examples(path: str, key: str, task: Any, settings: Any) -> dict:
    """A question file's rows as model inputs: "image" float32[n, 1, S, S, 3], "prompt"
    int32[n, L], "prefix_len" int32[n], "answers" (list of str per row), "question_type"
    str[n] ("" for none), "blank_colour" uint8[3]."""
    rows = read_question_rows(path, key)
    root = Path(settings.image_root) if settings.image_root else Path(path).parent
    tokenizer, config = task.tokenizer, task.config
    images, prompts, answers = [], [], []
    for number, row in enumerate(rows, 1):
        where = f"eval.{key}={path!r} line {number}"
        question, image = row.get("question", row.get("text")), row.get("image")
        if not isinstance(question, str) or not isinstance(image, str):
            raise ValueError(f"{where}: needs an 'image' path and a 'question' str")
        if not (root / image).is_file():
            raise MissingInput(f"{where}: image {image!r} not under {root}")
        rgb = as_rgb(decode_image((root / image).read_bytes(), f"{where} image {image!r}"))
        images.append(preprocess.to_float(preprocess.fit_image(rgb, config.data.image_size)))
        prompt = settings.prompt_template.replace("{question}", with_image_markers(question, 1))
        prompts.append(encode_example(tokenizer, prompt, None, config.tokenizer.max_len))
        answers.append(row_answers(row, where))
    return {
        "image": np.stack(images)[:, None],
        "prompt": np.stack([p["tokens"] for p in prompts]),
        "prefix_len": np.stack([p["prefix_len"] for p in prompts]),
        "answers": answers,
        "question_type": np.asarray([str(row.get("question_type") or "") for row in rows]),
        "blank_colour": np.asarray(NEUTRAL_GREY, np.uint8),
    }


class QuestionFileEvaluator(Evaluator):
    """Generates answers to a question file's questions (loaded on first use), with the
    grounding probes; `score(predictions, examples)` names the metrics of one probe."""

    path_key: str  # the eval key of its file
    tasks = ("vlm",)

    def __init__(self, task: Any):
        super().__init__(task)
        self._examples: dict | None = None

    def examples(self) -> dict:
        if self._examples is None:
            path = self.settings[self.path_key]
            self._examples = question_examples(path, self.path_key, self.task, self.settings)
        return self._examples

    def __call__(self, params: Any) -> dict[str, float]:
        task, examples = self.task, self.examples()
        batch = min(self.settings.batch_size, len(examples["answers"]))
        probes = grounding_probes(task.model, examples["image"], examples["blank_colour"])
        results = {}
        for prefix, images in probes.items():
            predictions = generated_answers(
                task.model, params, task.tokenizer, examples, images,
                self.settings.max_new_tokens, batch,
            )  # fmt: skip
            results |= {f"{prefix}{k}": v for k, v in self.score(predictions, examples).items()}
        return results

    def score(self, predictions: list[str], examples: dict) -> dict[str, float]:
        raise NotImplementedError


@EVALUATORS.register("vqa_file")
class VQAFile(QuestionFileEvaluator):
    path_key = "vqa_path"
    SCHEMA = question_file_schema(path_key, "answers")

    def score(self, predictions: list[str], examples: dict) -> dict[str, float]:
        scores = np.asarray([soft_accuracy(p, a) for p, a in zip(predictions, examples["answers"])])
        types = examples["question_type"]
        results = {"vqa_acc": float(scores.mean())}
        for name in filter(None, dict.fromkeys(types.tolist())):  # the types present, in order
            results[f"vqa_acc_{name}"] = float(scores[types == name].mean())
        return results


@EVALUATORS.register("pope")
class POPE(QuestionFileEvaluator):
    path_key = "pope_path"
    SCHEMA = question_file_schema(path_key, "yes/no answer")

    def examples(self) -> dict:
        examples = super().examples()
        labels = [answers[0].strip().lower() for answers in examples["answers"]]
        bad = [label for label in labels if label not in ("yes", "no")]
        if bad:
            raise ValueError(f"eval.pope_path: answer {bad[0]!r} is not 'yes' or 'no'")
        return examples | {"labels": labels}

    def score(self, predictions: list[str], examples: dict) -> dict[str, float]:
        metrics = pope_metrics([yes_no(p) for p in predictions], examples["labels"])
        return {f"pope_{name}": value for name, value in metrics.items()}
