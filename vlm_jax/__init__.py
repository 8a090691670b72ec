"""vlm_jax: a JAX/Flax research framework for vision-language models."""

__version__ = "0.1.0"
