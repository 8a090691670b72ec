"""Ahead-of-time compilation of a config's functions for real TPU topologies, on a CPU host.

`python -m vlm_jax.compile --config configs/NAME.py[:arg] --topology v5p-64 [--num_slices N]
[--out FILE.jsonl] [--config.key=value ...]` compiles, with libtpu (the `[tpu]` extra), the
train step (and the contrastive embedding steps) exactly as the trainer builds them, from
abstract inputs only, and reports per-chip HBM, collectives and the attention kernels.
"""
