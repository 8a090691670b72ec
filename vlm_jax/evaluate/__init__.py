"""Evaluators: zero-shot classification, retrieval (and VQA/captioning for VLMs)."""

from vlm_jax.evaluate.retrieval import recall_at_k, unique_texts
from vlm_jax.evaluate.zeroshot import class_embeddings, class_prompts, zeroshot_accuracy

__all__ = [
    "class_embeddings",
    "class_prompts",
    "recall_at_k",
    "unique_texts",
    "zeroshot_accuracy",
]
