"""Quickstart: SigLIP (sigmoid loss) two-tower model on the embedded shapes world.

python -m vlm_jax.train --config configs/siglip_shapes.py --workdir runs/quickstart
Sized to reach held-out zero-shot top-1 >= 0.95 and image->text R@1 >= 0.9 on 2 CPU cores in about
9 minutes when they are idle (see benchmarks/RESULTS.md for measured numbers). A 5-minute recipe
(issue 21) was tried and fell short of those metrics; RESULTS.md, "Quickstart in 5 minutes", has
it as command-line overrides, with its measured accuracy-vs-wall-time curves.
"""

import ml_collections

from vlm_jax.data.pipeline import default_data_config
from vlm_jax.defaults import base_config


def get_config(arg=None):
    c = base_config()
    c.task = "contrastive"

    c.data = default_data_config()  # the shapes world: every key overridable from the CLI
    c.data.image_size = 32
    # Varied wordings (dropped sizes, "one", prefixes, inverted relations) and more one-group
    # scenes teach the text tower what a bare "colour kind" prompt means (tuned by learning
    # curves; see benchmarks/RESULTS.md).
    c.data.caption_variation = 0.75
    c.data.relation_prob = 0.3
    c.data.val_size = 1000
    c.data.zeroshot_size = 1000

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.name = "words"
    c.tokenizer.max_len = 16

    c.model = ml_collections.ConfigDict()
    c.model.name = "two_tower"
    c.model.embed_dim = 128
    c.model.dtype = "float32"
    c.model.attention_impl = "auto"
    c.model.remat = False
    c.model.scan = False
    c.model.image = ml_collections.ConfigDict(
        dict(
            variant=None,
            width=128,
            depth=4,
            num_heads=4,
            mlp_dim=512,
            patch_size=8,
            image_size=32,
            posemb="learn",
            pool="gap",
            stem="conv",  # early convolutions see a small shape cut by a patch border whole
            dropout=0.0,
        )
    )
    c.model.text = ml_collections.ConfigDict(
        dict(
            vocab_size=128,
            max_len=16,
            width=128,
            depth=2,
            num_heads=4,
            mlp_dim=512,
            causal=False,
            pool="last",
            pad_id=0,
            eos_id=1,
            dropout=0.0,
        )
    )
    c.model.temperature_init = 10.0  # SigLIP: t' = log 10
    c.model.bias_init = -10.0
    c.model.learn_temperature = True
    c.model.max_logit_scale = 100.0

    c.loss = ml_collections.ConfigDict(
        dict(name="sigmoid", chunked=False, tile_size=1024, batch_axes=("data", "fsdp"))
    )
    # Duplicate-aware targets and hard negatives (README): off, the classic loss.
    c.loss.positives = "diagonal"
    c.loss.hard_negatives = ml_collections.ConfigDict(dict(k=0, weight=1.0, guard=0.9))

    # Small batches, many steps: per example seen, batch 64 learns the shape kinds far faster
    # than 128 or 256 (and SigLIP's sigmoid loss needs no big batch); see benchmarks/RESULTS.md.
    c.train.batch_size = 64
    c.train.total_steps = 4400
    c.train.log_every = 100
    c.train.eval_every = 1100
    c.train.checkpoint_every = 550
    c.train.worker_count = 1  # data on the second core, overlapping the train step
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 400
    c.optim.weight_decay = 1e-4
    c.eval.batch_size = 500
    return c
