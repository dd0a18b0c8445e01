#!/usr/bin/env bash
# The one command of the GPU machine (Python 3.12, torch + CUDA, transformers; no pydantic): benchmarks/gpu.py with
# the pydantic that `make gpu-deps` unpacked here (carried as benchmarks/.gpu-deps), under a timeout that leaves
# device time for a rerun. Results: $OUT/gpu.json, $OUT/gpu.log, $OUT/nvidia-smi.txt. Arguments go to gpu.py.
#   run: bash benchmarks/gpu_device.sh           (carry benchmarks/.gpu-deps)
#   dry run on CPU: PYTHON=.venv/bin/python GPU_DEPS= OUT=/tmp/gpu bash benchmarks/gpu_device.sh --cpu --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the results directory}"
PYTHON=${PYTHON:-python3}
GPU_DEPS=${GPU_DEPS-benchmarks/.gpu-deps}  # empty: the interpreter has pydantic itself
TIMEOUT_S=${TIMEOUT_S:-300}
if [ -n "$GPU_DEPS" ] && [ ! -d "$GPU_DEPS/pydantic" ]; then
    echo "$GPU_DEPS/pydantic is missing: run 'make gpu-deps' and carry $GPU_DEPS" >&2
    exit 2
fi
mkdir -p "$OUT"
export PYTHONPATH="${GPU_DEPS:+$PWD/$GPU_DEPS:}$PWD/trainer${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
{ nvidia-smi || echo "no nvidia-smi"; } >"$OUT/nvidia-smi.txt" 2>&1
timeout --signal=INT --kill-after=20 "$TIMEOUT_S" "$PYTHON" benchmarks/gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu.log"
