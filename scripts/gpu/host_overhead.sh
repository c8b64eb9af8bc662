#!/usr/bin/env bash
# Issue 12: why did a 125m FP8-recipe run with 0 of 84 layers in FP8 run 0.86x of BF16 on the H200
# with the same kernels? On the CPU (benchmarks/host_overhead.py) the trainer's step for such a run
# is the BF16 step, operator for operator; this script checks the two things the CPU cannot:
#   1. host work per optimizer step on the GPU, tiny 12-layer model, eager (host-bound):
#      bf16 | blockwise, no layer FP8 | blockwise, all FP8 | hybrid, all FP8 | bf16 again
#   2. run-order carry-over at 125m (benchmarks/bench_e2e.py, compiled per block, precision policy
#      calibrate with precision_min_speedup=100, so the FP8 recipe keeps all 84 layers in BF16):
#      bf16 alone in its process; blockwise alone in its process; then ONE process running bf16,
#      hybrid (policy off: all FP8), blockwise, bf16 (dense.sh's order, BF16 repeated last). If the
#      last BF16 is as slow as blockwise, the 0.86x was what earlier runs leave in the process.
#
#   bash scripts/gpu/host_overhead.sh        # carry .whl; ~5-7 minutes on one H100/H200
# $OUT gets: host_overhead.log (all output), host_overhead.json, e2e_order.tgz (rows, summaries, logs).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f .whl/install.sh ] && bash .whl/install.sh 2>&1 | tail -3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUTDIR=${OUT:-/tmp/fp8train-host-out}; mkdir -p "$OUTDIR"
WORK=${HOST_WORK:-/tmp/fp8train-host}; rm -rf "$WORK"; mkdir -p "$WORK"
export FP8TRAIN_CACHE=${FP8TRAIN_CACHE:-/tmp/fp8train-dense-cache}
exec > >(tee "$OUTDIR/host_overhead.log") 2>&1
trap '(cd "$WORK" && tar czf "$OUTDIR/e2e_order.tgz" e2e_*) 2>/dev/null || true' EXIT
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

echo "== 1. host work per step, tiny model (${SECONDS} s)"
timeout 240 python3 benchmarks/host_overhead.py --runs bf16 blockwise:none blockwise:all hybrid:all bf16 \
    --steps 20 --warmup 3 --profile-steps 5 --profile-rows 12 --out "$OUTDIR/host_overhead.json"

echo "== 2. 125m run order (${SECONDS} s)"
e2e() {  # name, runs...
    local name=$1; shift
    timeout 200 python3 benchmarks/bench_e2e.py --policy calibrate --steps 12 --profile-steps 3 \
        --out "$WORK/e2e_$name" --runs "$@" --extra trainer.precision_min_speedup=100 \
        || echo "bench_e2e $name: failed or timed out (see above)"
}
e2e alone_bf16 125m:bf16
e2e alone_blockwise 125m:blockwise
e2e shared 125m:bf16 125m:hybrid:off 125m:blockwise 125m:bf16
for name in alone_bf16 alone_blockwise shared; do
    echo "-- $name"; cat "$WORK/e2e_$name/bench_e2e.txt" 2>/dev/null || echo "(no table)"
done
echo "host_overhead.sh: total ${SECONDS} s"
