#!/usr/bin/env bash
# Install PyTorch into the given Python environment without pulling a multi-GB CUDA build on
# machines that have no GPU. Order: already installed -> keep; an NVIDIA GPU -> the default
# (CUDA) wheel; a CPU wheel on this machine's disk -> that one; else the CPU wheel index.
set -euo pipefail
PY=${1:-python3}
if "$PY" -c "import torch" 2>/dev/null; then
  echo "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "NVIDIA GPU found: installing the CUDA build of torch"
  "$PY" -m pip install "torch>=2.1"
  exit 0
fi
local_wheel=$(ls /opt/wheels/torch-*+cpu-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$local_wheel" ]; then
  version=$(basename "$local_wheel" | cut -d- -f2 | cut -d+ -f1)
  echo "no GPU: installing the CPU build torch==$version found on disk"
  "$PY" -m pip install "torch==$version"
  exit 0
fi
echo "no GPU: installing the CPU build of torch"
"$PY" -m pip install torch --index-url https://download.pytorch.org/whl/cpu
