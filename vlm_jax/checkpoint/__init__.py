"""Checkpoints of training runs, importable without the trainer (convert/ and generate read
them too).

checkpointer.py: Orbax checkpoints (train state, Grain iterator state, run metadata), array
fingerprints, the fallback to the newest intact step, `load_params` for other runs' params.
integrity.py: checkpoint/model compatibility (the mismatched parameters, named).
"""

from vlm_jax.checkpoint.checkpointer import (
    CORRUPT_SUFFIX,
    TMP_SUFFIX,
    Checkpointer,
    DamagedCheckpoint,
    ModelMismatch,
    check_fingerprint,
    checkpoints_dir,
    fingerprint,
    load_params,
)
from vlm_jax.checkpoint.integrity import check_params_match, param_mismatches

__all__ = [
    "CORRUPT_SUFFIX",
    "TMP_SUFFIX",
    "Checkpointer",
    "DamagedCheckpoint",
    "ModelMismatch",
    "check_fingerprint",
    "check_params_match",
    "checkpoints_dir",
    "fingerprint",
    "load_params",
    "param_mismatches",
]
