"""Zero-shot classification from embeddings: class prompts with templates, averaged."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def class_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """All prompts, class-major: prompts[c * T + t] = templates[t].format(classnames[c])."""
    return [template.format(name) for name in classnames for template in templates]


def class_embeddings(
    embed_texts: Callable[[list[str]], np.ndarray],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> np.ndarray:
    """Average the normalised prompt embeddings of each class, then renormalise: float[C, E]."""
    prompt_emb = np.asarray(embed_texts(class_prompts(classnames, templates)), np.float64)
    prompt_emb = prompt_emb / np.linalg.norm(prompt_emb, axis=-1, keepdims=True)
    per_class = prompt_emb.reshape(len(classnames), len(templates), -1).mean(axis=1)
    return per_class / np.linalg.norm(per_class, axis=-1, keepdims=True)


def zeroshot_accuracy(
    image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1,)
) -> dict[str, float]:
    """Top-k accuracy of argmax over class similarities. image_emb: [N, E]; class_emb: [C, E]."""
    scores = np.asarray(image_emb, np.float64) @ np.asarray(class_emb, np.float64).T  # [N, C]
    order = np.argsort(-scores, axis=1, kind="stable")
    labels = np.asarray(labels)
    return {f"top{k}": float((order[:, :k] == labels[:, None]).any(axis=1).mean()) for k in ks}
