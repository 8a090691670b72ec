"""Real scale: CLIP ViT-B/16 at 224px, global batch 32k (softmax loss, t = 1/0.07, no bias).

Built on configs/siglip_b16.py (same data, image tower, optimiser and batch); CLIP's changes:
softmax loss, logit scale 1/0.07 with no bias, and CLIP's text side: the clip_bpe tokenizer
(vocab 49,408, max_len 77, pad 0, EOS 49,407 = <end_of_text>) and a causal text tower pooled at
its EOS token.
"""

from pathlib import Path

from vlm_jax.config import load_config


def get_config(arg=None):
    c = load_config(str(Path(__file__).with_name("siglip_b16.py")))
    c.loss.name = "softmax"
    c.model.temperature_init = 1 / 0.07
    c.model.bias_init = None
    c.model.text.causal = True
    c.model.text.pool = "eos"
    c.model.text.vocab_size = 49_408
    c.model.text.max_len = 77
    c.model.text.pad_id = 0
    c.model.text.eos_id = 49_407  # <end_of_text>
    c.tokenizer = type(c.tokenizer)(dict(name="clip_bpe", max_len=77))
    return c
