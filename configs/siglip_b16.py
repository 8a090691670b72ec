"""Real scale: SigLIP ViT-B/16 at 224px, global batch 32k, captions from TFDS.

Train pairs and retrieval from a captions dataset prepared with `tfds build` in a local data dir
(default `coco_captions`), zero-shot on `imagenet2012` validation. Shard over a pod with e.g.
`--config.mesh.shape='(-1,16,1)'` (FSDP) and set `--config.data.tfds_data_dir=/path/to/tfds`.
Nothing is downloaded at run time.
"""

import ml_collections

from vlm_jax.data.pipeline import record_check_config
from vlm_jax.defaults import base_config


def get_config(arg=None):
    c = base_config()
    c.task = "contrastive"

    c.data = ml_collections.ConfigDict(
        dict(
            source="tfds",
            tfds_name="coco_captions",
            tfds_data_dir="",
            tfds_splits={"train": "train", "val": "val", "zeroshot": "validation"},
            image_key="image",
            caption_key="captions/text",
            label_key="label",
            image_size=224,
            flip=False,
            **record_check_config(),
            classnames=(),
            templates=("a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}."),
        )
    )
    c.eval.data_overrides = ml_collections.ConfigDict(
        {"zeroshot": {"tfds_name": "imagenet2012", "caption_key": ""}}
    )

    # SigLIP's text conventions (see vlm_jax/data/spm.py); point model_path at the released
    # tower's SentencePiece model (e.g. --config.tokenizer.model_path=/ckpt/spiece.model).
    c.tokenizer = ml_collections.ConfigDict(
        dict(
            name="sentencepiece",
            max_len=64,
            model_path="",
            lower=True,
            strip_punctuation=True,
            add_bos=False,
            pad_id=1,
        )
    )

    c.model = ml_collections.ConfigDict()
    c.model.name = "two_tower"
    c.model.embed_dim = 768
    c.model.dtype = "bfloat16"
    c.model.attention_impl = "auto"
    c.model.remat = True
    c.model.scan = True
    c.model.image = ml_collections.ConfigDict(
        dict(
            variant="B/16",
            width=768,
            depth=12,
            num_heads=12,
            mlp_dim=3072,
            patch_size=16,
            image_size=224,
            posemb="learn",
            pool="map",
            dropout=0.0,
        )
    )
    c.model.text = ml_collections.ConfigDict(
        dict(
            vocab_size=32_000,
            max_len=64,
            width=768,
            depth=12,
            num_heads=12,
            mlp_dim=3072,
            causal=False,
            pool="last",
            pad_id=1,
            eos_id=1,
            dropout=0.0,
        )
    )
    c.model.temperature_init = 10.0
    c.model.bias_init = -10.0
    c.model.learn_temperature = True
    c.model.max_logit_scale = 100.0

    c.loss = ml_collections.ConfigDict(
        dict(name="sigmoid", chunked=True, tile_size=4096, batch_axes=("data", "fsdp"))
    )
    # Duplicate-aware targets and hard negatives (README): off, the classic loss.
    c.loss.positives = "diagonal"
    c.loss.hard_negatives = ml_collections.ConfigDict(dict(k=0, weight=1.0, guard=0.9))

    c.mesh.shape = (-1, 1, 1)
    c.train.batch_size = 32_768
    c.train.total_steps = 100_000
    c.train.log_every = 100
    c.train.eval_every = 5_000
    c.train.checkpoint_every = 2_000
    c.train.worker_count = 16
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 5_000
    c.optim.b2 = 0.95
    c.optim.weight_decay = 1e-4
    c.eval.batch_size = 4096
    return c
