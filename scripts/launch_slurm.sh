#!/usr/bin/env bash
# Submit a multi-node GPU training job to SLURM: one process per GPU (NODES x GPUS_PER_NODE).
# jax.distributed's SLURM detection gives each process the GPU numbered by its SLURM_LOCALID,
# so one task per node would leave all but GPU 0 of every node idle.
#
# usage: scripts/launch_slurm.sh NODES GPUS_PER_NODE -- --config configs/NAME.py \
#            --workdir /shared/runs/NAME [--config.key=value ...]
#
# Partition, account, time limit etc. come from sbatch's own environment variables
# (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...). DRY_RUN=1 prints the sbatch command.
# The job runs scripts/slurm_train.sbatch; the workdir must be on a filesystem all nodes share.
set -euo pipefail

if [[ $# -lt 3 || $3 != "--" ]]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
NODES=$1
GPUS_PER_NODE=$2
shift 3
for value in "$NODES" "$GPUS_PER_NODE"; do
  if ! [[ $value =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NODES and GPUS_PER_NODE must be positive integers, got '$value'" >&2
    exit 2
  fi
done
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
COMMAND=(sbatch --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE"
  --chdir="$(dirname "$SCRIPT_DIR")" "$SCRIPT_DIR/slurm_train.sbatch" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${COMMAND[@]}"
  echo
else
  "${COMMAND[@]}"
fi
