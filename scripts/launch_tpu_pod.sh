#!/usr/bin/env bash
# Train on every worker of a Cloud TPU pod slice, or of every slice of a multi-slice job
# (one process per TPU VM host).
#
# usage: scripts/launch_tpu_pod.sh TPU_NAME ZONE [--setup] [--slices N] -- \
#            --config configs/NAME.py --workdir gs://BUCKET/run [--config.key=value ...]
#
#   --setup     first copy this checkout to every worker and `pip install -e .[tpu]` there.
#   --slices N  a multi-slice job of N slices, made by `gcloud compute tpus queued-resources
#               create ID --node-count=N --node-prefix=TPU_NAME ...`: its nodes are
#               TPU_NAME-0 .. TPU_NAME-(N-1); every command runs on each of them, the trainer on
#               all at once (the launcher waits for all and fails if any does). The TPU runtime
#               gives each VM its MEGASCALE_* settings (slice id, slice count, coordinator), from
#               which jax.distributed numbers the processes across slices.
# Environment: PROJECT (gcloud project, default: gcloud's), REMOTE_DIR (checkout on the
# workers, default ~/vlm_jax), DRY_RUN=1 (print the gcloud commands instead of running them).
#
# Every worker runs the same command; `VLM_JAX_DISTRIBUTED=auto` lets jax.distributed find the
# coordinator, process count and process id from the TPU metadata. The workdir must be shared
# by all hosts (a GCS bucket): Orbax writes each host's shards there, and only process 0 writes
# metrics. Each worker's log goes to REMOTE_DIR/train.log (and stdout).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
shift 2
SETUP=0
SLICES=1
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --setup) SETUP=1 ;;
    --slices)
      SLICES=${2:-}
      if ! [[ $SLICES =~ ^[1-9][0-9]*$ ]]; then
        echo "error: --slices '${SLICES}' must be a positive integer (the multi-slice job's node count)" >&2
        exit 2
      fi
      shift ;;
    *) echo "error: unknown option $1 (valid: --setup, --slices N, then -- and the train flags)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -eq 0 ]]; then
  echo "error: missing '--' before the train flags" >&2
  exit 2
fi
shift  # the "--"
REMOTE_DIR=${REMOTE_DIR:-'~/vlm_jax'}
GCLOUD=(gcloud compute tpus tpu-vm)
FLAGS=(--zone="$ZONE" --worker=all ${PROJECT:+--project="$PROJECT"})

run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

# The TPU VMs (nodes) to run on: the slice itself, or each slice of a multi-slice job.
NODES=("$TPU_NAME")
if [[ $SLICES -gt 1 ]]; then
  NODES=()
  for ((i = 0; i < SLICES; i++)); do NODES+=("$TPU_NAME-$i"); done
fi

if [[ $SETUP == 1 ]]; then
  REPO=$(cd "$(dirname "$0")/.." && pwd)
  for NODE in "${NODES[@]}"; do
    run "${GCLOUD[@]}" ssh "$NODE" "${FLAGS[@]}" --command="mkdir -p $REMOTE_DIR"
    # scp takes sources then the destination: the TPU name goes only into "NAME:DIR".
    run "${GCLOUD[@]}" scp --recurse "${FLAGS[@]}" "$REPO"/setup.py "$REPO"/vlm_jax \
      "$REPO"/configs "$NODE:$REMOTE_DIR/"
    run "${GCLOUD[@]}" ssh "$NODE" "${FLAGS[@]}" \
      --command="cd $REMOTE_DIR && pip install -q -e '.[tpu]'"
  done
fi

TRAIN_ARGS=$(printf '%q ' "$@")
# pipefail: the remote exit status is the trainer's, not tee's (a crash must not look clean).
COMMAND="set -o pipefail; cd $REMOTE_DIR && VLM_JAX_DISTRIBUTED=auto python3 -m vlm_jax.train "
COMMAND+="$TRAIN_ARGS 2>&1 | tee -a train.log"
if [[ ${#NODES[@]} == 1 || ${DRY_RUN:-0} == 1 ]]; then
  for NODE in "${NODES[@]}"; do run "${GCLOUD[@]}" ssh "$NODE" "${FLAGS[@]}" --command="$COMMAND"; done
  exit 0
fi
# Multi-slice: all slices' processes must start together (jax.distributed waits for every
# one of them); the job failed if any slice's trainer did.
PIDS=()
for NODE in "${NODES[@]}"; do
  "${GCLOUD[@]}" ssh "$NODE" "${FLAGS[@]}" --command="$COMMAND" &
  PIDS+=($!)
done
STATUS=0
for i in "${!PIDS[@]}"; do
  if ! wait "${PIDS[$i]}"; then
    echo "error: the trainer on ${NODES[$i]} failed" >&2
    STATUS=1
  fi
done
exit $STATUS
