"""Evaluators by name (config.eval.tasks, vlm_jax/evaluate EVALUATORS): an evaluator registered
from this file alone trains and evaluates with the contrastive task; a name the task does not
accept fails before anything compiles, naming the task's choices; each task's default
evaluators are the metrics its runs logged before the registry."""

from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_contrastive_config, tiny_lm_config, tiny_vlm_config
from test_train import read_rows

from vlm_jax.config import ConfigError, load_config
from vlm_jax.evaluate import EVALUATORS, Evaluator
from vlm_jax.schema import Key, Schema
from vlm_jax.train import trainer
from vlm_jax.train.tasks import TASKS
from vlm_jax.train.validate import resolve_config, validate_config

CONFIGS = sorted(str(p) for p in Path("configs").glob("*.py"))


@EVALUATORS.register("prompt_norm")
class PromptNorm(Evaluator):
    """The mean norm of the text tower's embeddings of eval.prompts, times eval.scale: a plug-in
    for an existing task (`tasks`), reading the task's model through its embedding function."""

    SCHEMA = Schema(
        {
            "prompts": Key(tuple, ("a red circle", "two blue squares"), "texts to embed"),
            "scale": Key(float, 1.0, "what the norm is multiplied by"),
        }
    )
    tasks = ("contrastive",)

    def __call__(self, params):
        max_len = self.task.config.tokenizer.max_len
        tokens = self.task.tokenizer.batch_encode(list(self.settings.prompts), max_len)
        embeddings = np.asarray(self.task.embed_text({"params": params}, tokens))  # [N, E]
        norm = np.linalg.norm(embeddings, axis=-1).mean()
        return {"prompt_norm": float(norm * self.settings.scale)}


def with_eval(config, **eval_keys):
    with config.unlocked():
        config.eval.update(eval_keys)
    return config


@pytest.mark.slow
def test_an_evaluator_registered_in_a_test_trains_and_evaluates_with_its_keys(tmp_path):
    config = with_eval(
        tiny_contrastive_config(**{"train.total_steps": "2", "train.eval_every": "0"}),
        tasks=("prompt_norm", "retrieval"),
        scale=2.0,
    )
    train_metrics = trainer.train(config, tmp_path)
    rows = read_rows(tmp_path)
    evaluated = [row for row in rows if "eval/prompt_norm" in row]
    assert [row["step"] for row in evaluated] == [2]  # eval_every=0: at the end
    assert evaluated[0]["eval/prompt_norm"] > 0
    assert "eval/retrieval_i2t_r1" in evaluated[0]  # the evaluators' metrics merged
    assert not any(key.startswith("eval/zeroshot") for key in evaluated[0])
    assert train_metrics["eval/prompt_norm"] == evaluated[0]["eval/prompt_norm"]
    # the evaluate CLI's path: the same evaluators on the restored params
    again = trainer.evaluate_checkpoint(with_eval(config, tasks=("prompt_norm",)), tmp_path)
    assert again == {"step": 2, "eval/prompt_norm": pytest.approx(evaluated[0]["eval/prompt_norm"])}


def test_a_plugin_evaluators_keys_are_checked_by_its_schema():
    config = with_eval(tiny_contrastive_config(), tasks=("prompt_norm",), scael=2.0)
    with pytest.raises(ConfigError, match=r"eval.scael is not a known key.*did you mean 'scale'"):
        validate_config(config)
    config = with_eval(tiny_contrastive_config(), tasks=("prompt_norm",), prompts="a red circle")
    with pytest.raises(ConfigError, match=r"eval.prompts='a red circle' is a str; expected tuple"):
        validate_config(config)


@pytest.fixture
def no_compile(monkeypatch):
    def state_layout(*args, **kwargs):
        raise AssertionError("reached state_layout: the bad eval.tasks was not rejected up front")

    monkeypatch.setattr(trainer, "state_layout", state_layout)


@pytest.mark.parametrize(
    "config, tasks, message",
    [
        (
            "siglip_shapes",
            ("zeroshot", "zeroshoot"),
            r"eval.tasks='zeroshoot' is not one of: zeroshot, retrieval, prompt_norm "
            r"\(the evaluators task 'contrastive' accepts\)",
        ),
        (
            "siglip_shapes",
            ("perplexity",),
            r"eval.tasks='perplexity' \(an evaluator of other tasks\) is not one of: zeroshot, "
            "retrieval, prompt_norm",
        ),
        (
            "vlm_shapes",
            ("vqa", "zeroshot"),
            r"eval.tasks='zeroshot' \(an evaluator of other tasks\) is not one of: vqa, caption",
        ),
        ("lm_shapes", ("vqa",), r"eval.tasks='vqa' .*is not one of: perplexity \(the evaluators"),
        ("lm_shapes", ("perplexity", "perplexity"), r"names an evaluator twice"),
        ("vlm_shapes", "vqa", r"eval.tasks='vqa' is a str; expected tuple"),
    ],
)
def test_an_unknown_or_unsupported_evaluator_fails_before_compiling(
    tmp_path, no_compile, config, tasks, message
):
    tiny = {
        "siglip_shapes": tiny_contrastive_config,
        "vlm_shapes": tiny_vlm_config,
        "lm_shapes": tiny_lm_config,
    }
    config = tiny[config]()
    with config.unlocked(), config.ignore_type():
        config.eval.tasks = tasks
    with pytest.raises(ConfigError, match=message):
        trainer.train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the workdir was made


@pytest.mark.parametrize("name", CONFIGS)
def test_each_shipped_config_evaluates_with_its_tasks_default_evaluators(name):
    """What its runs logged before evaluators were by name: zero-shot and retrieval for the
    contrastive task, VQA and captions for the vlm task, the val loss for the lm task. A config
    that names its own (llava: VQA only, its data has no caption split) keeps them."""
    config = load_config(name)
    default = TASKS.get(config.task).evaluators
    named = config.eval.get("tasks")
    assert resolve_config(config).eval.tasks == (default if named is None else tuple(named))
    if named is not None:
        assert set(named) <= set(default), named
    assert (
        default
        == {
            "contrastive": ("zeroshot", "retrieval"),
            "vlm": ("vqa", "caption"),
            "lm": ("perplexity",),
        }[config.task]
    )
    with config.unlocked():
        del config.eval["tasks"]  # a config that names none: its task's
    assert resolve_config(config).eval.tasks == default
