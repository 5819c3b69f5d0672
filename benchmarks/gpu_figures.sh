#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md in one short run (about 5 minutes on one H100/H200):
#   1. benchmarks/gpu_check.sh: STEPS (300) training steps at the paper's patch and filters through
#      the CLI (patch 80x112x112, 16 filters, channels_last, 4 workers): the default method with bf16
#      and fp16, and SGRS-Net as published (--preset paper) with bf16: loss falls, steps/s, peak GPU
#      memory, projected time of the 15,000-step recipe;
#   2. benchmarks/step_benchmark.py at the paper setting: the phase breakdown of one step of the
#      default method (bf16, fp16 + scaler, no autocast: fp32 with cuDNN's default TF32, bf16 without
#      cuDNN autotuning), of SGRS-Net as published (--method sgrs) and of supervised steps;
#   3. with COMPILE=1, gpu_check.sh with --compile, shorter (COMPILE_STEPS, 200).
# Each part has its own time limit, so one that hangs does not take the others with it.
# Outputs go to $OUT (default: ./gpu_figures_out).
#
#   bash benchmarks/gpu_figures.sh
#   PYTHON=python3.11 STEPS=500 bash benchmarks/gpu_figures.sh
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export OUT=${OUT:-$PWD/gpu_figures_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true

# gpu_check NAME [VAR=value ...]: one gpu_check.sh run with those settings, its JSON kept as
# $OUT/gpu_check_NAME.json. Each call names AMP and COMPILE, so a caller's exported values
# (COMPILE=1 selects part 3) cannot change what a part measures.
gpu_check() {
  local name=$1
  shift
  env "$@" timeout 200 bash benchmarks/gpu_check.sh 2>&1 | tail -22
  mv "$OUT/gpu_check.json" "$OUT/gpu_check_$name.json" 2>/dev/null
}

echo "== 1. gpu_check.sh (STEPS=${STEPS:-300}): the default with bf16 and fp16, --preset paper with bf16"
gpu_check bf16 COMPILE=0 AMP=bf16 PRESET= STEPS="${STEPS:-300}"
gpu_check fp16 COMPILE=0 AMP=fp16 PRESET= STEPS="${STEPS:-300}"
gpu_check paper_bf16 COMPILE=0 AMP=bf16 PRESET=paper STEPS="${STEPS:-300}"

echo "== 2. step breakdown at the paper setting"
paper=(--patch 80 112 112 --filters 16 --device cuda --steps 20 --warmup 5 --json)
for args in "--amp bf16" "--amp fp16" "--amp off" "--amp bf16 --method sgrs" "--amp bf16 --method supervised" \
            "--amp bf16 --no-cudnn-benchmark"; do
  # shellcheck disable=SC2086
  timeout 90 "$PY" benchmarks/step_benchmark.py "${paper[@]}" $args | tail -1 | tee -a "$OUT/steps.jsonl" \
    || echo "{\"args\": \"$args\", \"failed\": true}" | tee -a "$OUT/steps.jsonl"
done

[[ ${COMPILE:-0} == 1 ]] || exit 0
echo "== 3. gpu_check.sh with --compile (STEPS=${COMPILE_STEPS:-200})"
gpu_check compile COMPILE=1 AMP=bf16 PRESET= STEPS="${COMPILE_STEPS:-200}"
