"""Shared pieces of the converters: reading released files, strict key accounting, checking the
result against the model's own parameter shapes, and writing a checkpoint train/evaluate load.

A converter reads a flat {name: array} of the release, `take`s every tensor it maps (a missing
name fails at once, naming it), and builds our nested params. `Tensors.check_consumed` then fails
on the first release tensor nobody took, and `check_params` on the first param whose path or shape
differs from what `build_model(config.model)` expects. So a wrong layout never converts silently.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax.models import posemb

Params = dict[str, Any]


class ConversionError(ValueError):
    """The release does not match the layout being converted (names the first bad key)."""


class MissingPackageError(ImportError):
    """An optional package a conversion needs is not installed (names it and how to install)."""


CONVERT_EXTRA = "pip install -e '.[convert]'"
TORCH_INSTALL = (
    "pip install torch==2.13.0 (as the [test] extra pins it), or use .safetensors weights"
)


def optional_import(module: str, purpose: str, install: str = CONVERT_EXTRA) -> ModuleType:
    """`import module`, or a one-line MissingPackageError naming its package and `install`:
    safetensors (and torch, for .bin weights) are not among vlm_jax's own requirements."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0]
        raise MissingPackageError(
            f"{purpose} needs the package {package!r} ({type(e).__name__}: {e}); "
            f"install it with: {install}"
        ) from None


class Tensors:
    """A release's flat {name: float32 array}, tracking which names a converter used."""

    def __init__(self, arrays: dict[str, np.ndarray], ignore: Iterable[str] = ()):
        self.arrays = arrays
        self.used: set[str] = set(ignore) & set(arrays)

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor `name` as float32, optionally checked to have `shape`."""
        if name not in self.arrays:
            prefix = name.rsplit(".", 1)[0].rsplit("/", 1)[0]
            near = sorted(k for k in self.arrays if k.startswith(prefix))[:5]
            raise ConversionError(f"missing key {name!r} in the checkpoint (nearby: {near})")
        value = np.asarray(self.arrays[name], np.float32)
        if shape is not None and value.shape != tuple(shape):
            raise ConversionError(f"key {name!r} has shape {value.shape}, expected {shape}")
        self.used.add(name)
        return value

    def check_consumed(self) -> None:
        unused = sorted(set(self.arrays) - self.used)
        if unused:
            raise ConversionError(
                f"unexpected key {unused[0]!r} in the checkpoint ({len(unused)} unused in all)"
            )


@dataclasses.dataclass(frozen=True)
class Entry:
    """One release tensor <-> one of our params. `to_ours`/`to_source` are exact inverses
    (transposes and reshapes), so export -> import reproduces params bit for bit. A packed
    release tensor (fused q/k/v) maps to several entries, each taking `part` = (index, count)
    of its leading axis."""

    source: str
    ours: str
    to_ours: Callable[[np.ndarray], np.ndarray] = lambda x: x
    to_source: Callable[[np.ndarray], np.ndarray] = lambda x: x
    part: tuple[int, int] | None = None


def import_entries(
    entries: Sequence[Entry], tensors: Tensors, expected: dict[str, tuple[int, ...]]
) -> Params:
    """Our nested params from the release tensors, failing on the first missing key or the
    first tensor whose shape does not give the param shape `expected` ({path: shape})."""
    flat = {}
    for entry in entries:
        raw = tensors.take(entry.source)
        value = raw if entry.part is None else np.split(raw, entry.part[1], axis=0)[entry.part[0]]
        try:
            value = entry.to_ours(value)
        except ValueError:  # a reshape that the wrong shape cannot take
            value = None
        want = expected.get(entry.ours)
        if value is None or (want is not None and value.shape != want):
            raise ConversionError(
                f"key {entry.source!r} has shape {raw.shape}, which does not give {entry.ours!r} "
                f"the shape {want} the model expects"
            )
        flat[entry.ours] = value
    return unflatten(flat)


def export_entries(entries: Sequence[Entry], params: Params) -> dict[str, np.ndarray]:
    """The release's flat tensors from our params (packed tensors re-concatenated)."""
    flat = flatten(params)
    parts: dict[str, dict[int, np.ndarray]] = {}
    out = {}
    for entry in entries:
        value = entry.to_source(np.asarray(flat[entry.ours], np.float32))
        if entry.part is None:
            out[entry.source] = value
        else:
            parts.setdefault(entry.source, {})[entry.part[0]] = value
    for source, pieces in parts.items():
        out[source] = np.concatenate([pieces[i] for i in sorted(pieces)], axis=0)
    return out


# Release layouts store Linear weights [out, in] and heads fused; ours: kernel [in, out],
# attention kernels [D, heads, head_dim] and [heads, head_dim, D].
def linear(source: str, ours: str) -> list[Entry]:
    """A torch Linear (weight [out, in], bias [out]) -> Dense kernel [in, out], bias."""
    return [
        Entry(f"{source}.weight", f"{ours}/kernel", np.transpose, np.transpose),
        Entry(f"{source}.bias", f"{ours}/bias"),
    ]


def heads_in(
    weight: str, bias: str, ours: str, heads: int, part: tuple[int, int] | None = None
) -> list[Entry]:
    """q/k/v projection: weight [H*hd, D] -> kernel [D, H, hd]; bias [H*hd] -> [H, hd]."""
    return [
        Entry(
            weight,
            f"{ours}/kernel",
            lambda w: w.T.reshape(w.shape[1], heads, -1),
            lambda k: k.reshape(k.shape[0], -1).T,
            part,
        ),
        Entry(bias, f"{ours}/bias", lambda b: b.reshape(heads, -1), lambda b: b.reshape(-1), part),
    ]


def heads_out(source: str, ours: str, heads: int) -> list[Entry]:
    """Attention output: weight [D, H*hd] -> kernel [H, hd, D]; bias [D]."""
    return [
        Entry(
            f"{source}.weight",
            f"{ours}/kernel",
            lambda w: w.T.reshape(heads, -1, w.shape[0]),
            lambda k: k.reshape(-1, k.shape[-1]).T,
        ),
        Entry(f"{source}.bias", f"{ours}/bias"),
    ]


def norm(source: str, ours: str) -> list[Entry]:
    """torch LayerNorm weight/bias -> flax scale/bias."""
    return [Entry(f"{source}.weight", f"{ours}/scale"), Entry(f"{source}.bias", f"{ours}/bias")]


def attention(source: str, ours: str, heads: int, packed: bool) -> list[Entry]:
    """A torch attention block: HF's separate q_proj/k_proj/v_proj/out_proj, or torch
    MultiheadAttention's packed in_proj_weight [3D, D] (open_clip, SigLIP's MAP head)."""
    entries = heads_out(f"{source}.out_proj", f"{ours}/out", heads)
    for i, name in enumerate(("query", "key", "value")):
        if packed:
            names = (f"{source}.in_proj_weight", f"{source}.in_proj_bias")
            entries += heads_in(*names, f"{ours}/{name}", heads, part=(i, 3))
        else:
            proj = f"{source}.{name[0]}_proj"
            entries += heads_in(f"{proj}.weight", f"{proj}.bias", f"{ours}/{name}", heads)
    return entries


def read_json(path: Path) -> dict:
    """A release's JSON file as a dict ({} when it is absent)."""
    return json.loads(path.read_text()) if path.is_file() else {}


HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def load_tensors(path: str | Path, names: Sequence[str] = HF_WEIGHTS) -> dict[str, np.ndarray]:
    """Flat {name: numpy array} from .safetensors, PyTorch .bin/.pt/.pth, or big_vision .npz.

    A directory means the first of its files called `names` (the release's weights).
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / name for name in names]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"no weights in {path}: looked for {[c.name for c in candidates]}"
            )
        path = found[0]
    if path.suffix == ".safetensors":
        safetensors_numpy = optional_import("safetensors.numpy", f"reading {path}")
        return dict(safetensors_numpy.load_file(str(path)))
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {name: data[name] for name in data.files}
    if path.suffix in (".bin", ".pt", ".pth"):
        torch = optional_import("torch", f"reading {path}", TORCH_INSTALL)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        return {k.removeprefix("module."): v.float().numpy() for k, v in state.items()}
    raise ValueError(
        f"weights file {str(path)!r} has suffix {path.suffix!r}; expected one of: "
        ".safetensors, .bin, .pt, .pth, .npz"
    )


def flatten(tree: Params, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}/")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat: dict[str, Any]) -> Params:
    """{"a/b/c": leaf} -> nested dict."""
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def expected_shapes(model_config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """{"path": shape} of the params `build_model(model_config)` creates (no allocation)."""
    import flax.linen as nn

    from vlm_jax.models import build_model

    model_config = ml_collections.ConfigDict(model_config)
    model = build_model(model_config)
    if model_config.name == "decoder_lm":
        inputs = (jnp.zeros((1, 1), jnp.int32),)
    else:
        size = model_config.image.image_size
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        inputs = (images, jnp.zeros((1, model_config.text.max_len), jnp.int32))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
    return {k: tuple(v.shape) for k, v in flatten(nn.unbox(abstract["params"])).items()}


def check_params(params: Params, model_config: ml_collections.ConfigDict) -> None:
    """Fail on the first param path that is missing, unexpected or of the wrong shape."""
    expected = expected_shapes(model_config)
    produced = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
    for path in sorted(expected):
        if path not in produced:
            raise ConversionError(f"converted params lack {path!r} (shape {expected[path]})")
        if produced[path] != expected[path]:
            raise ConversionError(
                f"converted param {path!r} has shape {produced[path]}, the model expects "
                f"{expected[path]}"
            )
    extra = sorted(set(produced) - set(expected))
    if extra:
        raise ConversionError(f"converted params have {extra[0]!r}, which the model lacks")


def full_config(sections: dict[str, dict], task: str = "contrastive") -> ml_collections.ConfigDict:
    """A complete run config of `task`: trainer defaults, the shapes data, and the converted
    `model`, `tokenizer` (and `loss`) sections (override data/optim from the CLI to fine-tune).
    An "lm" run (a converted decoder LM) is evaluated by perplexity on the shapes captions."""
    from vlm_jax.data.pipeline import default_data_config
    from vlm_jax.defaults import base_config

    config = base_config()
    config.task = task
    config.data = default_data_config()
    if "image" in sections["model"]:
        config.data.image_size = sections["model"]["image"]["image_size"]
    if task == "lm":
        config.eval.tasks = ("perplexity",)
    for name, section in sections.items():
        config[name] = ml_collections.ConfigDict(section)
    return config


@dataclasses.dataclass(frozen=True)
class NewImageSize:
    """`--image_size`: the released image tower converted for another input size, its learned
    posemb resampled (models/posemb.py; a sincos2d tower needs nothing)."""

    image_size: int
    resample: posemb.Resample = dataclasses.field(default_factory=posemb.Resample)

    def apply(self, params: Params, sections: dict[str, dict]) -> tuple[Params, dict]:
        """(params, sections) for `image_size`; meta gains the released size."""
        image = sections["model"].get("image")
        if image is None:
            raise ConversionError(
                f"--image_size={self.image_size}: the converted model has no image tower"
            )
        model = dict(sections["model"], image=dict(image, image_size=self.image_size))
        target = {"img": {}}
        shapes = expected_shapes(model)  # raises if the size does not fit the patches
        if "img/posemb" in shapes:
            target["img"]["posemb"] = jax.ShapeDtypeStruct(shapes["img/posemb"], jnp.float32)
        try:
            params = posemb.resample_towers(params, target, ("img",), self.resample)
        except ValueError as error:
            raise ConversionError(f"--image_size={self.image_size}: {error}") from None
        return params, dict(sections, model=model)


def save_converted(
    out: str | Path,
    params: Params,
    sections: dict[str, dict],
    meta: dict,
    resize: NewImageSize | None = None,
) -> Path:
    """Write params as step 0 of OUT/checkpoints (the trainer's layout, so
    `--config.init.checkpoint=OUT` and `evaluate --workdir OUT` load them), the config sections
    and `meta` (source, layout, task) as OUT/convert.json, OUT/config.py that rebuilds the config
    and OUT/config.json, the config as a training run writes it. `resize`: for another image
    size (meta then records the released one)."""
    from vlm_jax.checkpoint import Checkpointer
    from vlm_jax.config import to_json

    if resize is not None:
        released = sections["model"].get("image", {}).get("image_size")
        params, sections = resize.apply(params, sections)
        meta = dict(meta, released_image_size=released)
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    ckpt = Checkpointer(out / "checkpoints", keep=1, async_save=False)
    ckpt.save(0, {"params": params}, None, {"step": 0, "converted": meta}, force=True)
    ckpt.close()
    (out / "convert.json").write_text(json.dumps({**meta, "sections": sections}, indent=2))
    (out / "config.py").write_text(CONFIG_PY)
    (out / "config.json").write_text(
        to_json(full_config(sections, meta.get("task", "contrastive")))
    )
    return out


def load_converted(out: str | Path) -> tuple[Params, ml_collections.ConfigDict]:
    """(params as numpy, full config) of a converter output directory or a training workdir
    (newest intact checkpoint, `checkpoint.load_params`)."""
    from vlm_jax.checkpoint import load_params

    out = Path(out)
    if (out / "convert.json").is_file():
        meta = json.loads((out / "convert.json").read_text())
        sections, task = meta["sections"], meta.get("task", "contrastive")
    else:  # a training workdir (e.g. fine-tuned from a converted checkpoint; its optim.lora
        # and init.lm_checkpoint say what an LM export merges and drops)
        run = json.loads((out / "config.json").read_text())
        kept = ("model", "tokenizer", "loss", "optim", "init")
        sections = {name: run[name] for name in kept if name in run}
        task = run.get("task", "contrastive")
    return jax.tree.map(np.asarray, load_params(out)), full_config(sections, task)


CONFIG_PY = '''"""Config of a converted checkpoint (written by vlm_jax.convert from convert.json).

python -m vlm_jax.evaluate --config THIS_DIR/config.py --workdir THIS_DIR --config.data.source=...
python -m vlm_jax.train --config THIS_DIR/config.py --workdir RUN --config.init.checkpoint=THIS_DIR
"""

import dataclasses
import json
from pathlib import Path

from vlm_jax.convert.common import full_config


def get_config(arg=None):
    meta = json.loads(Path(__file__).with_name("convert.json").read_text())
    return full_config(meta["sections"], meta.get("task", "contrastive"))
'''


def reshaped(source: str, ours: str, ours_shape: tuple[int, ...], source_shape) -> Entry:
    """A tensor stored with another shape of the same values (posemb [N, D] vs [1, N, D])."""
    return Entry(source, ours, lambda x: x.reshape(ours_shape), lambda x: x.reshape(source_shape))


def conv_patches(source: str, ours: str) -> Entry:
    """torch Conv2d weight [D, C, p, p] -> flax Conv kernel [p, p, C, D]."""
    return Entry(source, ours, lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))


# Per-block names of the torch layouts: (ln before attention, attention, ln before MLP,
# MLP in, MLP out, attention packed?).
BLOCK_NAMES = {
    "hf": ("layer_norm1", "self_attn", "layer_norm2", "mlp.fc1", "mlp.fc2", False),
    "open_clip": ("ln_1", "attn", "ln_2", "mlp.c_fc", "mlp.c_proj", True),
}


def encoder_entries(source: str, ours: str, depth: int, heads: int, style: str) -> list[Entry]:
    """Pre-LN transformer blocks `source.{i}.*` -> our `ours/block_{i}/*` (unscanned)."""
    ln1, attn, ln2, fc1, fc2, packed = BLOCK_NAMES[style]
    entries = []
    for i in range(depth):
        src, dst = f"{source}.{i}", f"{ours}/block_{i}"
        entries += norm(f"{src}.{ln1}", f"{dst}/ln_attn") + norm(f"{src}.{ln2}", f"{dst}/ln_mlp")
        entries += attention(f"{src}.{attn}", f"{dst}/attn", heads, packed)
        entries += linear(f"{src}.{fc1}", f"{dst}/mlp/fc1") + linear(
            f"{src}.{fc2}", f"{dst}/mlp/fc2"
        )
    return entries


def map_head_entries(source: str, ours: str, heads: int) -> list[Entry]:
    """SigLIP's attention-pooling head (torch MultiheadAttention, packed) -> our MAPHead."""
    entries = [Entry(f"{source}.probe", f"{ours}/probe")]
    entries += attention(f"{source}.attention", f"{ours}/attn", heads, packed=True)
    entries += norm(f"{source}.layernorm", f"{ours}/ln")
    return (
        entries
        + linear(f"{source}.mlp.fc1", f"{ours}/mlp/fc1")
        + linear(f"{source}.mlp.fc2", f"{ours}/mlp/fc2")
    )


def projection(source: str, ours: str, bias: bool, transposed: bool = False) -> list[Entry]:
    """A projection head: torch Linear ([out, in]) or open_clip's bare matrix ([in, out])."""
    if transposed:
        return [Entry(source, f"{ours}/kernel")]
    entries = linear(source, ours)
    return entries if bias else entries[:1]
