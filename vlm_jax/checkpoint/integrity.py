"""Checkpoint/model compatibility: name the mismatched parameters instead of failing deep in
Orbax (or, worse, loading a checkpoint of another model silently)."""

from __future__ import annotations

from typing import Any

import jax

from vlm_jax.trees import leaf_paths


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return dict(zip(leaf_paths(tree), (tuple(x.shape) for x in jax.tree.leaves(tree)), strict=True))


def param_mismatches(saved: Any, expected: Any) -> list[str]:
    """Differences between saved and expected param trees (anything with .shape leaves)."""
    have, want = _shapes(saved), _shapes(expected)
    out = [
        f"{p}: missing from the checkpoint (model expects {want[p]})" for p in want if p not in have
    ]
    out += [f"{p}: in the checkpoint {have[p]} but not in the model" for p in have if p not in want]
    out += [
        f"{p}: checkpoint {have[p]} vs model {want[p]}"
        for p in want
        if p in have and have[p] != want[p]
    ]
    return out


def check_params_match(saved: Any, expected: Any, where: str) -> None:
    """Raise ValueError listing the mismatched parameters of the checkpoint at `where`."""
    problems = param_mismatches(saved, expected)
    if problems:
        raise ValueError(
            f"checkpoint {where} was saved by a different model config: {len(problems)} "
            f"mismatched parameters: "
            + "; ".join(problems[:10])
            + ("; ..." if len(problems) > 10 else "")
        )
