"""The "vlm" and "lm" tasks end to end: freezing, init from an LM run, eval probes, CLI."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compile_cache import compilation_cache  # noqa: F401 (autouse: compiles go through the cache)
from conftest import TINY_VLM, tiny_lm_config, tiny_vlm_config
from PIL import Image

from vlm_jax import sharding
from vlm_jax.checkpoint import Checkpointer, load_params
from vlm_jax.config import load_config
from vlm_jax.data import build_pipeline, shapes
from vlm_jax.losses import next_token_loss
from vlm_jax.train.optim import build_optimizer, param_paths
from vlm_jax.train.tasks.lm import LMTask
from vlm_jax.train.tasks.vlm import VLMTask
from vlm_jax.train.trainer import init_params, train


def test_next_token_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, (2, 5))
    weights = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    loss, metrics = next_token_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(weights))
    logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    terms = [-logp[b, t - 1, tokens[b, t]] for b in range(2) for t in range(1, 5) if weights[b, t]]
    np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)
    hits = [
        logits[b, t - 1].argmax() == tokens[b, t]
        for b in range(2)
        for t in range(1, 5)
        if weights[b, t]
    ]
    np.testing.assert_allclose(metrics["token_acc"], np.mean(hits), rtol=1e-6)


@pytest.mark.parametrize("fusion", ["early", "cross_attention"])
def test_stage1_freezing_leaves_frozen_params_bit_identical(fusion):
    config = tiny_vlm_config(arg="stage1", **{"model.fusion": fusion})
    mesh = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    task = VLMTask(config, mesh)
    with jax.set_mesh(mesh):
        params, _ = init_params(task, config, mesh)
    tx, _ = build_optimizer(config.optim, 10, params)
    opt_state = tx.init(params)
    batch = next(iter(task.train_data(8, 0, 1, 0)))
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k in task.batch_spec(1)}

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(lambda p: task.loss(p, batch, jax.random.key(0), True)[0])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    new = params
    for _ in range(3):
        new, opt_state = step(new, opt_state)
    paths = jax.tree.leaves(param_paths(params))
    changed = {
        p: not np.array_equal(a, b)
        for p, a, b in zip(paths, jax.tree.leaves(params), jax.tree.leaves(new))
    }
    frozen = [
        p for p in paths if p.startswith("vision/") or (p.startswith("lm/") and "xattn_" not in p)
    ]
    assert frozen and not any(changed[p] for p in frozen)
    assert all(changed[p] for p in paths if p.startswith("connector/") and p.endswith("kernel"))
    # Frozen params have no optimizer state: Adam's moments cover the trained params only.
    moments = sum(x.size for x in jax.tree.leaves(opt_state) if hasattr(x, "size"))
    trained = sum(np.size(a) for p, a in zip(paths, jax.tree.leaves(params)) if p not in frozen)
    assert moments <= 2 * trained + 16


@pytest.mark.slow
def test_lm_pretraining_initialises_the_vlm_and_eval_and_cli_run(tmp_path, capsys):
    lm_dir, vlm_dir = tmp_path / "lm", tmp_path / "vlm"
    train(tiny_lm_config(), lm_dir)
    config = tiny_vlm_config(arg="stage1", **{"init.lm_checkpoint": str(lm_dir)})
    final = train(config, vlm_dir)
    for key in ("eval/acc", "eval/swapped_acc", "eval/blank_acc", "eval/absent_false_yes"):
        assert 0.0 <= final[key] <= 1.0
    assert final["eval/visual_tokens"] == 16 and final["eval/prefill_gflops"] > 0
    # Stage 1 keeps the LM frozen: after training it still equals the text-only run's LM.
    lm_params, vlm_params = load_params(lm_dir), load_params(vlm_dir)
    jax.tree.map(np.testing.assert_array_equal, lm_params, vlm_params["lm"])

    from vlm_jax.generate import main

    image = shapes.render(
        shapes.sample_scene(shapes.World(image_size=16), "val", 0), shapes.World()
    )
    Image.fromarray(image).save(tmp_path / "scene.png")
    main(["--workdir", str(vlm_dir), "--image", str(tmp_path / "scene.png"),
          "--prompt", "how many circles are there?", "--max_new_tokens", "3"])  # fmt: skip
    answer = capsys.readouterr().out.strip().splitlines()[-1]
    assert len(answer.split()) <= 3
    assert json.loads((vlm_dir / "config.json").read_text())["model"]["name"] == "vlm"


def test_vision_tower_initialises_from_a_contrastive_checkpoint(tmp_path):
    """The two-tower model's `img` ViT (minus its pooling head) loads into the VLM's `vision`;
    the quickstart's conv stem needs the VLM's model.image.stem set to match."""
    from flax import linen as nn

    from vlm_jax.models import build_model

    clip = load_config("configs/siglip_shapes.py")
    for key in ("width", "depth", "num_heads", "mlp_dim", "image_size"):
        clip.model.image[key] = int(TINY_VLM[f"model.image.{key}"])
    clip.model.image.patch_size = load_config("configs/vlm_shapes.py").model.image.patch_size
    two_tower = build_model(clip.model)
    images, tokens = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16), jnp.int32)
    clip_params = nn.unbox(two_tower.init(jax.random.key(1), images, tokens)["params"])
    ckpt = Checkpointer(tmp_path / "clip" / "checkpoints", async_save=False)
    ckpt.save(1, {"params": clip_params, "step": jnp.int32(1)}, None, {"step": 1}, force=True)
    ckpt.close()

    assert clip.model.image.stem == "conv"
    mismatched = tiny_vlm_config(**{"init.vision_checkpoint": str(tmp_path / "clip")})
    with pytest.raises(ValueError, match=r"init checkpoint has no vision/embedding.*'stem'"):
        load_vision(mismatched)
    config = tiny_vlm_config(
        **{"init.vision_checkpoint": str(tmp_path / "clip"), "model.image.stem": "conv"}
    )
    params, loaded = load_vision(config)
    assert set(loaded["vision"]) == {"stem", "posemb", "encoder"}
    for name in loaded["vision"]:
        jax.tree.map(
            np.testing.assert_array_equal, loaded["vision"][name], clip_params["img"][name]
        )
    jax.tree.map(np.testing.assert_array_equal, loaded["lm"], params["lm"])


def load_vision(config):
    """Init the VLM task's params, then its load_pretrained hook -> (params, loaded)."""
    mesh = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    task = VLMTask(config, mesh)
    with jax.set_mesh(mesh):
        params, _ = init_params(task, config, mesh)
    return params, task.load_pretrained(params)


def save_params_steps(directory, params_by_step: dict) -> None:
    """A run's checkpoints/ holding only params (what init / generation read) per step."""
    ckpt = Checkpointer(directory, async_save=False)
    for step, params in params_by_step.items():
        ckpt.save(step, {"params": params, "step": jnp.int32(step)}, None, {"step": step})
    ckpt.close()


def flip_byte_of_largest_array(step_dir) -> None:
    """Bytes changed inside a compressed chunk: Orbax restores it without any error."""
    path = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=os.path.getsize)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_lm_checkpoint_with_a_damaged_newest_step_initialises_from_the_intact_one(tmp_path, caplog):
    config = tiny_vlm_config(arg="stage1", **{"init.lm_checkpoint": str(tmp_path / "lm")})
    mesh = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    task = VLMTask(config, mesh)
    with jax.set_mesh(mesh):
        params, _ = init_params(task, config, mesh)
    older = jax.tree.map(lambda x: x + 1.0, params["lm"])
    newer = jax.tree.map(lambda x: x + 2.0, params["lm"])
    save_params_steps(tmp_path / "lm" / "checkpoints", {1: older, 2: newer})
    flip_byte_of_largest_array(tmp_path / "lm" / "checkpoints" / "2")
    with caplog.at_level(logging.WARNING):
        loaded = task.load_pretrained(params)
    jax.tree.map(np.testing.assert_array_equal, loaded["lm"], older)
    assert "checkpoint step 2" in caplog.text and "DamagedCheckpoint" in caplog.text


def test_an_lm_checkpoint_without_the_vlms_added_tokens_grows_into_its_lm(tmp_path):
    """A released LM has no row for <image> (and the VLM's other added tokens): init grows its
    embedding (and untied output) by the missing rows, each the mean of the release's."""
    from vlm_jax.models import vocab

    config = tiny_vlm_config(arg="stage1", **{"init.lm_checkpoint": str(tmp_path / "lm")})
    mesh = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    task = VLMTask(config, mesh)
    with jax.set_mesh(mesh):
        params, _ = init_params(task, config, mesh)
    rows = vocab.vocab_rows(params["lm"])
    release = vocab.drop_vocab(jax.tree.map(lambda x: x + 1.0, params["lm"]), rows - 3)
    save_params_steps(tmp_path / "lm" / "checkpoints", {1: release})
    loaded = task.load_pretrained(params)["lm"]
    table, kept = loaded["embedder"]["embedding"], release["embedder"]["embedding"]
    assert table.shape == params["lm"]["embedder"]["embedding"].shape
    np.testing.assert_array_equal(table[: rows - 3], kept)
    mean = np.repeat(kept.mean(0, keepdims=True), 3, 0)  # float32 sums in another order
    np.testing.assert_allclose(table[rows - 3 :], mean, rtol=1e-6)
    others = lambda lm: [x for k, v in lm.items() if k != "embedder" for x in jax.tree.leaves(v)]
    jax.tree.map(np.testing.assert_array_equal, others(loaded), others(release))


def tiny_vlm_run(workdir) -> list[str]:
    """A "vlm" run (config.json, a checkpoint of fresh params at step 1) and a blank image in
    `workdir` -> the generate CLI's --workdir, --image and --prompt arguments."""
    from vlm_jax.train.trainer import to_json

    config = tiny_vlm_config()
    mesh = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        params, _ = init_params(VLMTask(config, mesh), config, mesh)
    (workdir / "config.json").write_text(to_json(config))
    save_params_steps(workdir / "checkpoints", {1: params})
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(workdir / "scene.png")
    return ["--workdir", str(workdir), "--image", str(workdir / "scene.png"),
            "--prompt", "how many circles are there?"]  # fmt: skip


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_generate_from_a_damaged_checkpoint_fails_naming_the_damage(tmp_path):
    from vlm_jax.generate import main

    args = tiny_vlm_run(tmp_path)
    flip_byte_of_largest_array(tmp_path / "checkpoints" / "1")
    with pytest.raises(RuntimeError, match="no intact checkpoint.*step 1: DamagedCheckpoint"):
        main([*args, "--max_new_tokens", "2"])


def lm_task(eval_batch_size: int) -> LMTask:
    config = tiny_lm_config(**{"data.val_size": "40", "eval.batch_size": str(eval_batch_size)})
    return LMTask(config, sharding.build_mesh((8, 1, 1)))  # 8 data-parallel devices


def test_lm_eval_covers_the_whole_val_split_whatever_the_batch_size():
    """40 records: 16 -> chunks 16+16+8 (the last padded), 24 -> 24+16, 64 -> one chunk."""
    task = lm_task(16)
    with jax.set_mesh(task.mesh):
        params, _ = init_params(task, task.config, task.mesh)
    results = {}
    for size in (16, 24, 64):
        task = lm_task(size)
        with jax.set_mesh(task.mesh):
            results[size] = task.evaluate(params)
        perplexity = task.built_evaluators["perplexity"]
        assert perplexity.token_sums._cache_size() == 1  # one compile, however many chunks
    val = dict(shuffle=False, num_epochs=1, drop_remainder=False)
    batch = next(iter(build_pipeline(task.config, task.tokenizer, "val", batch_size=1000, **val)))
    everything = batch["tokens"]
    assert len(everything) == 40
    params = jax.device_get(params)
    logits, _ = task.model.apply({"params": params}, everything, deterministic=True)
    loss, metrics = next_token_loss(logits, everything, everything != task.tokenizer.pad_id)
    for size, result in results.items():
        np.testing.assert_allclose(result["loss"], loss, rtol=1e-5, err_msg=f"batch {size}")
        np.testing.assert_allclose(result["token_acc"], metrics["token_acc"], rtol=1e-6)


@pytest.mark.parametrize(
    "argv, problem",
    [
        (
            ["--temp", "0.7"],
            "unknown flag(s) --temp; flags: --workdir, --prompt, --prompt_ids, --image, ",
        ),
        (["--top_p=5", "--seed", "1"], "unknown flag(s) --seed, --top_p; flags: "),
        ([], "missing --workdir, exactly one of --prompt, --prompt_ids"),
        (["stray"], "unexpected argument 'stray'"),
        (["--top_k"], "flag --top_k needs a value"),
        (["--max_new_tokens", "1.5"], "--max_new_tokens='1.5': expected an int, got a float"),
        (["--top_k=True"], "--top_k='True': expected an int, got a bool"),
        (["--temperature", "hot"], "--temperature='hot': expected a float"),
        (["--temperature=-1"], "--temperature=-1.0: must be >= 0.0"),
        (["--max_new_tokens=0"], "--max_new_tokens=0: must be >= 1"),
    ],
)
def test_generate_cli_misuse_exits_2_naming_the_problem_and_the_flags(argv, problem, capsys):
    from vlm_jax.generate import main

    required = ["--workdir", "w", "--image", "i.png", "--prompt", "q"] if argv else []
    with pytest.raises(SystemExit) as info:
        main(required + argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {problem}" in err
    assert "usage: python -m vlm_jax.generate" in err and "[--top_k K" in err


def test_generate_cli_parses_typed_values_and_defaults():
    from vlm_jax.generate import parse_args

    args = parse_args(["--workdir=w", "--image", "i.png", "--prompt", "q", "--top_k", "5"])
    assert args == dict(
        workdir="w",
        image="i.png",
        prompt="q",
        prompt_ids=None,
        chat=False,
        print_ids=False,
        max_new_tokens=16,
        temperature=0.0,
        top_k=5,
    )


def test_generate_cli_top_k_restricts_sampling(tmp_path, capsys):
    """At a high temperature a sample differs from the greedy answer unless --top_k 1."""
    from vlm_jax.generate import main

    common = [*tiny_vlm_run(tmp_path), "--max_new_tokens", "6"]

    def answer(*flags: str) -> str:
        main(common + list(flags))
        return capsys.readouterr().out  # the answer's line (empty if EOS came first)

    greedy = answer()
    assert answer("--temperature", "100") != greedy
    assert answer("--temperature", "100", "--top_k", "1") == greedy
    with pytest.raises(ValueError, match=r"top_k=100000: must be in \[0, \d+\]"):
        answer("--temperature", "1", "--top_k", "100000")


def test_documented_recipes_are_the_configs():
    """The vlm task's docstring lists each recipe's optim.freeze; it is what the config sets."""
    import ast
    import re

    from vlm_jax.train.tasks import vlm as vlm_task

    pattern = r"^\s+(stage \d|full):\s+optim\.freeze = (\(.*?\))\s"
    documented = {
        name.replace(" ", ""): ast.literal_eval(freeze)
        for name, freeze in re.findall(pattern, vlm_task.__doc__, re.MULTILINE)
    }
    assert sorted(documented) == ["full", "stage1", "stage2"]
    for recipe, freeze in documented.items():
        assert tuple(load_config(f"configs/vlm_shapes.py:{recipe}").optim.freeze) == freeze


def test_pad_id_must_match_the_tokenizer():
    """The Q-Former masks instruction tokens equal to model.pad_id: a wrong id would attend
    to padding and ignore real tokens, so it is refused when the task is built."""
    config = tiny_vlm_config(**{"model.pad_id": "5"})
    mesh = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"model.pad_id=5 but the tokenizer's pad id is 0"):
        VLMTask(config, mesh)


@pytest.mark.parametrize("task, config", [(LMTask, tiny_lm_config), (VLMTask, tiny_vlm_config)])
def test_an_embedding_smaller_than_the_tokenizer_is_refused_naming_the_key(task, config):
    """Both tasks check model.lm.vocab_size through models.vocab.check_vocab_rows (the one
    check), with the config key to raise as the remedy."""
    mesh = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    needed = task(config(), mesh).tokenizer.vocab_size  # the shipped size fits
    with pytest.raises(
        ValueError,
        match=rf"model.lm.vocab_size=8 embedding rows are fewer than the tokenizer's vocabulary "
        rf"\({needed} ids\): set model.lm.vocab_size to at least {needed}",
    ):
        task(config(**{"model.lm.vocab_size": "8"}), mesh)


def test_runs_from_before_model_pad_id_existed_still_resume(tmp_path):
    """config.json of a VLM run started before model.pad_id was added lacks the key: it is
    read as the 0 the code used then, so the run resumes; another value is still refused."""
    from vlm_jax.train.trainer import prepare_workdir, to_json

    config = tiny_vlm_config()
    old = json.loads(to_json(config))
    del old["model"]["pad_id"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    prepare_workdir(tmp_path, config, is_primary=False)  # no error: the same experiment
    old["model"]["pad_id"] = 3
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"model\.pad_id: 3 \(workdir\) vs 0 \(now\)"):
        prepare_workdir(tmp_path, config, is_primary=False)


def test_a_vision_checkpoint_trained_with_other_tower_settings_is_refused(tmp_path):
    """What a tower computes beyond its weights (activation, LN eps, input normalisation) must
    agree with the run it comes from: an OpenAI CLIP converted run (quick_gelu, 1e-5, CLIP's
    mean/std) under a model.image of the ViT's defaults fails naming each, before any load."""
    from vlm_jax.config import load_config
    from vlm_jax.train.tasks.vlm import check_tower_computes_alike

    clip = load_config("configs/llava.py:stage2").model.image
    (tmp_path / "config.json").write_text(json.dumps({"model": {"image": clip.to_dict()}}))
    check_tower_computes_alike(str(tmp_path), clip)  # the llava config: the same settings
    plain = load_config("configs/vlm_shapes.py").model.image
    with pytest.raises(ValueError) as error:
        check_tower_computes_alike(str(tmp_path), plain)
    message = str(error.value)
    for key in ("activation: the tower's 'quick_gelu', model.image's 'gelu_tanh'", "ln_eps"):
        assert key in message
    assert "input_mean" in message and "input_std" in message
