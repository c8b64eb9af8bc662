#!/usr/bin/env bash
# GPTQ timing on the 1B model's shapes (issue #15 goal: the whole 1B model in <= 5 minutes on one H100).
#
#   bash scripts/gpu/ptq.sh            # from the repo root on the GPU box; carry .whl if tqdm is missing
#
# Times 3 of the 1B model's 16 blocks (identical shapes) with 128 x 2048 calibration tokens from the
# default corpus and extrapolates to 16 blocks (the printed table says so); finishes in ~2-3 minutes.
# Writes $OUT/ptq_gptq_timing.json and the full log.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if ! python3 -c "import tqdm, numpy" 2>/dev/null; then
  [ -f .whl/install.sh ] || { echo "tqdm is missing: carry .whl (bash .whl/install.sh) to run this"; exit 1; }
  bash .whl/install.sh 2>&1 | tail -3
fi
timeout 480 python3 benchmarks/ptq_gptq_timing.py --size 1b --blocks 3 --samples 128 --seq-len 2048 \
  --out "$OUT/ptq_gptq_timing.json" 2>&1 | tee "$OUT/ptq_gptq_timing.log"
