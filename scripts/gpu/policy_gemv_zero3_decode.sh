#!/usr/bin/env bash
# MoE precision policy, decode GEMV, ZeRO-3 FP8 check and graphed decode on an H200 box (x1 or x2;
# every part but z3 on GPU 0 alone), in parts with their own timeouts:
#   moe      bench_moe small + large layers, every FP8 recipe, the trainer's precision policy per
#            recipe, block speedups written as grouped:<class> rows      -> $OUT/bench_moe.*, crossover.yaml
#   gemv     weight-only int4/int8 decode GEMMs at M = 1 and 16 vs BF16 (new GEMV kernel beside the old)
#   z3       ZeRO-3, BF16 vs hybrid, 1B, on 2 GPUs when the box has them (the re-gather that the
#            weight-cache fix is about), else on one (needs .whl carried)
#   decode   end-to-end graphed decode, 1B-like model: BF16 vs W4A16 / W8A16, int8 / int4 KV cache
#
#   PARTS="moe gemv" bash scripts/gpu/policy_gemv_zero3_decode.sh      # a subset, in that order
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUT=${OUT:-/tmp/fp8train-policy-gemv-zero3-decode-out}; mkdir -p "$OUT"
PARTS=${PARTS:-moe gemv z3 decode}
source scripts/gpu/_lib.sh
gpu_header
gpus=$(nvidia-smi -L | wc -l)
ONE_GPU=(env CUDA_VISIBLE_DEVICES=0)  # the single-GPU parts run alone on GPU 0 (nothing else runs)

for p in $PARTS; do
    case $p in
        moe)
            cp recipes/crossover/nvidia_h200.yaml "$OUT/crossover.yaml"
            part moe 180 bench_moe.txt "${ONE_GPU[@]}" python3 benchmarks/bench_moe.py --layers small large --gemms \
                --recipes hybrid current blockwise v3_fp8 --policy --crossover-out "$OUT/crossover.yaml" \
                --out "$OUT/bench_moe.json"
            grep -E "^(==|\|)" "$OUT/bench_moe.txt" | grep -v "FLOP\|recipe  *|" | head -40 ;;
        gemv)
            part gemv 120 gemv.log "${ONE_GPU[@]}" python3 benchmarks/bench_inference.py --out "$OUT/gemv" --parts gemm \
                ${GEMV_ARGS:---ms 1,16}
            sed -n '/^## /,$p' "$OUT/gemv.log" | head -40; [ -s "$OUT/gemv.log" ] && tail -5 "$OUT/gemv.log" ;;
        z3)
            [ -f .whl/install.sh ] && bash .whl/install.sh > "$OUT/install.log" 2>&1
            preset=z3_check; [ "$gpus" -ge 2 ] && preset=z3_check_x2
            part z3 200 z3.log python3 benchmarks/bench_scaling.py --preset $preset --out /tmp/z3 --deadline-s 130 --no-parity
            cp /tmp/z3/scaling.md "$OUT/z3_scaling.md" 2>/dev/null; grep -E "^\||s/GPU" "$OUT/z3.log" | tail -12 ;;
        decode)
            part decode 120 decode.log "${ONE_GPU[@]}" python3 benchmarks/bench_inference.py --out "$OUT/decode" --parts decode \
                --tuned benchmarks/results/h200_session5/inference_tuned_call4.json
            sed -n '/^## /,$p' "$OUT/decode.log" | head -20; tail -3 "$OUT/decode.log" ;;
        *) echo "unknown part $p (moe gemv z3 decode)"; exit 2 ;;
    esac
done
finish policy_gemv_zero3_decode.sh
