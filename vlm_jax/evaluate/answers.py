"""Scoring free-form answers: VQA answer normalisation, VQA-v2-style soft accuracy and POPE's
yes/no metrics (pure functions; the evaluators are in vqa_file.py).

NORMALISATION (`normalise_answer`), after the VQA evaluation's description: an answer and each
reference are compared after

1. lower case, surrounding space stripped, runs of whitespace one space;
2. a comma between digits dropped ("1,000" -> "1000");
3. a period kept only as a decimal point between digits ("3.5"), else dropped;
4. every other punctuation mark but the apostrophe dropped where it touches a space or an end
   of the answer ("yes!" -> "yes"), and made a space inside a word ("black-and-white" ->
   "black and white");
5. word by word: number words zero..ten written as digits ("two" -> "2"), the articles a / an /
   the dropped, and common contractions written without their apostrophe restored ("dont" ->
   "don't").

SOFT ACCURACY (`soft_accuracy`): with one reference answer, exact match after normalisation;
with several (VQA v2 has ten annotators' answers), min(#references equal to the prediction / 3,
1): an answer three annotators gave is fully right, one that one annotator gave a third right.

POPE (`yes_no`, `pope_metrics`): a prediction is "no" when one of its normalised words is "no"
or "not", else "yes"; "yes" is the positive class.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
_APOSTROPHED = ("aren't can't couldn't didn't doesn't don't hadn't hasn't haven't isn't it's "
                "shouldn't wasn't weren't won't wouldn't i'm i've let's that's there's what's "
                "who's you're")  # fmt: skip
CONTRACTIONS = {word.replace("'", ""): word for word in _APOSTROPHED.split()}
PUNCTUATION = r"""!"#$%&()*+,\-/:;<=>?@[\\\]^_`{|}~"""  # not the apostrophe, not the period
DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
EDGE_PUNCTUATION = re.compile(rf"(?:(?<=\s)|^)[{PUNCTUATION}]+|[{PUNCTUATION}]+(?=\s|$)")
INNER_PUNCTUATION = re.compile(rf"[{PUNCTUATION}]")
SOFT_MATCHES = 3  # references that make a prediction fully right


def normalise_answer(answer: str) -> str:
    """`answer` normalised as the module docstring lists."""
    text = " ".join(answer.lower().split())
    text = DIGIT_COMMA.sub("", text)
    text = NON_DECIMAL_PERIOD.sub("", text)
    text = EDGE_PUNCTUATION.sub("", text)
    text = INNER_PUNCTUATION.sub(" ", text)
    words = [NUMBER_WORDS.get(word, word) for word in text.split() if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def soft_accuracy(prediction: str, references: Sequence[str]) -> float:
    """One question's accuracy: exact with one reference, VQA v2's min(matches / 3, 1) with
    several (all normalised)."""
    if not references:
        raise ValueError("soft_accuracy needs at least one reference answer")
    predicted = normalise_answer(prediction)
    matches = sum(normalise_answer(reference) == predicted for reference in references)
    if len(references) == 1:
        return float(matches)
    return min(matches / SOFT_MATCHES, 1.0)


def yes_no(text: str) -> str:
    """ "no" if a normalised word of `text` is "no" or "not", else "yes" (POPE's reading)."""
    return "no" if {"no", "not"} & set(normalise_answer(text).split()) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """acc, precision, recall, f1 and yes_ratio of yes/no `predictions` against `labels` ("yes"
    positive; a precision, recall or F1 with a zero denominator is 0)."""
    pairs = list(zip(predictions, labels, strict=True))
    if not pairs:
        raise ValueError("pope_metrics needs at least one prediction")
    tp = sum(p == "yes" and y == "yes" for p, y in pairs)
    fp = sum(p == "yes" and y == "no" for p, y in pairs)
    fn = sum(p == "no" and y == "yes" for p, y in pairs)
    tn = len(pairs) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "acc": (tp + tn) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / len(pairs),
    }
