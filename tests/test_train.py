"""End-to-end trainer behaviour on a tiny config: outputs, exact resume, config refusal."""

import json
import shutil

import jax
import numpy as np
import pytest
from compile_cache import compilation_cache  # noqa: F401 (autouse: compiles go through the cache)
from conftest import tiny_contrastive_config as tiny_config

from vlm_jax.checkpoint import Checkpointer
from vlm_jax.config import to_json
from vlm_jax.train import trainer
from vlm_jax.train.tasks.contrastive import ContrastiveTask
from vlm_jax.train.trainer import evaluate_checkpoint, train


def read_rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def final_params(workdir, step):
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    meta = ckpt.manager.item_metadata(step)["state"]
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(meta))
    restored = ckpt.manager.restore(
        step,
        args=__import__("orbax.checkpoint").checkpoint.args.Composite(
            state=__import__("orbax.checkpoint").checkpoint.args.StandardRestore(abstract)
        ),
    )
    ckpt.close()
    return jax.tree.map(np.asarray, restored["state"]["params"])


def numeric(row):
    return {k: v for k, v in row.items() if not k.startswith("perf/")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The tiny config trained once, uninterrupted: the reference of the resume tests."""
    full = tmp_path_factory.mktemp("uninterrupted") / "full"
    train(tiny_config(), full)
    return full


@pytest.mark.slow
def test_run_writes_outputs_and_resumes_exactly(tmp_path, uninterrupted, monkeypatch):
    config = tiny_config()
    full = uninterrupted
    assert json.loads((full / "config.json").read_text())["model"]["name"] == "two_tower"
    rows = read_rows(full)
    assert [r["step"] for r in rows] == [2, 3, 4, 6]
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/examples_per_s"} <= set(rows[0])
    assert "eval/zeroshot_top1" in rows[1] and "eval/retrieval_i2t_r1" in rows[-1]
    assert (full / "tensorboard").is_dir()

    # A run "stopped" after step 3: its checkpoint at 3 and the rows it had written so far.
    stopped = tmp_path / "stopped"
    shutil.copytree(full, stopped)
    shutil.rmtree(stopped / "checkpoints" / "6")
    fresh_states = []  # a resume restores into the abstract layout: no random init is made
    initial_state = trainer.initial_state
    monkeypatch.setattr(
        trainer, "initial_state", lambda *a: fresh_states.append(a) or initial_state(*a)
    )
    train(config, stopped)  # resumes from step 3, drops rows past 3, redoes 4..6
    assert fresh_states == []

    resumed_rows = read_rows(stopped)
    assert [numeric(r) for r in resumed_rows] == [numeric(r) for r in rows]
    a, b = final_params(full, 6), final_params(stopped, 6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)

    results = evaluate_checkpoint(config, full)
    assert results["step"] == 6
    assert results["eval/zeroshot_top1"] == pytest.approx(rows[-1]["eval/zeroshot_top1"])


def test_workdir_of_another_experiment_is_refused(tmp_path):
    config = tiny_config()
    (tmp_path / "config.json").write_text(
        json.dumps({**config.to_dict(), "model": {"name": "other"}}, default=str)
    )
    with pytest.raises(ValueError, match=r"different experiment.*model\.name"):
        train(config, tmp_path)


def test_resuming_with_another_data_worker_count_is_refused(tmp_path):
    """Grain's multi-process iterator saves per-worker positions: no silent mis-restore."""
    config = tiny_config(**{"train.worker_count": "1"})
    (tmp_path / "config.json").write_text(to_json(tiny_config(**{"train.worker_count": "0"})))
    with pytest.raises(ValueError, match=r"different experiment.*train\.worker_count: 0"):
        train(config, tmp_path)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("loss.name", "sigmoud", r"sigmoud.*sigmoid.*softmax"),
        ("eval.tasks", "zeroshot,retreival", r"eval.tasks='retreival'.*zeroshot, retrieval"),
    ],
)
def test_invalid_choice_fails_before_compute(tmp_path, key, value, message):
    config = tiny_config(**{key: value})
    with pytest.raises(ValueError, match=message):
        train(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_a_failing_evaluation_saves_the_step_and_a_relaunch_finishes_it(
    tmp_path, monkeypatch, uninterrupted
):
    """An evaluator that raises must not cost the training since the last checkpoint: the
    step is saved, the error propagates, and relaunching evaluates that step first, so the
    run ends as an uninterrupted one (same rows, same params; checkpoint_every does not
    change them). A second relaunch after a failed final evaluation changes nothing."""
    config = tiny_config(**{"train.checkpoint_every": "100"})  # only the final step is saved
    whole_rows = [numeric(r) for r in read_rows(uninterrupted)]
    real_evaluate = ContrastiveTask.evaluate

    def broken(self, params):
        raise RuntimeError("evaluator out of memory")

    # The final evaluation (eval_every=3: steps 3 and 6): the case a resume used to skip, as the
    # run is then at total_steps. A mid-run failure takes the same path, then trains on.
    failing_step = 6
    run = tmp_path / f"fails_at_{failing_step}"
    steps = iter((3, 6))  # the steps evaluate() is called at, in order

    def fails_once(self, p, steps=steps, failing_step=failing_step):
        return (broken if next(steps) == failing_step else real_evaluate)(self, p)

    monkeypatch.setattr(ContrastiveTask, "evaluate", fails_once)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(config, run)
    saved = Checkpointer(run / "checkpoints", async_save=False)
    assert saved.manager.all_steps() == [failing_step]
    saved.close()
    monkeypatch.setattr(ContrastiveTask, "evaluate", real_evaluate)
    assert "eval/zeroshot_top1" in train(config, run)
    assert [numeric(r) for r in read_rows(run)] == whole_rows
    train(config, run)  # the saved step keeps its pending row: evaluated once more
    assert [numeric(r) for r in read_rows(run)] == whole_rows
    a, b = final_params(uninterrupted, 6), final_params(run, 6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
