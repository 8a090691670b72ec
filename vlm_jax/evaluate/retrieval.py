"""Image <-> text retrieval recall@K from embeddings.

Identical caption strings are one text: a retrieved text counts as a hit for an image when its
caption equals one of that image's captions (COCO-style: an image may have several captions,
and a synthetic world may draw two images with the same description). Likewise a retrieved image
is a hit for a text when that image's caption equals the text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def recall_at_k(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    image_captions: Sequence[str],
    text_captions: Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """R@K in both directions.

    image_emb: float[N, E]; text_emb: float[M, E] (unit-norm or not: cosine is not assumed,
    ranking is by dot product); image_captions[i]: the caption of image i;
    text_captions[j]: the caption string of text j.
    Returns {"i2t_r1": ..., "t2i_r1": ..., ...} in [0, 1].
    """
    image_emb = np.asarray(image_emb, np.float64)
    text_emb = np.asarray(text_emb, np.float64)
    image_captions = np.asarray(image_captions, dtype=object)
    text_captions = np.asarray(text_captions, dtype=object)
    scores = image_emb @ text_emb.T  # [N, M]
    match = image_captions[:, None] == text_captions[None, :]  # bool[N, M]
    if not match.any(axis=1).all():
        raise ValueError("every image needs at least one text with its caption in the gallery")
    results = {}
    for k in ks:
        top_texts = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [N, k]
        hits_i2t = np.take_along_axis(match, top_texts, axis=1).any(axis=1)
        top_images = np.argsort(-scores.T, axis=1, kind="stable")[:, :k]  # [M, k]
        hits_t2i = np.take_along_axis(match.T, top_images, axis=1).any(axis=1)
        results[f"i2t_r{k}"] = float(hits_i2t.mean())
        results[f"t2i_r{k}"] = float(hits_t2i.mean())
    return results


def unique_texts(captions: Sequence[str]) -> list[str]:
    """The text gallery: each distinct caption once, in first-seen order."""
    return list(dict.fromkeys(captions))
