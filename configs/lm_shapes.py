"""Text-only pretraining of the VLM's decoder on the shapes world's captions ("lm" task).

python -m vlm_jax.train --config configs/lm_shapes.py --workdir runs/lm
Its checkpoint initialises the VLM's LM: configs/vlm_shapes.py with
--config.init.lm_checkpoint=runs/lm. The tokenizer and `model.lm` must equal the VLM's, so
both are taken from configs/vlm_shapes.py.
"""

from pathlib import Path

import ml_collections

from vlm_jax.config import load_config
from vlm_jax.defaults import base_config


def get_config(arg=None):
    vlm = load_config(str(Path(__file__).with_name("vlm_shapes.py")))
    c = base_config()
    c.task = "lm"
    c.data = vlm.data
    c.data.source = "shapes"  # captions only: the VQA source's question_types do not apply
    del c.data["question_types"]
    c.tokenizer = vlm.tokenizer
    c.model = ml_collections.ConfigDict()
    c.model.name = "decoder_lm"
    c.model.dtype = vlm.model.dtype
    c.model.attention_impl = vlm.model.attention_impl
    c.model.remat = False
    c.model.lm = vlm.model.lm
    c.train.batch_size = 64
    c.train.total_steps = 600
    c.train.log_every = 50
    c.train.checkpoint_every = 300
    c.optim.warmup_steps = 50
    c.eval.tasks = ("perplexity",)  # val loss and token accuracy
    c.eval.batch_size = 256
    return c
