"""docs/extending.md runs: each section's code blocks execute here, in order, registering a
connector, a loss, a data source and an evaluator from this file alone (no library edit), and
train a tiny config with it through the trainer; each test then checks what its section claims."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_contrastive_config, tiny_lm_config, tiny_vlm_config
from test_chunked_losses import ARGNUMS, loss_config, sharded_inputs

from vlm_jax import sharding
from vlm_jax.checkpoint import load_params
from vlm_jax.config import ConfigError
from vlm_jax.data import build_tokenizer, load_split
from vlm_jax.losses import build_loss
from vlm_jax.models import build_model
from vlm_jax.registry import Registry
from vlm_jax.train.trainer import train

DOC = Path(__file__).parent.parent / "docs" / "extending.md"


def doc_blocks(section: str) -> list[str]:
    """The ```python blocks of the section `## {section}` of docs/extending.md, in order."""
    sections = re.split(r"^## ", DOC.read_text(), flags=re.MULTILINE)
    (body,) = [s for s in sections if s.startswith(f"{section}\n")]
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.MULTILINE | re.DOTALL)


def run_section(section: str, config, workdir: Path) -> dict:
    """Execute the section's blocks with `config` (unlocked) and `workdir` -> their namespace."""
    config.unlock()
    namespace = {"config": config, "workdir": workdir}
    for block in doc_blocks(section):
        exec(compile(block, f"{DOC} ({section})", "exec"), namespace)
    return namespace


def metric_rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir: Path) -> list[float]:
    return [row["train/loss"] for row in metric_rows(workdir) if "train/loss" in row]


@pytest.fixture(autouse=True)
def registries_restored():
    """The examples register into the library's registries; each is restored after the test,
    so no other test finds "norm_mlp" among the valid names."""
    for registry in Registry.instances:
        registry.names()  # import the plug-ins first: a restored registry counts as loaded
    saved = [(r, dict(r._entries), dict(r._schemas)) for r in Registry.instances]
    yield
    for registry, entries, schemas in saved:
        registry._entries.clear()
        registry._entries.update(entries)
        registry._schemas.clear()
        registry._schemas.update(schemas)


@pytest.mark.slow
def test_a_connector(tmp_path):
    config = tiny_vlm_config()
    run_section("A connector", config, tmp_path / "run")
    connector = load_params(tmp_path / "run")["connector"]
    assert set(connector) == {"norm", "fc1", "fc2"}
    image_width, lm_width = config.model.image.width, config.model.lm.width
    assert connector["fc1"]["kernel"].shape == (image_width, 48)
    assert connector["fc2"]["kernel"].shape == (48, lm_width)

    bad = tiny_vlm_config()
    bad.model.connector.unlock().update({"name": "norm_mlp", "hidden": 48})
    message = (
        "model.connector.hidden is not a known key of model.connector (name='norm_mlp') (valid: "
        "hidden_dim, name); did you mean 'hidden_dim'?"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused before the run directory was made


def test_a_loss_has_equal_plain_and_chunked_forms(tmp_path):
    namespace = {"config": tiny_contrastive_config(), "workdir": tmp_path}
    exec(doc_blocks("A loss")[0], namespace)  # the registration only
    mesh = sharding.build_mesh((8, 1, 1))
    image, text = sharded_inputs(mesh, ("data", "fsdp"), batch=48, dim=16)
    plain = build_loss(loss_config("image_to_text", chunked=False))
    chunked = build_loss(loss_config("image_to_text", True, tile_size=4), mesh)
    scale, bias = jnp.float32(7.0), jnp.float32(-3.0)
    expected = jax.jit(jax.value_and_grad(plain, ARGNUMS))(image, text, scale, bias)
    got = jax.jit(jax.value_and_grad(chunked, ARGNUMS))(image, text, scale, bias)
    for want, have in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(have), np.asarray(want), rtol=2e-5, atol=2e-6)
    logits = 7.0 * np.asarray(image, np.float64) @ np.asarray(text, np.float64).T
    rows = np.log(np.exp(logits).sum(axis=1)) - np.diagonal(logits)
    np.testing.assert_allclose(expected[0], rows.mean(), rtol=1e-5)


@pytest.mark.slow
def test_a_loss_trains(tmp_path):
    run_section("A loss", tiny_contrastive_config("clip_shapes"), tmp_path / "run")
    logged = losses(tmp_path / "run")
    assert len(logged) == 3 and logged[-1] < logged[0], logged


@pytest.mark.slow
def test_a_data_source(tmp_path):
    config = tiny_contrastive_config()
    namespace = run_section("A data source", config, tmp_path / "run")
    last = metric_rows(tmp_path / "run")[-1]  # step 6: the final evaluation
    colours = len(namespace["RGB"])
    assert last["data/bad_records"] == 0 and last["eval/retrieval_num_images"] == 64
    assert last["eval/retrieval_num_texts"] == colours  # one caption per colour
    assert last["eval/zeroshot_top5"] == 1.0  # 4 classes: every colour is among the top 5
    logged = losses(tmp_path / "run")
    assert len(logged) == 3 and logged[-1] < logged[0], logged

    bad = tiny_contrastive_config()
    bad.unlock()
    bad.data = namespace["default_data_config"]("colours")
    bad.data.val_size = 64
    message = r"data.val_size is not a known key of data \(source='colours'\) \(valid: colours, "
    with pytest.raises(ConfigError, match=message + ".*split_size"):
        train(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_an_evaluator(tmp_path):
    config = tiny_contrastive_config()
    run_section("An evaluator", config, tmp_path / "run")
    last = metric_rows(tmp_path / "run")[-1]  # the final evaluation: both evaluators ran
    assert "eval/zeroshot_top1" in last and "eval/retrieval_i2t_r1" not in last

    # The same number from the checkpoint without the evaluator's code: unsharded, in numpy.
    params = load_params(tmp_path / "run")
    model, tokenizer = build_model(config.model), build_tokenizer(config.tokenizer)
    data = load_split(config, tokenizer, "val", config.eval.batch_size)
    image = np.asarray(model.apply({"params": params}, data["image"], method="embed_image"))
    text = np.asarray(model.apply({"params": params}, data["tokens"], method="embed_text"))
    image = image / np.linalg.norm(image, axis=-1, keepdims=True)
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    cosine = image.astype(np.float64) @ text.T.astype(np.float64)
    mismatched = ~np.eye(len(cosine), dtype=bool)
    expected = np.diagonal(cosine).mean() - cosine[mismatched].mean()
    np.testing.assert_allclose(last["eval/alignment_gap"], expected, atol=1e-5)

    bad = tiny_lm_config()
    bad.unlock()
    bad.eval.tasks = ("alignment",)
    message = "eval.tasks='alignment' (an evaluator of other tasks) is not one of: perplexity"
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
