"""CLIP (softmax loss, temperature 1/0.07, no bias) on the embedded shapes world.

Identical to configs/siglip_shapes.py except for the loss and the logit scale/bias.
"""

from pathlib import Path

from vlm_jax.config import load_config


def get_config(arg=None):
    c = load_config(str(Path(__file__).with_name("siglip_shapes.py")))
    c.loss.name = "softmax"
    c.model.temperature_init = 1 / 0.07
    c.model.bias_init = None
    c.model.text.causal = True
    c.model.text.pool = "eos"
    return c
