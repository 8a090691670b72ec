#!/usr/bin/env bash
# One GPU session (H100/H200, ~9 minutes of wall time): compiled kernel tests, the flash tile
# sweep, the attention benchmark writing the `auto` table, and training-step MFU.
#
#   bash scripts/gpu_session.sh                  # everything, outputs under $OUT
#   STEPS="bench train" bash scripts/gpu_session.sh   # a rerun of some steps only
#
# Run from the repository root on the device machine (the repo is on PYTHONPATH; nothing is
# installed). The device image has jax, flax, optax, orbax, chex, but not ml-collections
# (tests, training), grain, array-record, portpicker (training). Before the run, on the host:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
# and name `.whl` in the run's carry. Without them the kernel steps (sweep, bench) still run.
#
# Each step has its own timeout (seconds, overridable: T_TESTS, T_SWEEP, T_BENCH, T_SIGLIP,
# T_VLM; the training ones per run): the defaults sum to 530 s, ~9 minutes with start-up.
# A step that fails or times out does not stop the others.
# Outputs (8 files, the device tool's limit): env.txt, tests.log, sweep.log, bench.log,
# train.log, blocks_<slug>.json (tuned tiles), auto_<slug>.json (impl times), summary.txt.
# The sweep and the benchmark write their tables into vlm_jax/kernels/tables/ of this copy
# too, so the benchmark times the tuned kernel and the training steps' `auto` reads the new
# table; commit the two JSON files from $OUT into vlm_jax/kernels/tables/{blocks,auto}/.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
STEPS=${STEPS:-"env tests sweep bench train"}
T_TESTS=${T_TESTS:-90} T_SWEEP=${T_SWEEP:-110} T_BENCH=${T_BENCH:-150}
T_SIGLIP=${T_SIGLIP:-60} T_VLM=${T_VLM:-30}
SWEEP_BUDGET_S=${SWEEP_BUDGET_S:-$((T_SWEEP - 30))}  # leave time for the last compiles
SIGLIP_BATCH=${SIGLIP_BATCH:-1024}                    # ViT-B/16 at 224 px, remat, bf16
PYTHON=${PYTHON:-python3}
# JAX_PLATFORMS=cpu checks this script off the GPU.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}

# run NAME TIMEOUT LOG CMD...: one step, its rc and seconds appended to summary.txt.
run() {
  local name=$1 limit=$2 log=$3
  shift 3
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - start)) limit=$limit" >>"$OUT/summary.txt"
}

install_wheels() {
  [[ -d .whl ]] || return 0
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
}

step_env() {
  {
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PYTHON" -c 'import jax; print(jax.__version__, jax.devices(), jax.devices()[0].device_kind)'
    git log --oneline -1 2>/dev/null || true
  } >"$OUT/env.txt" 2>&1
}

step_tests() {  # the compiled (not interpreted) kernels against float64, every mask kind
  run tests "$T_TESTS" tests.log "$PYTHON" -m pytest -x -q -p no:cacheprovider \
    tests/test_flash_attention.py
}

step_sweep() {
  run sweep "$T_SWEEP" sweep.log "$PYTHON" scripts/tune_flash_gpu.py --verify improving \
    --budget-s "$SWEEP_BUDGET_S" --iters 10
}

step_bench() {  # every case: ours (tuned), cuDNN, XLA, jax's Pallas op
  run bench "$T_BENCH" bench.log "$PYTHON" scripts/bench_attention.py --iters 5 \
    --impls ours,cudnn,xla,jax_pallas --write-table vlm_jax/kernels/tables/auto/
}

train_step() {  # NAME TIMEOUT ARGS...: one bench_train_step row, tagged, into train.log
  local name=$1 limit=$2
  shift 2
  echo "# $name" >>"$OUT/train.log"
  run "train_$name" "$limit" train.log "$PYTHON" scripts/bench_train_step.py "$@"
}

step_train() {
  # siglip_b16's towers (ViT-B/16 at 224 px and its text tower, bf16, remat, scan) on the
  # shapes data: siglip_b16.py itself reads TFDS coco_captions and a SentencePiece model,
  # neither of which is on the device.
  local b16=(--config configs/siglip_shapes.py --steps 5 --warmup 1
    --config.train.batch_size="$SIGLIP_BATCH" --config.model.dtype=bfloat16
    --config.model.remat=True --config.model.scan=True --config.model.embed_dim=768
    --config.data.image_size=224 --config.model.image.image_size=224
    --config.model.image.patch_size=16 --config.model.image.width=768
    --config.model.image.depth=12 --config.model.image.num_heads=12
    --config.model.image.mlp_dim=3072 --config.model.image.pool=map
    --config.model.image.stem=patch --config.model.text.width=768
    --config.model.text.depth=12 --config.model.text.num_heads=12
    --config.model.text.mlp_dim=3072)
  local vlm=(--config configs/vlm_shapes.py --steps 5 --warmup 1
    --config.train.batch_size=256 --config.model.dtype=bfloat16)
  for impl in pallas auto; do
    train_step "siglip_b16_towers_$impl" "$T_SIGLIP" "${b16[@]}" --config.model.attention_impl=$impl
    train_step "vlm_shapes_$impl" "$T_VLM" "${vlm[@]}" --config.model.attention_impl=$impl
  done
  "$PYTHON" - "$OUT/train.log" >>"$OUT/summary.txt" 2>&1 <<'EOF'
"""MFU of each train-step row: analytic model FLOPs per device / step time / bf16 peak."""
import json, sys

import jax

from vlm_jax.train.metrics import peak_flops_per_device

kind = jax.devices()[0].device_kind
peak = peak_flops_per_device(kind)
name = "?"
for line in open(sys.argv[1]):
    if line.startswith("# "):
        name = line[2:].strip()
    elif line.startswith("{"):
        row = json.loads(line)
        counted = "model" if row.get("model_gflops") else "xla"  # xla: no analytic count
        flops = row[f"{counted}_gflops"]
        mfu = flops * 1e9 / (row["step_ms"] / 1e3) / peak if peak else float("nan")
        print(f"mfu {name}: {mfu:.3f} ({flops} {counted} GFLOP/step/device, "
              f"{row['step_ms']} ms, batch {row['batch_size']}, peak {peak} on {kind})")
EOF
}

copy_tables() {
  local slug
  slug=$("$PYTHON" -c 'import jax; from vlm_jax.kernels import autotune
print(autotune.device_slug(jax.devices()[0].device_kind))') || return 0
  for kind in blocks auto; do
    local table=vlm_jax/kernels/tables/$kind/$slug.json
    [[ -f $table ]] && cp "$table" "$OUT/${kind}_$slug.json"
  done
}

date -u >>"$OUT/summary.txt"
install_wheels || echo "wheel install failed" >>"$OUT/summary.txt"
for step in $STEPS; do
  case $step in
    env | tests | sweep | bench | train) "step_$step" ;;
    *) echo "unknown step $step; steps: env tests sweep bench train" >>"$OUT/summary.txt" ;;
  esac
done
copy_tables
date -u >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
