"""Ahead-of-time compilation of a config's functions for real TPU topologies, on a CPU host.

`python -m vlm_jax.compile --config configs/NAME.py[:arg] --topology v5p-64 [--num_slices N]
[--functions ...] [--step_time_s T] [--out FILE.jsonl] [--config.key=value ...]` compiles, with
libtpu (the `[tpu]` extra), the train step, the contrastive embedding steps and, for VLM / LM
tasks, prefill and one decode step, exactly as the trainer and its evaluators build them, from
abstract inputs only; it reports per-chip HBM, the largest buffers, collectives, the attention
kernels, analytic FLOPs per chip and an MFU estimate. `python -m vlm_jax.compile.kernel_coverage
--topology v5e:2x2` compiles the Pallas flash kernel (forward and backward, every mask kind,
head dims 64/128/256) for one generation.
"""
