"""Trainer-level defaults shared by every experiment config.

Config files start from `base_config()` and set the task, model, loss and data sections. Every
key a run reads exists here, so a mistyped `--config.key` fails instead of being ignored.
"""

from __future__ import annotations

import ml_collections

from vlm_jax.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "contrastive"
    c.seed = 0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256  # global batch, over all processes
    c.train.total_steps = 1000
    c.train.log_every = 50
    c.train.eval_every = 0  # 0: evaluate only at the end
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.async_checkpoint = True
    c.train.grad_cache_chunks = 0  # >1: gradient-cache the contrastive batch in this many chunks
    c.train.worker_count = 0  # Grain worker processes per host (0: in the main process)
    c.train.worker_buffer_size = 1  # batches each worker keeps ready (the prefetch depth)
    # Row blocks of the global batch, each read from its own record shard (0: one per process
    # group holding distinct rows). Fixed, it makes the data order independent of the host count.
    c.train.data_shards = 0
    # Non-finite loss/gradients: the step's update is always dropped; "skip" counts it and goes
    # on, "stop" saves the last good state and raises naming the parameters (train/numerics.py).
    c.train.on_nonfinite = "skip"
    # Where metrics go, by name (train/metrics.py METRIC_WRITERS): "jsonl" (metrics.jsonl),
    # "tensorboard", "wandb" (Weights & Biases: the `wandb` section, the [wandb] extra).
    c.train.metric_writers = ("jsonl", "tensorboard")

    c.wandb = ml_collections.ConfigDict()
    c.wandb.project = "vlm_jax"
    c.wandb.entity = ""  # "": W&B's default entity
    c.wandb.name = ""  # "": the workdir's name
    c.wandb.mode = ""  # "online", "offline" (files only) or "disabled"; "": WANDB_MODE, else online

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"
    c.optim.end_lr_fraction = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-4
    c.optim.decay_regex = r".*(kernel|embedding|posemb)"
    c.optim.grad_clip_norm = 1.0
    c.optim.freeze = ()  # regexes over param paths, e.g. ("img/.*",)
    # LoRA adapters (models/lora.py, schema LORA): rank 0 is off; on, only the adapters (and the
    # params `train` names) train, e.g. rank=8, targets="lm/.*/attn/(query|value)/kernel".
    c.optim.lora = ml_collections.ConfigDict()
    c.optim.lora.rank = 0
    c.optim.lora.alpha = 16.0
    c.optim.lora.dropout = 0.0
    c.optim.lora.targets = ""  # regex fully matching the kernels' param paths
    c.optim.lora.train = ()  # regexes over param paths that train in full too

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = the remaining devices

    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = tuple((name, axes) for name, axes in DEFAULT_RULES)

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # "" = single process unless the env says otherwise
    c.distributed.num_processes = 0
    c.distributed.process_id = -1

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""  # workdir or checkpoints dir whose params initialise this run
    # A ViT posemb saved for another image size: "bicubic" | "bilinear" | "bilinear_corners"
    c.init.posemb_resample = "bicubic"
    c.init.posemb_antialias = True

    c.perf = ml_collections.ConfigDict()
    c.perf.peak_flops_per_device = 0.0  # 0: look up by device kind (unknown on CPU)

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256
    # Evaluators (vlm_jax/evaluate EVALUATORS) run in this order: the contrastive task's two
    # (the vlm and lm configs name their task's); each task says which it accepts.
    c.eval.tasks = ("zeroshot", "retrieval")
    # Per-split changes to the data section, e.g. {"zeroshot": {"tfds_name": "imagenet2012"}}.
    c.eval.data_overrides = ml_collections.ConfigDict()
    return c
