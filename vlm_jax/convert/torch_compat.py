"""Make torchvision importable beside a CPU-only torch, for open_clip and HF's torch models.

PyPI's torchvision wheels for Linux link CUDA torch; beside a CPU-only torch wheel their `_C`
library fails to load, and torchvision then registers fake kernels for `torchvision::nms` and
`::qnms` without checking the ops exist (pytorch/vision#9085), so `import torchvision` (and
with it `import open_clip` and `transformers.CLIPModel`) raises "operator torchvision::nms does
not exist". No PyPI torchvision is built for CPU torch. The models used here call no torchvision
op, so declaring the two schemas (what `_C` would have declared) lets the import finish; calling
nms would still fail loudly. With a working torchvision this does nothing.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

# The ops torchvision registers fake kernels for without checking that `_C` loaded.
_UNGUARDED_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries = []  # keeps the declared ops alive for the process


def ensure_torchvision() -> None:
    """Import torchvision, declaring its unguarded ops first if its `_C` cannot load."""
    try:
        importlib.import_module("torchvision")
        return
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    import torch

    for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
        del sys.modules[name]
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _UNGUARDED_OPS:
        library.define(schema)
    _libraries.append(library)
    importlib.import_module("torchvision")


def import_open_clip() -> ModuleType:
    """`import open_clip` (after `ensure_torchvision`)."""
    ensure_torchvision()
    return importlib.import_module("open_clip")
