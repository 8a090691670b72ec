#!/usr/bin/env bash
# Train on every worker of a Cloud TPU pod slice (one process per TPU VM host).
#
# usage: scripts/launch_tpu_pod.sh TPU_NAME ZONE [--setup] -- --config configs/NAME.py \
#            --workdir gs://BUCKET/run [--config.key=value ...]
#
#   --setup   first copy this checkout to every worker and `pip install -e .[tpu]` there.
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
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --setup) SETUP=1 ;;
    *) echo "error: unknown option $1 (valid: --setup, then -- and the train flags)" >&2; exit 2 ;;
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

if [[ $SETUP == 1 ]]; then
  REPO=$(cd "$(dirname "$0")/.." && pwd)
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${FLAGS[@]}" --command="mkdir -p $REMOTE_DIR"
  # scp takes sources then the destination: the TPU name goes only into "NAME:DIR".
  run "${GCLOUD[@]}" scp --recurse "${FLAGS[@]}" "$REPO"/setup.py "$REPO"/vlm_jax \
    "$REPO"/configs "$TPU_NAME:$REMOTE_DIR/"
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${FLAGS[@]}" \
    --command="cd $REMOTE_DIR && pip install -q -e '.[tpu]'"
fi

TRAIN_ARGS=$(printf '%q ' "$@")
# pipefail: the remote exit status is the trainer's, not tee's (a crash must not look clean).
COMMAND="set -o pipefail; cd $REMOTE_DIR && VLM_JAX_DISTRIBUTED=auto python3 -m vlm_jax.train "
COMMAND+="$TRAIN_ARGS 2>&1 | tee -a train.log"
run "${GCLOUD[@]}" ssh "$TPU_NAME" "${FLAGS[@]}" --command="$COMMAND"
