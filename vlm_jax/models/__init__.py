"""Models by name: `build_model(config.model)` looks up `config.model.name` in MODELS.

A model module registers a builder `fn(model_config) -> nn.Module` with
`@MODELS.register("name")`; importing the submodules below performs the registrations.
"""

from __future__ import annotations

import ml_collections

from vlm_jax.registry import Registry

MODELS = Registry("model")


def build_model(model_config: ml_collections.ConfigDict):
    """The linen module `model_config.name` names, built (and validated) from `model_config`."""
    return MODELS.get(model_config.name)(model_config)


# Registrations: "two_tower"; "vlm" and "decoder_lm".
from vlm_jax.models import two_tower, vlm  # noqa: E402, F401
