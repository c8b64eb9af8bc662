#!/usr/bin/env bash
# Issue 12 (dense FP8 never slower than BF16, >= 1.3x at 1B, less memory) on ONE H100/H200:
#   1. the crossover calibration: BF16 vs FP8 fwd+bwd (CUDA graphs) for every linear shape of the
#      125m/350m/1b models, recipe classes delayed/current/blockwise (benchmarks/calibrate_crossover.py);
#      it fills the start-up calibration cache and writes a table to commit as recipes/crossover/
#   2. end to end through the real trainer, compiled per decoder block, BF16 in the same process
#      (benchmarks/bench_e2e.py, precision policy = calibrate, i.e. the table just measured):
#      size x recipe, steady-state tokens/s, ratio to BF16, MFU, peak GiB, GPU busy, FP8 layers.
#
#   bash scripts/gpu/dense.sh                  # carry .whl; ~8-9 min on one H100
#   DENSE_DEADLINE_S=400 bash scripts/gpu/dense.sh   # start no e2e run after 400 s
#
# Run order (most important first; runs that would start after the deadline are listed as skipped):
#   1b: bf16 hybrid current blockwise | 125m: bf16 hybrid current blockwise | 350m: the same |
#   1b v3_fp8 | 125m hybrid with the policy off (what the policy buys) | 1b hybrid with the policy off
# Each run compiles ONE decoder block (trainer.compile_scope=blocks) instead of the whole model
# (~145 s at 1B before), 12 timed steps (the first one compiling, excluded) + 3 profiled steps.
# $OUT gets: dense.log (all output), crossover.yaml, calibration.json, bench_e2e.txt, bench_e2e.json,
# e2e_runs.tgz (per run: summary.json, train.log, kernels.txt, row JSON).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f .whl/install.sh ] && bash .whl/install.sh 2>&1 | tail -3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUTDIR=${OUT:-/tmp/fp8train-dense-out}; mkdir -p "$OUTDIR"
WORK=${DENSE_WORK:-/tmp/fp8train-dense}; rm -rf "$WORK"; mkdir -p "$WORK"
export FP8TRAIN_CACHE=$WORK/cache
exec > >(tee "$OUTDIR/dense.log") 2>&1
save() {
    cp "$WORK"/crossover.yaml "$WORK"/calibration.json "$WORK"/e2e/bench_e2e.txt "$WORK"/e2e/bench_e2e.json \
        "$OUTDIR"/ 2>/dev/null || true
    (cd "$WORK" && [ -d e2e ] && tar czf "$OUTDIR/e2e_runs.tgz" e2e) 2>/dev/null || true
}
trap save EXIT
echo "install + start: ${SECONDS} s"
nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm,power.limit --format=csv,noheader
python3 -c "import torch, deepspeed, triton; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
MATCH=$(python3 -c "import torch; n = torch.cuda.get_device_name(); print(next((k for k in ('H200', 'H100', 'A100', 'L40S', 'L4') if k in n), n))")

echo "== 1. crossover calibration (${SECONDS} s)"
python3 benchmarks/calibrate_crossover.py --sizes 125m 350m 1b --recipes hybrid current blockwise \
    --cache "$FP8TRAIN_CACHE" --ship "$WORK/crossover.yaml" --match "$MATCH" --out "$WORK/calibration.json"

echo "== 2. end to end (${SECONDS} s)"
DEADLINE=${DENSE_DEADLINE_S:-440}
BUDGET=$((DEADLINE - SECONDS)); [ "$BUDGET" -gt 30 ] || BUDGET=30
python3 benchmarks/bench_e2e.py --policy calibrate --steps 12 --profile-steps 3 --budget-s "$BUDGET" \
    --out "$WORK/e2e" --runs \
    1b:bf16 1b:hybrid 1b:current 1b:blockwise \
    125m:bf16 125m:hybrid 125m:current 125m:blockwise \
    350m:bf16 350m:hybrid 350m:current 350m:blockwise \
    1b:v3_fp8 125m:hybrid:off 1b:hybrid:off || echo "bench_e2e: some runs failed (see the table)"
echo "dense.sh: total ${SECONDS} s"
