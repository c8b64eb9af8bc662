#!/usr/bin/env bash
# Issue 18 in ONE device call on the 4-GPU box (kind nvidia-h100-x4; carry .whl and .slurm), or the
# 2-GPU box (x2 preset, 2 nodes x 1 GPU):
#   1. scripts/gpu/scaling.sh     weak scaling 1 -> 4 GPUs (ZeRO-1, ZeRO-3), BF16 vs hybrid, 1B,
#                                 and loss parity 1/2/4 GPUs on NCCL          (~5.5 min)
#   2. scripts/gpu/multinode.sh   2 nodes x 2 GPUs through launch/slurm/train.sbatch on a private
#                                 Slurm, preempted, requeued, resumed, compared with the 4-GPU
#                                 parity run of part 1                        (~2 min)
#
#   bash scripts/gpu/issue18.sh                        # both parts, ~8 min
#   SCALING_DEADLINE_S=200 bash scripts/gpu/issue18.sh # start no scaling run after 200 s
# $OUT gets scaling.md, scaling.json, scaling_runs.tgz, multinode.tgz and issue18.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
FINAL_OUT=${OUT:-/tmp/fp8train-issue18-out}; mkdir -p "$FINAL_OUT"; export OUT=$FINAL_OUT
t0=$SECONDS
{
    echo "== host: $(hostname) $(nproc) cores; $(grep -m1 PRETTY_NAME /etc/os-release); $(ldd --version | head -n 1)"
    # the box decides the matrix: 4 GPUs -> the budget preset and 2 nodes x 2 GPUs; 2 GPUs -> the x2
    # preset (ZeRO-1/3 at 1 -> 2 GPUs) and 2 nodes x 1 GPU
    gpus=$(nvidia-smi -L | wc -l)
    if [ "$gpus" -ge 4 ]; then preset=budget; per_node=2; else preset=x2; per_node=1; fi
    echo "== $gpus GPUs: scaling preset $preset, multinode 2 nodes x $per_node GPU(s)"
    bash scripts/gpu/scaling.sh --preset "$preset"; scaling=$?
    echo "== scaling.sh exit $scaling after $((SECONDS - t0)) s"
    # the resumed Slurm run is compared with the uninterrupted 4-GPU parity run of part 1
    MN_GPUS_PER_NODE=$per_node \
    MN_REFERENCE=${SCALING_WORK:-/tmp/fp8train-scaling}/runs/parity_125m_hybrid_z1_$((2 * per_node))gpu \
        bash scripts/gpu/multinode.sh; multinode=$?
    echo "== multinode.sh exit $multinode; total $((SECONDS - t0)) s"
    [ "$scaling" = 0 ] && [ "$multinode" = 0 ]
} 2>&1 | tee "$FINAL_OUT/issue18.log"
exit "${PIPESTATUS[0]}"
