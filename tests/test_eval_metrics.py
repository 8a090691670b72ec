"""Zero-shot and retrieval metrics on hand-made embeddings with known answers."""

import numpy as np
import pytest

from vlm_jax.evaluate import class_embeddings, recall_at_k, zeroshot_accuracy


def test_retrieval_known_ranks():
    # 3 images, 3 texts on axes; image 2 is closest to text 1 -> a miss at R@1, hit at R@2.
    images = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0.9, 0.1]])
    texts = np.eye(3)
    captions = ["a", "b", "c"]
    r = recall_at_k(images, texts, captions, captions, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(2 / 3)
    assert r["i2t_r2"] == pytest.approx(1.0)
    # text "c" (axis 2): image 2 scores 0.1, the others 0 -> hit at R@1.
    # text "b" (axis 1): image 1 scores 1.0 > image 2's 0.9 -> hit.
    assert r["t2i_r1"] == pytest.approx(1.0)


def test_retrieval_identical_captions_count_as_one_text():
    images = np.array([[1.0, 0], [1.0, 0]])
    texts = np.array([[1.0, 0]])
    r = recall_at_k(images, texts, ["red circle", "red circle"], ["red circle"], ks=(1,))
    assert r["i2t_r1"] == 1.0 and r["t2i_r1"] == 1.0


def test_retrieval_requires_every_caption_in_gallery():
    with pytest.raises(ValueError, match="at least one text"):
        recall_at_k(np.eye(2), np.eye(2)[:1], ["a", "b"], ["a"])


def test_zeroshot_averages_templates_and_scores():
    classnames = ["red", "blue"]
    templates = ["a {}", "the {}"]
    table = {
        "a red": [1.0, 0.2],
        "the red": [1.0, -0.2],
        "a blue": [0.0, 1.0],
        "the blue": [0.1, 1.0],
    }
    class_emb = class_embeddings(
        lambda prompts: np.array([table[p] for p in prompts]), classnames, templates
    )
    np.testing.assert_allclose(np.linalg.norm(class_emb, axis=1), 1.0)
    assert class_emb[0, 1] == pytest.approx(0.0, abs=1e-12)  # the template offsets cancel
    images = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.5]])
    acc = zeroshot_accuracy(images, class_emb, np.array([0, 1, 1]), ks=(1, 2))
    assert acc["top1"] == pytest.approx(2 / 3)  # the third image is nearer "red"
    assert acc["top2"] == 1.0
