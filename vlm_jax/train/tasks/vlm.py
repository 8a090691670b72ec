"""The "vlm" task: VQA / captioning / instruction following on any source of VQA records
(data.source "shapes_vqa", "vqa_folder", ...: the record contract in data/vqa.py), with
`<image>` an added special token of the configured tokenizer (the "lm" task, lm.py, pretrains
the decoder that `init.lm_checkpoint` loads).

Training recipes are config only (configs/vlm_shapes.py RECIPES):
  stage 1: optim.freeze = ("vision/.*", "lm/(?!xattn_).*")   connector (and, with
           cross-attention fusion, the gated lm/xattn_* blocks) trained
  stage 2: optim.freeze = ("vision/.*",)                     connector + LM
  full:    optim.freeze = ()
  init.vision_checkpoint: a contrastive run's workdir; its image tower initialises `vision`
  init.lm_checkpoint:     an "lm" run's workdir; its decoder initialises `lm`
Frozen params get a zero update, no optimizer state and no weight gradients (optim.freeze;
activation gradients still flow through a frozen LM to a trained connector).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.checkpoint import load_params
from vlm_jax.data import worker_options
from vlm_jax.data.sources import DATA, build_source
from vlm_jax.data.tokenizers import TOKENIZER
from vlm_jax.data.vqa import (
    build_vqa_pipeline,
    build_vqa_tokenizer,
    image_token_id,
    images_per_record,
)
from vlm_jax.evaluate import eval_section
from vlm_jax.losses import next_token_loss
from vlm_jax.models import MODEL, vocab
from vlm_jax.models.posemb import resample_towers
from vlm_jax.models.vit import ViT
from vlm_jax.models.vlm import FUSIONS, build_vlm
from vlm_jax.schema import Key, Schema, resolve
from vlm_jax.train.tasks import INIT, TASKS, Task, check_vocab_size, posemb_resample


@TASKS.register("vlm")
class VLMTask(Task):
    evaluators = ("vqa", "caption")  # vlm_jax/evaluate/vqa.py
    image_towers = ("vision",)
    SCHEMA = Task.SCHEMA | Schema(
        {
            "eval": eval_section(evaluators),
            "model": MODEL,
            "data": DATA,
            "tokenizer": TOKENIZER,
            "init": INIT
            | Schema(
                {
                    "vision_checkpoint": Key(
                        str, "", "a contrastive run whose image tower initialises `vision`"
                    ),
                    "vision_key": Key(str, "img", "the image tower's name in that run's params"),
                    "lm_checkpoint": Key(str, "", "an lm run whose decoder initialises `lm`"),
                }
            ),
        }
    )

    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.tokenizer = build_vqa_tokenizer(config.tokenizer)
        check_vocab_size("model.lm.vocab_size", config.model.lm.vocab_size, self.tokenizer)
        if config.model.image_token_id != image_token_id(self.tokenizer):
            raise ValueError(
                f"model.image_token_id={config.model.image_token_id} but the tokenizer's "
                f"<image> id is {image_token_id(self.tokenizer)}"
            )
        pad_id = resolve("model", config.model, MODEL).pad_id  # the Q-Former's mask drops it
        if pad_id != self.tokenizer.pad_id:
            raise ValueError(
                f"model.pad_id={pad_id} but the tokenizer's pad id is {self.tokenizer.pad_id}"
            )
        self.model = build_vlm(config.model)
        if self.packing and FUSIONS.get(self.model.fusion).cross_attention:
            raise ValueError(
                f"data.packing=True with model.fusion={self.model.fusion!r}: packed rows need "
                "fusion early or none (cross-attention reads all of a row's media)"
            )

    @functools.cached_property
    def packing(self) -> bool:
        """data.packing: several conversations per training row (data/packing.py)."""
        return bool(resolve("data", self.config.data, DATA).get("packing", False))

    added_keys: ClassVar[dict] = Task.added_keys | {("model", "pad_id"): 0}  # model.pad_id

    @functools.cached_property
    def images_per_record(self) -> int:
        """K, the images of each training record (the source's; 1 for most)."""
        return images_per_record(build_source(self.config.data, "train"))

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        size, length = self.config.data.image_size, self.config.tokenizer.max_len
        images = (batch_size, self.images_per_record, size, size, 3)
        per_token = jax.ShapeDtypeStruct((batch_size, length), np.int32)
        # A packed row's prefixes: one per conversation (prefix_mask), not one prefix_len.
        prefix = {"segment_ids": per_token, "prefix_mask": per_token}
        if not self.packing:
            prefix = {"prefix_len": jax.ShapeDtypeStruct((batch_size,), np.int32)}
        return {
            "image": jax.ShapeDtypeStruct(images, np.float32),
            "tokens": per_token,
            **prefix,
            "loss_mask": per_token,
        }

    def model_inputs(self, batch):
        inputs = {"images": batch["image"], "tokens": batch["tokens"]}
        if "segment_ids" in batch:  # packed rows (data.packing)
            return inputs | {
                "prefix_lengths": None,
                "segments": (batch["segment_ids"], batch["prefix_mask"]),
            }
        return inputs | {"prefix_lengths": batch["prefix_len"]}

    def loss(self, params, batch, rng, train):
        logits = self.model.apply(
            {"params": params}, **self.model_inputs(batch), train=train, rngs={"dropout": rng}
        )
        loss, metrics = next_token_loss(logits, batch["tokens"], batch["loss_mask"])
        supervised = jnp.sum(batch["loss_mask"][:, 1:])  # the targets of this global batch
        return loss, metrics | {"supervised_tokens": supervised.astype(jnp.float32)}

    def train_data(self, batch_size, process_index, process_count, seed):
        return build_vqa_pipeline(
            self.config,
            self.tokenizer,
            "train",
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
            seed=seed,
            packing=self.packing,
            **worker_options(self.config.train),
        )

    def load_pretrained(self, params: Any) -> Any:
        """Replace `vision` / `lm` by the towers of the runs in config.init (fresh runs only)."""
        init = resolve("init", self.config.init, self.SCHEMA.keys["init"])
        if init.vision_checkpoint and "vision" in params:  # not in text-only models
            check_tower_computes_alike(init.vision_checkpoint, self.config.model.image)
            image = load_params(init.vision_checkpoint)[init.vision_key]
            image = resample_towers(  # a tower trained at another image size
                {"vision": image}, params, self.image_towers, posemb_resample(self.config)
            )["vision"]
            params = dict(params, vision=_like(params["vision"], image, "vision"))
        if init.lm_checkpoint:
            lm = load_params(init.lm_checkpoint)  # an "lm" run: the decoder's params
            added = vocab.vocab_rows(params["lm"]) - vocab.vocab_rows(lm)
            if added > 0:  # tokens the VLM adds (<image>) past the release's vocabulary
                lm = vocab.grow_vocab(lm, added)
            params = dict(params, lm=_like(params["lm"], lm, "lm", allow_missing="xattn_"))
        return params


# ViT keys that change what a tower computes without changing its params' shapes: the weights
# of a vision checkpoint alone do not carry them, so they must agree with its run's config.
COMPUTE_KEYS = ("activation", "ln_eps", "input_mean", "input_std")


def _tower_setting(image: Any, key: str) -> Any:
    """model.image[key] as the ViT reads it (absent: the ViT's default; no mean/std: 0.5)."""
    value = image.get(key) if hasattr(image, "get") else None
    if value is None:
        value = ViT.__dataclass_fields__[key].default
    if key.startswith("input_") and value is None:
        value = (0.5, 0.5, 0.5)  # the ViT's [-1, 1] scaling
    return tuple(value) if isinstance(value, list | tuple) else value


def check_tower_computes_alike(run: str, image: Any) -> None:
    """Fail naming each COMPUTE_KEYS setting where the run's image tower (its config.json's
    model.image: a contrastive, converted or VLM run) and this model's model.image differ."""
    path = Path(run) / "config.json"
    if not path.is_file():
        return  # a bare checkpoints/ directory: nothing to compare with
    theirs = json.loads(path.read_text()).get("model", {}).get("image")
    if not theirs:
        return
    differ = [
        (key, _tower_setting(theirs, key), _tower_setting(image, key))
        for key in COMPUTE_KEYS
        if _tower_setting(theirs, key) != _tower_setting(image, key)
    ]
    if differ:
        detail = "; ".join(f"{k}: the tower's {a!r}, model.image's {b!r}" for k, a, b in differ)
        raise ValueError(
            f"init.vision_checkpoint={run!r} was trained with other image-tower settings than "
            f"model.image ({detail}); set model.image.<key> to the tower's values (its weights "
            "alone do not carry them)"
        )


def _like(target: Any, source: Any, name: str, allow_missing: str | None = None) -> Any:
    """`source` placed into `target`'s shardings; shapes must match, and every target leaf
    must come from `source` except subtrees whose name starts with `allow_missing`."""
    if isinstance(target, dict):
        out = {}
        for key, value in target.items():
            if key not in source:
                if allow_missing and key.startswith(allow_missing):
                    out[key] = value
                    continue
                raise ValueError(f"init checkpoint has no {name}/{key}; it has {sorted(source)}")
            out[key] = _like(value, source[key], f"{name}/{key}", allow_missing)
        return out
    if tuple(target.shape) != tuple(source.shape):
        raise ValueError(f"init checkpoint {name}: shape {source.shape} != model {target.shape}")
    return jax.device_put(jnp.asarray(source, target.dtype), target.sharding)
