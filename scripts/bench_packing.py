"""Supervised tokens per second of a VLM training step, packed (data.packing) vs padded rows.

    python scripts/bench_packing.py [--steps 8] [--batch 8] [--max_len 256] [--max_images 1]

Writes a LLaVA-format JSON of short and long conversations (captions over noise images, long
multi-turn ones, text-only ones; their lengths ~ 10x apart) into a temporary directory, builds
the "vlm" task's real training pipeline over it (byte tokenizer, plain template) with and
without packing, and times the jitted forward + backward of the task's loss on a tiny VLM
(configs/vlm_shapes.py at test sizes) for --steps batches after one warm-up batch. Prints one
JSON line per mode (rows, supervised tokens, padded share, step_s, supervised_tokens_per_s,
conversations_per_row) and the packed / padded speed-up.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from PIL import Image

from vlm_jax.config import apply_override, load_config
from vlm_jax.data.pipeline import default_data_config
from vlm_jax.data.vqa import build_vqa_pipeline, build_vqa_tokenizer
from vlm_jax.losses import next_token_loss
from vlm_jax.models.vlm import build_vlm
from vlm_jax.train.tasks.vlm import VLMTask

TINY = {
    "model.image.image_size": "16",
    "model.image.width": "32",
    "model.image.depth": "1",
    "model.image.num_heads": "2",
    "model.image.mlp_dim": "32",
    "model.lm.width": "64",
    "model.lm.depth": "2",
    "model.lm.num_heads": "4",
    "model.lm.num_kv_heads": "2",
    "model.lm.head_dim": "16",
    "model.lm.mlp_dim": "128",
    "model.image_token_id": "260",
    "model.lm.vocab_size": "264",
}


def conversation_rows(count: int, rng: np.random.Generator) -> list[dict]:
    """A mix: short captions (1 image), long multi-turn chats (1 image), text-only questions."""
    words = [
        "the",
        "a",
        "red",
        "blue",
        "cat",
        "dog",
        "sits",
        "on",
        "mat",
        "under",
        "tree",
        "near",
        "house",
        "and",
        "looks",
        "at",
    ]
    say = lambda n: " ".join(rng.choice(words, n))
    rows = []
    for i in range(count):
        kind = i % 4
        if kind in (0, 1):  # short caption
            turns = [("<image>\nDescribe briefly.", say(4))]
        elif kind == 2:  # long multi-turn
            turns = [("<image>\n" + say(8) + "?", say(12))] + [(say(6) + "?", say(10))] * 2
        else:  # text-only
            turns = [(say(5) + "?", say(6))]
        conversation = [
            {"from": who, "value": text}
            for question, answer in turns
            for who, text in (("human", question), ("gpt", answer))
        ]
        row = {"id": f"r{i}", "conversations": conversation}
        if kind != 3:
            row["image"] = f"img{i % 4}.png"
        rows.append(row)
    return rows


def write_data(root: Path, count: int) -> str:
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.png")
    path = root / "train.json"
    path.write_text(json.dumps(conversation_rows(count, rng)))
    return str(path)


def bench_config(path: str, max_len: int, max_images: int, packing: bool):
    config = load_config("configs/vlm_shapes.py")
    for key, value in TINY.items():
        apply_override(config, key, value)
    with config.unlocked():
        config.data = default_data_config("llava_json")
        config.data.update(
            path=path, image_size=16, flip=False, packing=packing, max_images=max_images
        )
        config.tokenizer = ml_collections.ConfigDict({"name": "bytes", "max_len": max_len})
        config.model.attention_impl = "xla"
    return config


def run(path: str, args, packing: bool) -> dict:
    config = bench_config(path, args.max_len, args.max_images, packing)
    tokenizer = build_vqa_tokenizer(config.tokenizer)
    stream = iter(
        build_vqa_pipeline(config, tokenizer, "train", batch_size=args.batch, packing=packing)
    )
    model = build_vlm(config.model)
    first = next(stream)
    inputs = lambda batch: VLMTask.model_inputs(None, batch)
    params = model.init(jax.random.PRNGKey(0), **inputs(first))["params"]

    def loss(params, batch):
        logits = model.apply({"params": params}, **inputs(batch))
        return next_token_loss(logits, batch["tokens"], batch["loss_mask"])[0]

    step = jax.jit(jax.value_and_grad(loss))
    keys = set(first) & {"image", "tokens", "loss_mask", "prefix_len", "segment_ids",
                         "prefix_mask"}  # fmt: skip
    device = lambda b: {k: b[k] for k in keys}
    jax.block_until_ready(step(params, device(first)))  # compile
    supervised = rows = padded = conversations = 0
    step_s = data_s = 0.0
    for _ in range(args.steps):
        start = time.perf_counter()
        batch = next(stream)
        data_s += time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(step(params, device(batch)))
        step_s += time.perf_counter() - start
        supervised += int(batch["loss_mask"][:, 1:].sum())
        rows += len(batch["tokens"])
        text = (batch["tokens"] != tokenizer.pad_id) | (batch["loss_mask"] > 0)
        padded += int((~text).sum())
        conversations += int(batch.get("packed_conversations", np.ones(len(text))).sum())
    return {
        "mode": "packed" if packing else "padded",
        "rows": rows,
        "conversations_per_row": round(conversations / rows, 2),
        "supervised_tokens": supervised,
        "padded_share": round(padded / (rows * args.max_len), 3),
        "step_s": round(step_s, 3),
        "data_s": round(data_s, 3),
        "supervised_tokens_per_s": round(supervised / step_s, 1),
        "supervised_tokens_per_s_with_data": round(supervised / (step_s + data_s), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_len", type=int, default=256)
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--max_images", type=int, default=1, help="data.max_images: K per row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_data(Path(tmp), args.records)
        results = [run(path, args, packing) for packing in (False, True)]
    for result in results:
        print(json.dumps(result))
    speedup = results[1]["supervised_tokens_per_s"] / results[0]["supervised_tokens_per_s"]
    print(f"packed / padded supervised tokens/s: {speedup:.2f}x")


if __name__ == "__main__":
    main()
