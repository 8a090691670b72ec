"""Pytree helpers shared by the layers above (checkpoint integrity, the trainer's numerics)."""

from __future__ import annotations

from typing import Any

import jax


def leaf_paths(tree: Any) -> list[str]:
    """'a/b/kernel'-style paths of `tree`'s leaves, in flatten order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in flat
    ]
