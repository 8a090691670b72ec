"""SigLIP on real images: scikit-learn's handwritten digits, as an image folder with JSONL.

Make the folder once (1,797 scanned 8x8 digits, upscaled; train/val/zeroshot splits), then train
and evaluate through the usual CLI:

    python configs/digits_folder.py /tmp/digits
    python -m vlm_jax.train --config configs/digits_folder.py --workdir runs/digits \
        --config.data.path=/tmp/digits
    python -m vlm_jax.evaluate --config configs/digits_folder.py --workdir runs/digits \
        --config.data.path=/tmp/digits

The zero-shot split holds digits never trained on, classified by the prompts in templates.txt.
The same folder converts to array_record shards with `python -m vlm_jax.data.write_shards`.
"""

import json
import sys
from pathlib import Path

import ml_collections
import numpy as np

from vlm_jax.config import load_config
from vlm_jax.data.pipeline import record_check_config

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTIONS = ("a handwritten {}", "the digit {}", "a scanned {}", "a drawing of the number {}")
TEMPLATES = ("a handwritten digit {}.", "the number {}.")
SPLIT_SIZES = {"zeroshot": 300, "val": 200}  # the rest (1,297) is train
IMAGE_SIZE = 16


def vocabulary() -> tuple[str, ...]:
    """Every word of the captions and prompts (the word tokenizer's vocabulary)."""
    texts = [t.format(name) for t in CAPTIONS + TEMPLATES for name in NAMES]
    words = {w for text in texts for w in text.replace(".", " .").split()}
    return tuple(sorted(words))


def get_config(arg=None):
    c = load_config(str(Path(__file__).with_name("siglip_shapes.py")))
    c.data = ml_collections.ConfigDict(
        dict(source="folder", path="", image_size=IMAGE_SIZE, flip=False, **record_check_config())
    )
    c.data.templates = TEMPLATES
    c.tokenizer.words = vocabulary()
    c.tokenizer.max_len = 8
    c.model.embed_dim = 64
    c.model.image.update(
        image_size=IMAGE_SIZE, patch_size=4, width=64, depth=2, num_heads=2, mlp_dim=128
    )
    c.model.text.update(max_len=8, width=64, depth=1, num_heads=2, mlp_dim=128)
    c.train.batch_size = 128
    c.train.total_steps = 300
    c.train.log_every = 50
    c.train.eval_every = 0
    c.train.checkpoint_every = 300
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.eval.batch_size = 256
    return c


def write_digits_folder(out: str | Path, seed: int = 0) -> dict[str, int]:
    """Write the digits as PNGs plus {split}.jsonl, classnames.txt and templates.txt."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(digits.target))
    bounds = np.cumsum([0, *SPLIT_SIZES.values()])
    splits = dict(zip([*SPLIT_SIZES, "train"], np.split(order, bounds[1:])))
    rng = np.random.default_rng(seed + 1)
    for split, indices in splits.items():
        rows = []
        for i in indices:
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)  # 8x8, 0..16 -> 0..255
            image = Image.fromarray(pixels).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            image.convert("RGB").save(out / "images" / f"{i:04d}.png")
            label = int(digits.target[i])
            caption = CAPTIONS[rng.integers(len(CAPTIONS))].format(NAMES[label])
            rows.append({"image": f"images/{i:04d}.png", "caption": caption, "label": label})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    (out / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return {split: len(indices) for split, indices in splits.items()}


if __name__ == "__main__":
    print(write_digits_folder(sys.argv[1]))
