"""Models by name: `build_model(config.model)` looks up `config.model.name` in MODELS.

A model module registers a builder `fn(model_config) -> nn.Module` with
`@MODELS.register("name", schema=...)` (the keys of `config.model` it reads; the builder resolves
its section against MODEL); MODELS imports the modules it lists on its first lookup.
"""

from __future__ import annotations

import ml_collections

from vlm_jax.registry import Registry
from vlm_jax.schema import Select

# "two_tower"; "vlm" and "decoder_lm".
MODELS = Registry("model", modules=("vlm_jax.models.two_tower", "vlm_jax.models.vlm"))
MODEL = Select(MODELS)  # config.model: `name` and the keys of the model it names


def build_model(model_config: ml_collections.ConfigDict):
    """The linen module `model_config.name` names, built (and validated) from `model_config`."""
    return MODELS.get(model_config.name)(model_config)
