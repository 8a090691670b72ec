"""Data: sources (embedded shapes world, ...), tokenizers, preprocessing, Grain pipelines."""

from vlm_jax.data.pipeline import build_pipeline, default_data_config, load_split, worker_options
from vlm_jax.data.sources import (
    DATA_SOURCES,
    build_source,
    zeroshot_classnames,
    zeroshot_templates,
)
from vlm_jax.data.tokenizers import TOKENIZERS, Tokenizer, build_tokenizer

__all__ = [
    "DATA_SOURCES",
    "TOKENIZERS",
    "Tokenizer",
    "build_pipeline",
    "build_source",
    "build_tokenizer",
    "default_data_config",
    "load_split",
    "worker_options",
    "zeroshot_classnames",
    "zeroshot_templates",
]
