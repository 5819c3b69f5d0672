#!/usr/bin/env bash
# One-GPU check of the paper setting, in under 5 minutes on an H100/H200:
#   (a) installs the package (pip install -e .; falls back to PYTHONPATH when offline and the
#       dependencies are already there), (b) writes demo volumes of 96x128x128 (D, H, W),
#   (c) trains at the paper setting (patch 80 112 112, 16 filters, bf16, channels_last, 4 DataLoader
#       workers) for STEPS steps: the default method at its default batch, or with PRESET=paper
#       SGRS-Net as published (--preset paper: --method sgrs, 2+2), (d) checks that the supervised
#       loss falls (mean of the first 20 progress events vs the last 20), (e) prints steps/s,
#       peak GPU memory and the projected time of the 15,000-step recipe.
# Figures go to stdout and, when $OUT is set, to $OUT/gpu_check.json.
#
#   bash benchmarks/gpu_check.sh                 # on a GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke     # tiny, on CPU: checks the script end to end
#   STEPS=500 PYTHON=python3.11 bash benchmarks/gpu_check.sh
#   AMP=fp16 WORKERS=8 bash benchmarks/gpu_check.sh   # another precision / number of loader processes
#   COMPILE=1 bash benchmarks/gpu_check.sh             # with --compile (the rate skips the first 10 %)
#   PRESET=paper bash benchmarks/gpu_check.sh          # SGRS-Net as published instead of the default
set -euo pipefail

cd "$(dirname "$0")/.."
SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --cpu-smoke)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d -t sgrs_gpu_check.XXXXXX)}
T_START=$(date +%s)

# (a) the package
if ! "$PY" -c "import napari_sgrs.cli" 2>/dev/null; then
  "$PY" -m pip install -q -e . 2>/dev/null || {
    echo "pip install -e . failed (offline?); using PYTHONPATH=$PWD" >&2
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  }
fi
"$PY" - <<'EOF'
import torch, napari_sgrs.core.train  # noqa: F401  (fails here, not after the data, if something is missing)
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}",
      f"({torch.cuda.get_device_name(0)}, bf16: {torch.cuda.is_bf16_supported()})" if torch.cuda.is_available() else "")
EOF

if [[ $SMOKE == 1 ]]; then
  STEPS=${STEPS:-40}; SHAPE="32 32 32"; CASES=4
  TRAIN=(--patch-size 16 16 16 --base-filters 4 --device cpu --amp off --workers 2)
  WINDOW=${WINDOW:-10}
else
  STEPS=${STEPS:-300}; SHAPE="96 128 128"; CASES=8
  TRAIN=(--patch-size 80 112 112 --base-filters 16 --device cuda --amp "${AMP:-bf16}" --workers "${WORKERS:-4}")
  WINDOW=${WINDOW:-20}
  [[ ${COMPILE:-0} == 1 ]] && TRAIN+=(--compile)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

# (b) demo data
"$PY" -m napari_sgrs.cli demo-data "$WORK/data" --cases "$CASES" --labeled $((CASES / 2)) --test 0 \
  --shape $SHAPE --overwrite >/dev/null

# (c) training at the paper setting (channels_last is the default); no validation split and one
# final checkpoint, so the timing is the training step's. The options after the preset win over it.
RECIPE=()
case "${PRESET:-}" in
  "") ;;
  paper) RECIPE=(--preset paper) ;;
  *) echo "PRESET must be empty (the default method) or paper, got '$PRESET'" >&2; exit 2 ;;
esac
T_TRAIN=$(date +%s)
"$PY" -m napari_sgrs.cli train --images "$WORK/data/imagesTr" --labels "$WORK/data/labelsTr" \
  --out "$WORK/run" "${RECIPE[@]}" --iterations "$STEPS" "${TRAIN[@]}" \
  --val-fraction 0 --checkpoint-every 100000 --log-every 1 --quiet

# (d) + (e) from the run's events
STEPS="$STEPS" WINDOW="$WINDOW" T_START="$T_START" T_TRAIN="$T_TRAIN" SMOKE="$SMOKE" PRESET="${PRESET:-}" \
"$PY" - "$WORK/run/events.jsonl" <<'EOF'
import json, os, sys, time
from napari_sgrs.core.events import EventKind, read_events
events = read_events(sys.argv[1])
prog = [e for e in events if e.kind is EventKind.PROGRESS]
started = next(e for e in events if e.kind is EventKind.STARTED)
assert events[-1].kind is EventKind.FINISHED, f"run did not finish: last event {events[-1]}"
n = min(int(os.environ["WINDOW"]), len(prog) // 3)
first = sum(e.data["loss_sup"] for e in prog[:n]) / n
last = sum(e.data["loss_sup"] for e in prog[-n:]) / n
# steps/s after the first 10% (cuDNN autotuning, worker start-up, allocator warm-up)
k = max(1, len(prog) // 10)
rate = (prog[-1].step - prog[k].step) / max(prog[-1].time - prog[k].time, 1e-9)
result = {
    "device": started.data["device"], "method": started.data["method"],
    "recipe": os.environ["PRESET"] or "default", "steps": prog[-1].step, "patch_size": started.data["patch_size"],
    "loss_sup_first": round(first, 4), "loss_sup_last": round(last, 4), "loss_falls": last < first,
    "loss_total_first": round(sum(e.data["loss"] for e in prog[:n]) / n, 4),
    "loss_total_last": round(sum(e.data["loss"] for e in prog[-n:]) / n, 4),
    "steps_per_s": round(rate, 2),
    "first_step_s": round(prog[0].time - started.time, 1),  # start-up (and compilation with --compile)
    # CUDA: torch.cuda.max_memory_allocated; CPU smoke: the process's peak RSS
    "peak_memory_mb": round(prog[-1].data["memory_mb"], 1),
    "projected_15000_steps_min": round(15000 / rate / 60, 1),
    "train_wall_s": round(time.time() - int(os.environ["T_TRAIN"]), 1),
    "script_wall_s": round(time.time() - int(os.environ["T_START"]), 1),
    "cpu_smoke": os.environ["SMOKE"] == "1",
}
print(json.dumps(result, indent=2))
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as fh:
        json.dump(result, fh, indent=2)
if not result["loss_falls"]:
    sys.exit(f"FAIL: the supervised loss did not fall ({first:.4f} -> {last:.4f})")
print(f"OK: loss {first:.3f} -> {last:.3f}; {rate:.2f} steps/s; peak {'RSS' if result['cpu_smoke'] else 'GPU'} "
      f"memory {result['peak_memory_mb']:.0f} MiB; 15,000 steps in ~{result['projected_15000_steps_min']} min")
EOF
