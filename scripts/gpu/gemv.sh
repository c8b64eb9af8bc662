#!/usr/bin/env bash
# Issue 16: the decode GEMV (kernels/lowbit_gemv.py) vs the GEMM kernel vs BF16 cuBLAS at M = 1 and 16.
#
#   bash scripts/gpu/gemv.sh                # from the repo root; one H200, ~3-5 minutes (compiles included)
#   SHAPES="8b up,8b down" MS=1 bash scripts/gpu/gemv.sh      # a subset
#   DRY_RUN=1 bash scripts/gpu/gemv.sh      # the script's logic on a CPU (interpreter, tiny shape)
#
# 1. tests/kernels/test_lowbit_gemv.py compiled on the GPU (a subset; every format / split / tile
#    kind at M in {1, 3, 16} vs an FP64 reference), 2. bench_inference.py's gemm part restricted to
#    the W4A16 / W8A16 columns: per shape and M the best GEMM-kernel configuration ("... gemm"), the
#    best decode-GEMV configuration ("... gemv") and the best overall, as speed-ups over BF16 timed
#    in the same run. Writes to $OUT: gpu.txt, tests.log, bench.log, bench_inference.json (every
#    candidate's time or error), tuned.json (the winners; kernels.lowbit_ops.load_tuned).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1

DRY=()
if [ "${DRY_RUN:-0}" = 1 ]; then
  export TRITON_INTERPRET=1; DRY=(--dry-run); echo "dry run on the CPU" | tee "$OUT/gpu.txt"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

start=$(date +%s)
tests_rc=0
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "dry run: tests skipped (run pytest tests/kernels/test_lowbit_gemv.py on the CPU)" | tee "$OUT/tests.log"
elif python3 -c "import pytest" 2>/dev/null; then
  timeout "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider tests/kernels/test_lowbit_gemv.py \
    -k "uint4_g128 or int8_row or int4_g32 or bf16 or swiglu or tuned or default or bad_input" > "$OUT/tests.log" 2>&1 || tests_rc=$?
else
  echo "pytest is not installed on this machine: GPU tests NOT run" | tee "$OUT/tests.log"
  tests_rc=127
fi
tail -15 "$OUT/tests.log"
echo "tests: rc=$tests_rc, $(( $(date +%s) - start )) s"

start=$(date +%s)
bench_rc=0
timeout "${BENCH_S:-400}" python3 benchmarks/bench_inference.py --out "$OUT" --parts gemm --ms "${MS:-1,16}" \
  --shapes "${SHAPES:-1b qkv,1b gate_up,8b up,8b down}" --variants "${VARIANTS:-W4A16,W8A16}" \
  --max-configs "${MAX_CONFIGS:-4}" --max-gemv "${MAX_GEMV:-12}" "${DRY[@]}" > "$OUT/bench.log" 2>&1 || bench_rc=$?
if [ "$bench_rc" -eq 0 ]; then sed -n '/^## /,$p' "$OUT/bench.log"; else tail -40 "$OUT/bench.log"; fi
echo "benchmark: rc=$bench_rc, $(( $(date +%s) - start )) s"
if [ "$tests_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ]; then
  echo "FAILED: tests rc=$tests_rc, benchmark rc=$bench_rc (logs in $OUT)" >&2
  exit 1
fi
