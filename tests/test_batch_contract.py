"""The batch contract: a task's batch_spec / host_keys, and the check of the first host batch."""

import jax
import numpy as np
import pytest
from conftest import tiny_contrastive_config, tiny_lm_config, tiny_vlm_config

from vlm_jax import sharding
from vlm_jax.config import ConfigError
from vlm_jax.train.batch import BatchContract
from vlm_jax.train.distributed import train_iterator
from vlm_jax.train.tasks import TASKS
from vlm_jax.train.tasks.contrastive import ContrastiveTask
from vlm_jax.train.trainer import batch_contract, train

SPEC = {
    "image": jax.ShapeDtypeStruct((8, 4, 4, 3), np.float32),
    "tokens": jax.ShapeDtypeStruct((8, 6), np.int32),
}
CONTRACT = BatchContract("contrastive", SPEC, ("id", "bad_records"), rows=4)


def host_batch(**changes) -> dict:
    """A good host batch (4 of the 8 rows) with `changes` (None: the key removed)."""
    batch = {
        "image": np.zeros((4, 4, 4, 3), np.float32),
        "tokens": np.zeros((4, 6), np.int32),
        "id": np.arange(4, dtype=np.int64),
    }
    batch |= changes
    return {k: v for k, v in batch.items() if v is not None}


def test_a_batch_that_keeps_the_contract_passes_and_loses_its_host_keys():
    batch = host_batch(bad_records=np.zeros(4, np.int32))
    CONTRACT.check(batch)
    assert sorted(CONTRACT.model_batch(batch)) == ["image", "tokens"]
    assert CONTRACT.batch_size == 8


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tokens": None}, "missing key 'tokens' (expected int32[4, 6])"),
        ({"caption": np.array(["a"] * 4)}, "unexpected key 'caption' (str32[4])"),
        (
            {"image": np.zeros((4, 4, 4, 1), np.float32)},
            "key 'image': expected float32[4, 4, 4, 3], got float32[4, 4, 4, 1]",
        ),
        (
            {"image": np.zeros((8, 4, 4, 3), np.float32)},  # the global batch, not this process's
            "key 'image': expected float32[4, 4, 4, 3], got float32[8, 4, 4, 3]",
        ),
        (
            {"tokens": np.zeros((4, 6), np.int64)},
            "key 'tokens': expected int32[4, 6], got int64[4, 6]",
        ),
    ],
    ids=["missing", "unexpected", "shape", "global-rows", "dtype"],
)
def test_a_broken_batch_is_a_config_error_naming_the_key(changes, message):
    with pytest.raises(ConfigError) as error:
        CONTRACT.check(host_batch(**changes))
    text = str(error.value)
    assert message in text, text
    assert text.startswith("task 'contrastive': the training data's first batch")
    assert "takes image, tokens (4 rows on this process)" in text
    assert "host-only keys bad_records, id" in text


def test_every_problem_is_named_at_once():
    batch = host_batch(tokens=None, image=np.zeros((4, 4, 4, 3), np.float64), extra=np.zeros(4))
    assert CONTRACT.problems(batch) == [
        "key 'image': expected float32[4, 4, 4, 3], got float64[4, 4, 4, 3]",
        "missing key 'tokens' (expected int32[4, 6])",
        "unexpected key 'extra' (float64[4])",
    ]


CONFIGS = {
    "contrastive": lambda: tiny_contrastive_config(**{"train.worker_count": "0"}),
    "vlm": lambda: tiny_vlm_config(**{"train.worker_count": "0"}),
    "lm": lambda: tiny_lm_config(**{"train.worker_count": "0"}),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_tasks_pipeline_keeps_its_contract(name):
    """The shipped pipelines emit exactly the contract: the spec's inputs, and only host keys
    the task names besides (the counters DataCounters reads among them)."""
    config = CONFIGS[name]()
    mesh = sharding.build_mesh(config.mesh.shape)
    task = TASKS.get(config.task)(config, mesh)
    contract = batch_contract(task, config, mesh)
    batch = next(train_iterator(task, config, mesh))
    contract.check(batch)
    assert {"bad_records", "id", "substitute"} <= set(batch) - set(contract.spec)
    assert contract.batch_size == config.train.batch_size


def with_first_batch_edited(monkeypatch, edit) -> None:
    """The contrastive pipeline's batches passed through `edit` (a user's broken source)."""
    real = ContrastiveTask.train_data

    def train_data(self, *args):
        for batch in real(self, *args):
            yield edit(dict(batch))

    monkeypatch.setattr(ContrastiveTask, "train_data", train_data)


def test_the_trainer_refuses_a_first_batch_off_the_contract(tmp_path, monkeypatch):
    """A pipeline that adds a key and changes a dtype: the run stops at its first batch, with
    an error naming both (no silent dropping of the extra key)."""

    def edit(batch):
        rows = len(batch["id"])
        return batch | {
            "caption": np.array(["a"] * rows),
            "tokens": batch["tokens"].astype(np.int64),
        }

    with_first_batch_edited(monkeypatch, edit)
    config = tiny_contrastive_config(**{"train.worker_count": "0", "train.total_steps": "1"})
    with pytest.raises(ConfigError) as error:
        train(config, tmp_path)
    assert "key 'tokens': expected int32[16, 16], got int64[16, 16]" in str(error.value)
    assert "unexpected key 'caption' (str32[16])" in str(error.value)
    metrics = tmp_path / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text()  # no step ran
