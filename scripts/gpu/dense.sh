#!/usr/bin/env bash
# Issue 12 (dense FP8 never slower than BF16, >= 1.3x at 1B, less memory) on ONE H100/H200:
#   1. the crossover calibration: BF16 vs FP8 fwd+bwd (streamed: launch time counts) for every linear shape of the
#      125m/350m/1b models, recipe classes delayed/current/blockwise (benchmarks/calibrate_crossover.py);
#      it fills the start-up calibration cache and writes a table to commit as recipes/crossover/
#   2. end to end through the real trainer, compiled per decoder block, BF16 in the same call (one process per run)
#      (benchmarks/bench_e2e.py, precision policy = calibrate, i.e. the table just measured):
#      size x recipe, steady-state tokens/s, ratio to BF16, MFU, peak GiB, GPU busy, FP8 layers.
#
#   bash scripts/gpu/dense.sh                  # carry .whl; <= 9 min on one H100
#   DENSE_DEADLINE_S=400 bash scripts/gpu/dense.sh   # start no e2e run after 400 s (default 440)
#   DENSE_GROUPS="350m extras" bash scripts/gpu/dense.sh   # a second call: the groups not reached
#
# Run order (most important first; runs that would start after the deadline are listed as skipped;
# expect the first call to reach 1b and 125m, and 350m's BF16 at most):
#   1b: bf16 hybrid current blockwise | 125m: bf16 hybrid current blockwise | 350m: the same |
#   1b v3_fp8 | 1b and 125m hybrid with the policy off (what the policy buys)
# Each run is a fresh process that compiles ONE decoder block (trainer.compile_scope=blocks),
# DENSE_STEPS=30 timed steps (the first one compiling, excluded) + 3 profiled steps.
# $OUT gets: dense.log (all output), crossover.yaml, calibration.json, bench_e2e.txt, bench_e2e.json,
# e2e_runs.tgz (per run: summary.json, train.log, kernels.txt, row JSON).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f .whl/install.sh ] && bash .whl/install.sh 2>&1 | tail -3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUTDIR=${OUT:-/tmp/fp8train-dense-out}; mkdir -p "$OUTDIR"
# rows accumulate across calls on a warm machine (a second call's table includes the first call's
# runs, BF16 baselines of the same box); DENSE_FRESH=1 starts empty
WORK=${DENSE_WORK:-/tmp/fp8train-dense}; [ "${DENSE_FRESH:-0}" = 1 ] && rm -rf "$WORK"; mkdir -p "$WORK"
# kept across calls on a warm machine: a second call re-measures nothing it already has
export FP8TRAIN_CACHE=${FP8TRAIN_CACHE:-/tmp/fp8train-dense-cache}
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
python3 benchmarks/calibrate_crossover.py --sizes 125m 350m 1b --recipes hybrid current blockwise --method streamed \
    --cache "$FP8TRAIN_CACHE" --ship "$WORK/crossover.yaml" --match "$MATCH" --out "$WORK/calibration.json"

echo "== 2. end to end (${SECONDS} s)"
# every run in its own process (--isolate: what a run leaves behind slowed the next one by up to
# 11% in one process); each group gets what is left of the deadline; the last call prints the table
DEADLINE=${DENSE_DEADLINE_S:-440}
e2e() {
    local budget=$((DEADLINE - SECONDS))
    [ "$budget" -gt 0 ] || budget=0
    python3 benchmarks/bench_e2e.py --isolate --policy calibrate --steps "${DENSE_STEPS:-30}" --profile-steps 3 \
        --budget-s "$budget" --out "$WORK/e2e" --runs "$@" || echo "bench_e2e: a run failed (see its row)"
}
for group in ${DENSE_GROUPS:-1b 125m 350m extras}; do
    case $group in
        1b|125m|350m) e2e "$group:bf16" "$group:hybrid" "$group:current" "$group:blockwise" ;;
        extras) e2e 1b:v3_fp8 1b:hybrid:off 125m:hybrid:off ;;
        *) echo "DENSE_GROUPS: unknown group $group (1b 125m 350m extras)"; exit 2 ;;
    esac
done
python3 benchmarks/bench_e2e.py --report-only --out "$WORK/e2e"
echo "dense.sh: total ${SECONDS} s"
