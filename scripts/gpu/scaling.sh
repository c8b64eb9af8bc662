#!/usr/bin/env bash
# Issue 18, part 1 on the 4-GPU box: weak scaling 1 -> 2 -> 4 GPUs through the real trainer, and
# loss parity across world sizes on NCCL (benchmarks/bench_scaling.py; presets in
# benchmarks/scaling_presets.yaml).
#
#   bash scripts/gpu/scaling.sh                      # --budget: ~6-7 min on 4 H100s (carry .whl)
#   bash scripts/gpu/scaling.sh --full --models 1b   # more of the matrix (extra args go to the driver)
#   SCALING_DEADLINE_S=240 bash scripts/gpu/scaling.sh   # start no new run after 240 s
#
# Prints the GPUs, one line per finished run and the final tables; $OUT gets scaling.md,
# scaling.json and scaling_runs.tgz (every run's console log, metrics, summary, amax timings).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
FINAL_OUT=${OUT:-/tmp/fp8train-scaling-out}; mkdir -p "$FINAL_OUT"
WORK=${SCALING_WORK:-/tmp/fp8train-scaling}; rm -rf "$WORK"; mkdir -p "$WORK"
save() {
    cp "$WORK"/scaling.md "$WORK"/scaling.json "$FINAL_OUT"/ 2>/dev/null || true
    (cd "$WORK" && find runs -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' \) -print0 \
        | tar czf "$FINAL_OUT/scaling_runs.tgz" --null -T -) 2>/dev/null || true
}
trap save EXIT
t0=$SECONDS
[ -f .whl/install.sh ] && bash .whl/install.sh 2>&1 | tail -5
echo "install: $((SECONDS - t0)) s"
nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
ARGS=("$@"); [ ${#ARGS[@]} -gt 0 ] || ARGS=(--budget)
python3 benchmarks/bench_scaling.py "${ARGS[@]}" --out "$WORK" --deadline-s "${SCALING_DEADLINE_S:-330}"
echo "scaling.sh: total $((SECONDS - t0)) s"
