#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md in one short run (about 5 minutes on one H100/H200):
#   1. benchmarks/gpu_check.sh: STEPS (300) training steps at the paper setting through the CLI
#      (patch 80x112x112, 16 filters, 2+2, channels_last, 4 workers), with bf16 and with fp16:
#      loss falls, steps/s, peak GPU memory, projected time of the 15,000-step recipe;
#   2. benchmarks/step_benchmark.py at the paper setting: the phase breakdown of one SGRS step
#      with bf16, fp16 (+ scaler) and no autocast (fp32, cuDNN's default TF32), our default 4+2
#      batch, supervised steps for the ratio, and bf16 without cuDNN autotuning;
#   3. with COMPILE=1, the same training as 1 with --compile, shorter (COMPILE_STEPS, 200).
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

echo "== 1. gpu_check.sh (STEPS=${STEPS:-300}), bf16 then fp16"
STEPS=${STEPS:-300} timeout 200 bash benchmarks/gpu_check.sh 2>&1 | tail -22
cp "$OUT/gpu_check.json" "$OUT/gpu_check_bf16.json" 2>/dev/null
AMP=fp16 STEPS=${STEPS:-300} timeout 200 bash benchmarks/gpu_check.sh 2>&1 | tail -22
mv "$OUT/gpu_check.json" "$OUT/gpu_check_fp16.json" 2>/dev/null

echo "== 2. step breakdown at the paper setting"
paper=(--patch 80 112 112 --filters 16 --device cuda --steps 20 --warmup 5 --json)
for args in "--amp bf16" "--amp fp16" "--amp off" "--amp bf16 --labeled 4" "--amp fp16 --labeled 4" \
            "--amp bf16 --method supervised" "--amp bf16 --method supervised --labeled 4" \
            "--amp bf16 --no-cudnn-benchmark"; do
  # shellcheck disable=SC2086
  timeout 90 "$PY" benchmarks/step_benchmark.py "${paper[@]}" $args | tail -1 | tee -a "$OUT/steps.jsonl" \
    || echo "{\"args\": \"$args\", \"failed\": true}" | tee -a "$OUT/steps.jsonl"
done

[[ ${COMPILE:-0} == 1 ]] || exit 0
echo "== 3. training with --compile (${COMPILE_STEPS:-200} steps)"
WORK=$(mktemp -d)
"$PY" -m napari_sgrs.cli demo-data "$WORK/data" --cases 8 --labeled 4 --test 0 --shape 96 128 128 \
  --overwrite >/dev/null
timeout 200 "$PY" -m napari_sgrs.cli train --images "$WORK/data/imagesTr" --labels "$WORK/data/labelsTr" \
  --out "$WORK/run" --iterations "${COMPILE_STEPS:-200}" --batch-size 4 --labeled-batch-size 2 \
  --patch-size 80 112 112 --base-filters 16 --device cuda --amp bf16 --workers 4 --compile \
  --val-fraction 0 --checkpoint-every 100000 --log-every 1 --quiet
echo "compile rc=$?"
cp "$WORK/run/events.jsonl" "$OUT/compile_events.jsonl" 2>/dev/null || true
"$PY" - "$OUT/compile_events.jsonl" <<'EOF' || true
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1])]
prog = [e for e in ev if e["kind"] == "progress"]
k = max(1, len(prog) // 4)   # skip compilation and warm-up
rate = (prog[-1]["step"] - prog[k]["step"]) / (prog[-1]["time"] - prog[k]["time"])
t0 = next(e["time"] for e in ev if e["kind"] == "started")
print(json.dumps({"compile": True, "steps": prog[-1]["step"], "first_step_s": round(prog[0]["time"] - t0, 1),
                  "steps_per_s_after_warmup": round(rate, 2), "peak_memory_mb": prog[-1]["memory_mb"],
                  "finished": ev[-1]["kind"] == "finished"}))
EOF
