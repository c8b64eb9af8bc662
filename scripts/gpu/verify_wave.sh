#!/usr/bin/env bash
# One device call that verifies a wave of MoE and inference changes on ONE H100/H200 (~9.5 min):
#   1. MoE GPU tests: padded token groups == ragged, compiled vs eager vs float64, no host sync,
#      grouped kernels vs emulation, the permute kernels                               (<= 170 s)
#   2. benchmarks/bench_moe.py at the large layer, every FP8 recipe, per-GEMM TFLOP/s (<= 150 s)
#   3. KV-cache and low-bit GEMM GPU tests (KIVI tiles, int4_hadamard, W4 interleaved)    (<= 90 s)
#   4. benchmarks/bench_inference.py: GEMM, KV decode attention, end-to-end decode      (<= 170 s)
# Each part has its own timeout so a slow part cannot take the others' time; a failure is reported
# at the end (exit 1). Everything lands in $OUT (moe_tests.log, bench_moe.txt/.json, kv_tests.log,
# inference/ bench logs, JSON and tuned.json).
#
#   bash scripts/gpu/verify_wave.sh            # from the repo root; needs torch + triton (+ pytest)
#   PARTS="moe_tests moe_bench" bash scripts/gpu/verify_wave.sh   # a subset
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fp8train-verify-out}; mkdir -p "$OUT"
PARTS=${PARTS:-moe_tests moe_bench kv_tests inference_bench}
source scripts/gpu/_lib.sh
gpu_header

for p in $PARTS; do
    case $p in
        moe_tests)
            part moe_tests 160 moe_tests.log python3 -m pytest -q -rs -p no:cacheprovider \
                tests/gpu/test_moe_fp8_block.py tests/kernels/test_permute.py \
                "tests/gpu/test_scaled_mm_backend.py::test_grouped_path_kernels_match_emulated"
            grep -E "passed|failed|FAILED|Error|rel err|padded" "$OUT/moe_tests.log" | tail -15 ;;
        moe_bench)
            part moe_bench 140 bench_moe.txt python3 benchmarks/bench_moe.py --layers large --gemms large \
                --recipes hybrid current blockwise v3_fp8 --out "$OUT/bench_moe.json"
            grep -v "^  " "$OUT/bench_moe.txt" | grep -vE "^(STAGE|\[)" | tail -45 ;;
        kv_tests)
            part kv_tests 110 kv_tests.log python3 -m pytest -q -rs -p no:cacheprovider \
                tests/kernels/test_kv_kernels.py tests/kernels/test_lowbit_gemm.py tests/gpu/test_inference_kernels.py \
                -k "kivi or hadamard or kv or lowbit or matmul or w8a8 or dequant"
            tail -12 "$OUT/kv_tests.log" ;;
        inference_bench)
            mkdir -p "$OUT/inference"
            part inference_bench 165 inference/bench.log python3 benchmarks/bench_inference.py \
                --out "$OUT/inference" --parts "${INFERENCE_PARTS:-gemm,kv,decode}" --max-configs "${MAX_CONFIGS:-4}"
            sed -n '/^## /,$p' "$OUT/inference/bench.log" | head -80
            [ -s "$OUT/inference/bench.log" ] && grep -q "^## " "$OUT/inference/bench.log" || tail -30 "$OUT/inference/bench.log" ;;
        *) echo "unknown part $p (moe_tests moe_bench kv_tests inference_bench)"; exit 2 ;;
    esac
done
finish verify_wave.sh
