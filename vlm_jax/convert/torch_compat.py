"""Import open_clip where PyPI's torchvision cannot load its compiled ops.

PyPI's torchvision wheels for Linux link CUDA torch; beside a CPU-only torch wheel their `_C`
library fails to load, and torchvision then registers a fake kernel for `torchvision::nms`
without checking the op exists (pytorch/vision#9085), so `import torchvision` (and with it
`import open_clip`) raises "operator torchvision::nms does not exist". No PyPI torchvision is
built for CPU torch. open_clip's models use no torchvision op, so declaring the missing ops'
schemas (what `_C` would have declared) lets the import finish; calling nms would still fail.
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
_libraries = []  # keeps the declared op alive for the process


def import_open_clip() -> ModuleType:
    """`import open_clip`, declaring torchvision's nms ops first if its `_C` did not load."""
    try:
        return importlib.import_module("open_clip")
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    import torch

    for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "open_clip")]:
        del sys.modules[name]
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _UNGUARDED_OPS:
        library.define(schema)
    _libraries.append(library)
    return importlib.import_module("open_clip")
