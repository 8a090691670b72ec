"""The "vlm" task (VQA / captioning on the shapes world) and the "lm" task (text-only decoder
pretraining on the world's captions, whose checkpoint can initialise the VLM's LM).

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

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax import sharding
from vlm_jax.checkpoint import load_params
from vlm_jax.data import build_pipeline, build_tokenizer, load_split
from vlm_jax.data.vqa import build_vqa_pipeline, encode_example, image_token_id
from vlm_jax.evaluate.vqa import evaluate_vqa, load_examples
from vlm_jax.models.vlm import build_decoder_lm, build_vlm
from vlm_jax.train.tasks import TASKS, Task, check_vocab_size


def next_token_sums(
    logits: jax.Array, tokens: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(summed cross-entropy, correct argmax predictions, target count) of tokens[:, 1:] under
    logits[:, :-1], over tokens with weight 1: float32 scalars that add up across batches.

    logits: float32[B, L, V]; tokens, weights: int[B, L] (weights mark target tokens).
    """
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    targets, w = tokens[:, 1:], weights[:, 1:].astype(jnp.float32)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(log_probs, -1) == targets) * w
    return (nll * w).sum(), correct.sum(), w.sum()


def next_token_loss(
    logits: jax.Array, tokens: jax.Array, weights: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy and token accuracy of `next_token_sums` (same shapes)."""
    nll, correct, count = next_token_sums(logits, tokens, weights)
    count = jnp.maximum(count, 1.0)
    return nll / count, {"token_acc": correct / count}


@TASKS.register("vlm")
class VLMTask(Task):
    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.tokenizer = build_tokenizer(config.tokenizer)
        check_vocab_size("model.lm.vocab_size", config.model.lm.vocab_size, self.tokenizer)
        if config.model.image_token_id != image_token_id(self.tokenizer):
            raise ValueError(
                f"model.image_token_id={config.model.image_token_id} but the tokenizer's "
                f"<image> id is {image_token_id(self.tokenizer)}"
            )
        pad_id = config.model.get("pad_id", 0)  # the Q-Former's instruction mask drops it
        if pad_id != self.tokenizer.pad_id:
            raise ValueError(
                f"model.pad_id={pad_id} but the tokenizer's pad id is {self.tokenizer.pad_id}"
            )
        self.model = build_vlm(config.model)
        self._examples = None

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        size, length = self.config.data.image_size, self.config.tokenizer.max_len
        return {
            "image": np.zeros((batch_size, 1, size, size, 3), np.float32),
            "tokens": np.zeros((batch_size, length), np.int32),
            "prefix_len": np.ones((batch_size,), np.int32),
            "loss_mask": np.zeros((batch_size, length), np.int32),
        }

    def model_inputs(self, batch):
        return {
            "images": batch["image"],
            "tokens": batch["tokens"],
            "prefix_lengths": batch["prefix_len"],
        }

    def loss(self, params, batch, rng, train):
        logits = self.model.apply(
            {"params": params}, **self.model_inputs(batch), train=train, rngs={"dropout": rng}
        )
        return next_token_loss(logits, batch["tokens"], batch["loss_mask"])

    def train_data(self, batch_size, process_index, process_count, seed):
        return build_vqa_pipeline(
            self.config,
            self.tokenizer,
            "train",
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
            seed=seed,
            worker_count=self.config.train.worker_count,
        )

    def evaluate(self, params: Any) -> dict[str, float]:
        if self._examples is None:
            self._examples = load_examples(
                self.config, self.tokenizer, self.config.eval.num_examples
            )
        return evaluate_vqa(self.model, params, self.config, self.tokenizer, self._examples)

    def load_pretrained(self, params: Any) -> Any:
        """Replace `vision` / `lm` by the towers of the runs in config.init (fresh runs only)."""
        init = self.config.init
        if init.get("vision_checkpoint") and "vision" in params:  # not in text-only models
            image = load_params(init.vision_checkpoint)[init.get("vision_key", "img")]
            params = dict(params, vision=_like(params["vision"], image, "vision"))
        if init.get("lm_checkpoint"):
            lm = load_params(init.lm_checkpoint)  # an "lm" run: the decoder's params
            params = dict(params, lm=_like(params["lm"], lm, "lm", allow_missing="xattn_"))
        return params


@TASKS.register("lm")
class LMTask(Task):
    """Next-token prediction on the shapes world's captions (all non-pad tokens)."""

    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.tokenizer = build_tokenizer(config.tokenizer)
        check_vocab_size("model.lm.vocab_size", config.model.lm.vocab_size, self.tokenizer)
        self.model = build_decoder_lm(config.model)
        self._val_tokens: np.ndarray | None = None
        self._eval_sums = jax.jit(self._token_sums)  # one compile: every eval chunk is padded

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        return {"tokens": np.zeros((batch_size, self.config.tokenizer.max_len), np.int32)}

    def model_inputs(self, batch):
        return {"tokens": batch["tokens"]}

    def loss(self, params, batch, rng, train):
        logits, _ = self.model.apply(
            {"params": params}, batch["tokens"], deterministic=not train, rngs={"dropout": rng}
        )
        weights = batch["tokens"] != self.tokenizer.pad_id
        return next_token_loss(logits, batch["tokens"], weights)

    def train_data(self, batch_size, process_index, process_count, seed):
        return build_pipeline(
            self.config,
            self.tokenizer,
            "train",
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
            seed=seed,
            worker_count=self.config.train.worker_count,
        )

    def _token_sums(self, params, tokens: jax.Array) -> tuple[jax.Array, ...]:
        """`next_token_sums` of int32[B, L] tokens; all-pad rows add nothing."""
        logits, _ = self.model.apply({"params": params}, tokens, deterministic=True)
        return next_token_sums(logits, tokens, tokens != self.tokenizer.pad_id)

    def evaluate(self, params: Any) -> dict[str, float]:
        """Token-weighted loss and accuracy over the whole val split, in chunks of
        eval.batch_size rows (rounded to the data-parallel size); the last chunk is filled with
        all-pad rows, so every chunk has one shape and every record counts exactly once."""
        tokens = self._val_split()
        chunk = sharding.eval_chunk_size(self.mesh, self.config.eval.batch_size)
        rows = sharding.process_batch_rows(self.mesh, chunk)
        totals = np.zeros(3)
        for start in range(0, len(tokens), chunk):
            part = _pad_rows(tokens[start : start + chunk], chunk, self.tokenizer.pad_id)
            batch = sharding.global_batch({"tokens": part[rows]}, self.mesh, chunk)
            totals += np.asarray(jax.device_get(self._eval_sums(params, batch["tokens"])))
        nll, correct, count = totals
        count = max(count, 1.0)
        return {"loss": float(nll / count), "token_acc": float(correct / count)}

    def _val_split(self) -> np.ndarray:
        """The val split's tokens int32[N, L], each good record once (loaded on first use)."""
        if self._val_tokens is None:
            split = load_split(self.config, self.tokenizer, "val", self.config.eval.batch_size)
            self._val_tokens = split["tokens"]
        return self._val_tokens


def _pad_rows(rows: np.ndarray, size: int, pad_id: int) -> np.ndarray:
    """`rows` [n, L] followed by size - n rows of `pad_id`: [size, L]."""
    filler = np.full((size - len(rows), *rows.shape[1:]), pad_id, rows.dtype)
    return np.concatenate([rows, filler])


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


def answer_from_checkpoint(
    workdir: str, image_path: str, prompt: str, *, max_new_tokens=16, temperature=0.0, top_k=0
) -> str:
    """Answer `prompt` about the image at `image_path` with a trained "vlm" run (greedy when
    temperature is 0; else sampled, from the top_k likeliest tokens when top_k > 0)."""
    from PIL import Image

    from vlm_jax.data import preprocess
    from vlm_jax.data.vqa import IMAGE_PLACEHOLDER, TEMPLATE
    from vlm_jax.generate import generate

    config = ml_collections.ConfigDict(json.loads((Path(workdir) / "config.json").read_text()))
    tokenizer = build_tokenizer(config.tokenizer)
    if not 0 <= top_k <= tokenizer.vocab_size:
        raise ValueError(f"top_k={top_k}: must be in [0, {tokenizer.vocab_size}] (the vocabulary)")
    model = build_vlm(config.model)
    params = load_params(workdir)
    if IMAGE_PLACEHOLDER not in prompt:
        prompt = TEMPLATE.format(images=IMAGE_PLACEHOLDER, question=prompt)
    image = np.asarray(Image.open(image_path).convert("RGB"))
    image = preprocess.to_float(preprocess.fit_image(image, config.data.image_size))
    example = encode_example(tokenizer, prompt, None, config.tokenizer.max_len)
    out = generate(
        model,
        {"params": params},
        jnp.asarray(image[None, None]),
        jnp.asarray(example["tokens"][None]),
        jnp.asarray(example["prefix_len"][None]),
        max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        temperature=temperature,
        top_k=top_k,
        vocab_size=tokenizer.vocab_size,
        rng=jax.random.key(0),
    )
    return tokenizer.decode(np.asarray(out[0]))
