#!/usr/bin/env bash
# Quantized inference on one GPU: the kernels' GPU tests, then the benchmark (GEMM, KV, decode tables).
#
#   bash scripts/gpu/inference.sh            # from the repo root; ~5-6 minutes on one H100 (compiles included)
#   PARTS=gemm,kv bash scripts/gpu/inference.sh   # a subset of the benchmark, in that order
#   PARTS=decode,kv TUNED=benchmarks/results/h200_session5/inference_tuned_call4.json bash scripts/gpu/inference.sh
#                                                  # decode first with configurations tuned before
#   DRY_RUN=1 bash scripts/gpu/inference.sh        # the script's logic on a CPU (interpreter, tiny shapes)
#
# Writes to $OUT: tests.log, bench.log (the final tables), bench_inference.json (every candidate's
# time or error), tuned.json (the fastest verified kernel configuration per shape: pass it to
# kernels.lowbit_ops.load_tuned). Needs torch + triton only (no hydra/deepspeed/TE).
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

# The tests run first; a failure is reported loudly at the end (exit 1) but does not stop the
# benchmark, which verifies every configuration it times on its own.
start=$(date +%s)
tests_rc=0
if python3 -c "import pytest" 2>/dev/null; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider \
    tests/gpu/test_inference_kernels.py tests/kernels/test_kv_kernels.py tests/kernels/test_lowbit_gemm.py \
    > "$OUT/tests.log" 2>&1 || tests_rc=$?
else
  echo "pytest is not installed on this machine: GPU tests NOT run" | tee "$OUT/tests.log"
  tests_rc=127
fi
tail -25 "$OUT/tests.log"
echo "tests: rc=$tests_rc, $(( $(date +%s) - start )) s"

start=$(date +%s)
bench_rc=0
timeout 360 python3 benchmarks/bench_inference.py --out "$OUT" --parts "${PARTS:-gemm,kv,decode}" \
  --max-configs "${MAX_CONFIGS:-5}" ${TUNED:+--tuned "$TUNED"} "${DRY[@]}" > "$OUT/bench.log" 2>&1 || bench_rc=$?
if [ "$bench_rc" -eq 0 ]; then sed -n '/^## /,$p' "$OUT/bench.log"; else tail -40 "$OUT/bench.log"; fi
echo "benchmark: rc=$bench_rc, $(( $(date +%s) - start )) s"
if [ "$tests_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ]; then
  echo "FAILED: tests rc=$tests_rc, benchmark rc=$bench_rc (logs in $OUT)" >&2
  exit 1
fi
