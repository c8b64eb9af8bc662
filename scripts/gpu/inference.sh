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
source scripts/gpu/_lib.sh
gpu_setup /tmp/out

# The tests run first; a failure is reported loudly at the end (exit 1) but does not stop the
# benchmark, which verifies every configuration it times on its own.
part tests 300 tests.log python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_lowbit_triton.py tests/gpu/test_inference_kernels.py tests/kernels/test_kv_kernels.py tests/kernels/test_lowbit_gemm.py
tail -25 "$OUT/tests.log"
part benchmark 360 bench.log python3 benchmarks/bench_inference.py --out "$OUT" --parts "${PARTS:-gemm,kv,decode}" \
  --max-configs "${MAX_CONFIGS:-5}" ${TUNED:+--tuned "$TUNED"} "${DRY[@]}"
show_tables "$OUT/bench.log"
finish inference.sh
