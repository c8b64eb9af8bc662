#!/usr/bin/env bash
# Grouped FP8 MoE GEMM kernels (kernels/grouped_gemm*.py) on the GPU box: tests, benchmark, sweep.
#
#   bash scripts/gpu/moe_kernels.sh          # GPU tests + benchmark at both layers (~4 min)
#   bash scripts/gpu/moe_kernels.sh sweep [small|large]   # tile-config sweep per GEMM (-> CONFIGS)
#   bash scripts/gpu/moe_kernels.sh compile  # registers / spills / shared memory of the CONFIGS table
#
# Logs land in $OUT (at most 8 files come back). Test failures do not stop the benchmark, but the
# script exits non-zero at the end if any test failed.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/moe_kernels_out}
mkdir -p "$OUT"
mode=${1:-main}

nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,memory.used --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee -a "$OUT/gpu.txt"

case $mode in
  main)
    python3 -c "import pytest" || { echo "pytest is not installed on this machine"; exit 1; }
    tests_failed=0
    timeout 240 python3 -m pytest -q -rs -s -p no:cacheprovider tests/gpu/test_grouped_fp8_kernels.py \
      tests/kernels/test_grouped_fp8_gemm.py > "$OUT/moe_kernels_tests.log" 2>&1 || tests_failed=1
    grep -E "relative error|passed|failed|FAILED|Error" "$OUT/moe_kernels_tests.log" | tail -45
    timeout 300 python3 benchmarks/bench_grouped_gemm.py --out "$OUT/bench_grouped_gemm.json" \
      > "$OUT/bench_grouped_gemm.txt" 2>&1 || { tail -30 "$OUT/bench_grouped_gemm.txt"; exit 1; }
    grep -v "^  " "$OUT/bench_grouped_gemm.txt" | tail -32
    if [ "$tests_failed" = 1 ]; then echo "GPU TESTS FAILED: see $OUT/moe_kernels_tests.log"; exit 1; fi ;;
  sweep)  # one process per layer, each well inside the 10-minute call (compiles are cached between)
    for layer in ${2:-small large}; do
      timeout 290 python3 benchmarks/bench_grouped_gemm.py --sweep --repeats 5 --layers "$layer" \
        --out "$OUT/sweep_$layer.json" > "$OUT/sweep_$layer.txt" 2>&1 || { tail -30 "$OUT/sweep_$layer.txt"; exit 1; }
      grep -A 40 "best config" "$OUT/sweep_$layer.txt"
    done ;;
  compile)
    python3 scripts/compile_grouped_gemm.py --all > "$OUT/compile_grouped_gemm.txt" 2>&1
    cat "$OUT/compile_grouped_gemm.txt" ;;
  *)
    echo "unknown mode $mode (main | sweep [layers] | compile)"; exit 2 ;;
esac
