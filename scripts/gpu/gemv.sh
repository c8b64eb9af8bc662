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
source scripts/gpu/_lib.sh
gpu_setup /tmp/out

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "dry run: tests skipped (run pytest tests/kernels/test_lowbit_gemv.py on the CPU)" | tee "$OUT/tests.log"
else
  part tests "${TESTS_S:-150}" tests.log python3 -m pytest -q -p no:cacheprovider tests/kernels/test_lowbit_gemv.py \
    -k "magic or uint4_g128 or int8_row or int4_g32 or bf16 or swiglu or tuned or default or bad_input"
  tail -15 "$OUT/tests.log"
fi
part benchmark "${BENCH_S:-400}" bench.log python3 benchmarks/bench_inference.py --out "$OUT" --parts gemm \
  --ms "${MS:-1,16}" --shapes "${SHAPES:-1b qkv,1b gate_up,8b up,8b down}" --variants "${VARIANTS:-W4A16,W8A16}" \
  --max-configs "${MAX_CONFIGS:-4}" --max-gemv "${MAX_GEMV:-12}" "${DRY[@]}"
show_tables "$OUT/bench.log"
finish gemv.sh
