"""Position-embedding resampling (models/posemb.py): a ViT trained at one image size initialises,
fine-tunes, evaluates or imports at another. Parity with open_clip's `resize_pos_embed` (torch's
interpolate), big_vision's rules (scipy.ndimage.zoom for ViT, jax.image.resize for FlexiViT),
through the converters, the init paths and a short real training run."""

import functools
import json
import types
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from compile_cache import compilation_cache  # noqa: F401 (autouse: compiles go through the cache)
from conftest import (
    TINY_CONTRASTIVE,
    TINY_VLM,
    shipped_config,
    tiny_contrastive_config,
    tiny_two_tower_config,
    tiny_vlm_config,
)
from test_convert_hf import assert_close, our_outputs
from test_convert_open_clip import CONTEXT, LAYOUTS, VOCAB, build_release, model_config, reference

from vlm_jax import sharding
from vlm_jax.checkpoint import Checkpointer, load_params
from vlm_jax.config import ConfigError
from vlm_jax.convert import __main__ as convert_cli
from vlm_jax.models import build_model
from vlm_jax.models.layers import sincos_2d
from vlm_jax.models.posemb import (
    RESAMPLE_METHODS,
    Resample,
    resample_grid,
    resample_matrix,
    resample_posemb,
)
from vlm_jax.train.validate import validate_config

METHODS = [Resample(m, aa) for m in RESAMPLE_METHODS for aa in (True, False)]
GRIDS = [(4, 6), (6, 4), (7, 3), (3, 8), (5, 9)]  # (old side, new side): up and down


def random_posemb(tokens: int, width: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, tokens, width)).astype(np.float32)


@pytest.mark.parametrize("resample", METHODS, ids=str)
def test_same_size_is_the_identity_exactly(resample):
    posemb = jnp.asarray(random_posemb(1 + 25))
    assert resample_posemb(posemb, posemb.shape, resample) is posemb
    grid = posemb[0, 1:].reshape(5, 5, 8)
    assert resample_grid(grid, (5, 5), resample) is grid
    for side in (1, 2, 5, 16):  # and the weights themselves
        np.testing.assert_array_equal(resample_matrix(side, side, resample), np.eye(side))


def open_clip_resized(posemb: np.ndarray, new_side: int, method: str, antialias: bool):
    """open_clip's resize_pos_embed on the state dict of a tower with a cls token."""
    import torch

    from vlm_jax.convert.torch_compat import import_open_clip

    open_clip = import_open_clip()
    state = {"visual.positional_embedding": torch.from_numpy(posemb[0])}
    tower = types.SimpleNamespace(visual=types.SimpleNamespace(grid_size=(new_side, new_side)))
    open_clip.model.resize_pos_embed(state, tower, interpolation=method, antialias=antialias)
    return state["visual.positional_embedding"].numpy()[None]


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("old,new", GRIDS)
def test_matches_open_clip(method, antialias, old, new):
    """Prefix (cls) row kept, grid resampled as torch's F.interpolate(align_corners=False)."""
    posemb = random_posemb(1 + old * old)
    expected = open_clip_resized(posemb, new, method, antialias)
    ours = resample_posemb(jnp.asarray(posemb), expected.shape, Resample(method, antialias))
    np.testing.assert_array_equal(ours[:, :1], posemb[:, :1])
    np.testing.assert_allclose(ours, expected, atol=3e-6, rtol=0)


@pytest.mark.parametrize("old,new", GRIDS)
def test_matches_big_vision(old, new):
    """big_vision ViT's `resample_posemb` (no cls row: its cls token has no posemb) zooms the
    grid with scipy.ndimage.zoom(order=1, zoom=new/old); FlexiViT resizes with
    jax.image.resize(..., "linear"), antialiased by default."""
    posemb = random_posemb(old * old)
    grid = posemb.reshape(old, old, -1)
    zoomed = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1).reshape(1, -1, 8)
    corners = resample_posemb(jnp.asarray(posemb), zoomed.shape, Resample("bilinear_corners"))
    np.testing.assert_allclose(corners, zoomed, atol=2e-6, rtol=0)
    for method, jax_method in (("bilinear", "linear"), ("bicubic", "bicubic")):
        resized = jax.image.resize(jnp.asarray(grid), (new, new, 8), jax_method)
        ours = resample_posemb(jnp.asarray(posemb), (1, new * new, 8), Resample(method))
        np.testing.assert_allclose(ours, resized.reshape(1, -1, 8), atol=3e-6, rtol=0)


def test_bad_method_names_the_valid_ones():
    with pytest.raises(ValueError, match="method='bilinera' is not one of: bicubic, bilinear"):
        Resample("bilinera")
    config = shipped_config("configs/siglip_shapes.py", {"init.posemb_resample": "bilinera"})
    with pytest.raises(ConfigError, match="init.posemb_resample.*bicubic, bilinear, bilinear_co"):
        validate_config(config)


@pytest.mark.parametrize(
    "old,new,message",
    [
        ((1, 12, 8), (1, 16, 8), r"\(1, 12, 8\) -> \(1, 16, 8\).*square grid"),  # 12: no grid
        ((1, 17, 8), (1, 30, 8), r"\(1, 17, 8\) -> \(1, 30, 8\).*square grid"),  # 30: none
        ((1, 16, 8), (1, 36, 16), r"\(1, 16, 8\) to \(1, 36, 16\).*same width"),
        ((16, 8), (36, 8), r"\(16, 8\) to \(36, 8\).*\[1, tokens, width\]"),
    ],
)
def test_a_posemb_that_cannot_be_resampled_names_the_shapes(old, new, message):
    with pytest.raises(ValueError, match=message):
        resample_posemb(jnp.zeros(old), new, Resample())


def save_run(directory, params) -> None:
    """`params` as a run's newest checkpoint (what init / evaluation read)."""
    ckpt = Checkpointer(directory / "checkpoints", async_save=False)
    ckpt.save(1, {"params": params, "step": jnp.int32(1)}, None, {"step": 1}, force=True)
    ckpt.close()


def two_tower_layout(image_size: int, **overrides):
    """The tiny two-tower's params as ShapeDtypeStructs, boxed with their logical axes."""
    config = tiny_two_tower_config(**{"image.image_size": image_size, **overrides})
    images, tokens = jnp.zeros((1, image_size, image_size, 3)), jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(build_model(config).init, jax.random.key(0), images, tokens)["params"]


def random_params(layout, seed: int = 0):
    """Values for `layout` (random, without compiling an init)."""
    rng = np.random.default_rng(seed)
    draw = lambda x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32)
    return jax.tree.map(draw, nn.unbox(layout))


def embed_images(config, params, images):
    apply = functools.partial(build_model(config).apply, method="embed_image")
    return jax.jit(apply)({"params": params}, images)


@pytest.mark.parametrize("pool", ["cls", "map"])
def test_a_checkpoint_loads_resampled_into_the_target_sharding(tmp_path, pool):
    """The path init.checkpoint and evaluation take: the posemb restores at its saved grid
    (4x4, + the cls row with pool="cls"), is resampled to 6x6 and placed as the target's
    sharding says; every other param loads unchanged."""
    saved = random_params(two_tower_layout(16, **{"image.pool": pool}))
    save_run(tmp_path, saved)
    mesh = sharding.build_mesh((2, 4, 1))
    target = two_tower_layout(24, **{"image.pool": pool})
    specs = nn.get_partition_spec(target)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, (("embed", "fsdp"),))
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(target), shardings
    )
    resample = Resample("bilinear", antialias=False)
    with jax.set_mesh(mesh):
        loaded = load_params(tmp_path, abstract, posemb_towers=("img",), resample=resample)
    posemb = loaded["img"]["posemb"]
    assert posemb.shape == abstract["img"]["posemb"].shape == (1, int(pool == "cls") + 36, 32)
    assert posemb.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
    expected = resample_posemb(saved["img"]["posemb"], posemb.shape, resample)
    np.testing.assert_array_equal(np.asarray(posemb), np.asarray(expected))
    rest = lambda p: (
        {k: v for k, v in p.items() if k != "img"}
        | {"img": {k: v for k, v in p["img"].items() if k != "posemb"}}
    )
    jax.tree.map(np.testing.assert_array_equal, rest(loaded), rest(saved))


def test_a_sincos_tower_runs_at_another_size_with_its_table_recomputed(tmp_path):
    """No posemb param to resample: the 16 px run's params load at 24 px as they are, and the
    tower adds the 6x6 sin-cos table: it computes what a learned-posemb tower holding that
    table computes."""
    sincos = {"image.posemb": "sincos2d", "image.pool": "gap"}
    save_run(tmp_path, random_params(two_tower_layout(16, **sincos)))
    abstract = nn.unbox(two_tower_layout(24, **sincos))
    loaded = load_params(tmp_path, abstract, posemb_towers=("img",))
    assert "posemb" not in loaded["img"]
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 24, 24, 3)), jnp.float32)
    config = tiny_two_tower_config(**{"image.image_size": 24, **sincos})
    ours = embed_images(config, loaded, images)
    config.image.posemb = "learn"
    table = {"posemb": sincos_2d(6, 6, config.image.width)[None]}
    learned = dict(loaded, img=loaded["img"] | table)
    expected = embed_images(config, learned, images)
    np.testing.assert_allclose(ours, expected, atol=1e-6)


@pytest.mark.parametrize("method,antialias", [("bicubic", True), ("bilinear", False)])
def test_an_open_clip_release_imports_at_another_size(tmp_path, method, antialias):
    """`convert --image_size 24` of a 16 px release computes what open_clip's own model at 24 px
    computes with the release's weights resized by its resize_pos_embed."""
    from vlm_jax.convert.torch_compat import import_open_clip

    open_clip = import_open_clip()
    layout = LAYOUTS["B-16"]  # patch 4: a 4x4 grid (+ cls) at 16 px, 6x6 at 24 px
    release = build_release(open_clip, layout, tmp_path / "release")
    flags = ["--image_size", "24", "--posemb_resample", method]
    convert_cli.main(
        ["--from", "open_clip", "--src", str(tmp_path / "release"), "--out", str(tmp_path / "out")]
        + flags
        + ([] if antialias else ["--no_posemb_antialias"])
    )
    config = model_config(layout)
    config["vision_cfg"] = dict(config["vision_cfg"], image_size=24)
    resized = open_clip.CLIP(**config).eval()
    state = release.state_dict()
    open_clip.model.resize_pos_embed(state, resized, interpolation=method, antialias=antialias)
    resized.load_state_dict(state)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 24, 24, 3)).astype(np.float32)
    tokens = rng.integers(1, VOCAB - 1, (3, CONTEXT)).astype(np.int32)
    tokens[:, -1] = VOCAB - 1  # the EOT (argmax) ends every row
    assert_close(our_outputs(tmp_path / "out", images, tokens), reference(resized, images, tokens))
    meta = json.loads((tmp_path / "out" / "convert.json").read_text())
    assert meta["released_image_size"] == 16
    assert meta["sections"]["model"]["image"]["image_size"] == 24


def test_an_import_at_a_size_the_patches_do_not_divide_fails(tmp_path):
    from vlm_jax.convert.common import ConversionError
    from vlm_jax.convert.torch_compat import import_open_clip

    build_release(import_open_clip(), LAYOUTS["B-16"], tmp_path / "release")
    argv = ["--from", "open_clip", "--src", str(tmp_path / "release"), "--out", str(tmp_path)]
    with pytest.raises((ConfigError, ConversionError), match="image_size=26 is not a multiple"):
        convert_cli.main([*argv, "--image_size", "26"])


def test_a_vlm_initialises_its_vision_tower_from_a_run_at_another_size(tmp_path):
    """init.vision_checkpoint: a 16 px contrastive run's `img` tower (conv stem, patch 4) loads
    into a 24 px VLM's `vision` with its posemb resampled as init.posemb_resample says."""
    from test_vlm_train import load_vision

    clip = shipped_config(
        "configs/siglip_shapes.py",
        {f"model.image.{k}": TINY_VLM[f"model.image.{k}"] for k in ("width", "depth", "mlp_dim")}
        | {"model.image.num_heads": "2", "model.image.image_size": "16", "data.image_size": "16"}
        | {"model.image.patch_size": "4"},
    )
    images, tokens = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16), jnp.int32)
    layout = jax.eval_shape(build_model(clip.model).init, jax.random.key(0), images, tokens)
    saved = random_params(layout["params"])
    save_run(tmp_path / "clip", saved)
    config = tiny_vlm_config(
        **{
            "init.vision_checkpoint": str(tmp_path / "clip"),
            "init.posemb_resample": "bilinear_corners",
            "model.image.stem": "conv",
            "model.image.image_size": "24",
            "data.image_size": "24",
        }
    )
    _, loaded = load_vision(config)
    expected = resample_posemb(saved["img"]["posemb"], (1, 36, 32), Resample("bilinear_corners"))
    np.testing.assert_allclose(loaded["vision"]["posemb"], expected, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, loaded["vision"]["stem"], saved["img"]["stem"])


@flax.struct.dataclass
class Params:
    """The part of a TrainState that `restore_or_init` touches."""

    params: Any


def test_a_run_fine_tunes_from_a_checkpoint_at_another_size(tmp_path):
    """init.checkpoint through the trainer's fresh-run path: a 16 px contrastive run's params
    start a 24 px run, posemb resampled as init.posemb_* say, into the run's shardings."""
    from vlm_jax.train.tasks import TASKS
    from vlm_jax.train.trainer import param_layout, restore_or_init

    def layout(**overrides):
        config = tiny_contrastive_config(**overrides)
        mesh = sharding.build_mesh(config.mesh.shape)
        task = TASKS.get(config.task)(config, mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(config.sharding.rules)):
            return task, param_layout(task, config, mesh)[1:]

    _, (saved_layout, _) = layout()
    saved = random_params(saved_layout)
    save_run(tmp_path / "run16", saved)
    task, (abstract, shardings) = layout(
        **{"model.image.image_size": "24", "data.image_size": "24"},
        **{"init.checkpoint": str(tmp_path / "run16"), "init.posemb_resample": "bilinear"},
        **{"init.posemb_antialias": "false"},
    )
    fresh = lambda: Params(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract))
    ckpt = Checkpointer(tmp_path / "run24" / "checkpoints", async_save=False)
    with jax.set_mesh(task.mesh):
        state, resumed, _ = restore_or_init(ckpt, None, Params(shardings), None, task, fresh)
    ckpt.close()
    assert resumed is None
    posemb = state.params["img"]["posemb"]
    assert posemb.shape == (1, 9, 32) and posemb.sharding == shardings["img"]["posemb"]
    expected = resample_posemb(saved["img"]["posemb"], (1, 9, 32), Resample("bilinear", False))
    np.testing.assert_array_equal(np.asarray(posemb), np.asarray(expected))
    np.testing.assert_array_equal(state.params["txt"]["posemb"], saved["txt"]["posemb"])


# A short real run on the shapes world (the quickstart config, shrunk): 40 zero-shot classes.
SHAPES_RUN = {  # the tiny contrastive towers, trained long enough to tell colours apart
    **{k: v for k, v in TINY_CONTRASTIVE.items() if k.startswith("model.")},
    "model.image.image_size": "32",  # as data.image_size: 4x4 patches of 8 px
    "data.val_size": "32",
    "data.zeroshot_size": "200",
    "eval.tasks": "('zeroshot',)",
    "eval.batch_size": "200",
    "train.batch_size": "64",
    "train.total_steps": "100",
    "train.log_every": "50",
    "train.checkpoint_every": "100",
    "train.worker_count": "0",
    "train.async_checkpoint": "false",
    "optim.warmup_steps": "20",
    "optim.lr": "3e-3",
}
AT_48 = {"model.image.image_size": "48", "data.image_size": "48"}


@pytest.mark.slow
def test_a_tower_trained_at_32px_evaluates_at_48px(tmp_path):
    """Trained at 32 px (4x4 patches), the tower zero-shot classifies held-out 48 px scenes
    (6x6 patches, posemb resampled on load: `evaluate --config.model.image.image_size=48
    --config.data.image_size=48`) far above chance and about as well as at 32 px."""
    from vlm_jax.data import shapes
    from vlm_jax.train.trainer import evaluate_checkpoint, train

    siglip = "configs/siglip_shapes.py"
    at_32 = train(shipped_config(siglip, SHAPES_RUN), tmp_path / "run32")["eval/zeroshot_top1"]
    at_48 = evaluate_checkpoint(shipped_config(siglip, SHAPES_RUN | AT_48), tmp_path / "run32")
    chance = 1 / len(shapes.classnames(shapes.World()))
    assert np.isfinite(at_48["eval/zeroshot_top1"])
    assert at_48["eval/zeroshot_top1"] >= 4 * chance, (at_48, at_32, chance)
    assert at_48["eval/zeroshot_top1"] >= at_32 - 0.05, (at_48, at_32)
