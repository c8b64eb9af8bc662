#!/usr/bin/env bash
# Issue 18: where a ZeRO-3 step's time goes, BF16 vs hybrid FP8, 1B model, one GPU (~3-4 min on one
# H200; carry .whl for DeepSpeed/Hydra). benchmarks/zero3_profile.py runs bf16 and hybrid under
# ZeRO-3 and ZeRO-1, each in its own process through the real trainer (eager), and prints per
# optimizer step: wall ms, GPU-busy ms of one profiled step, host->GPU syncs, ZeRO-3 fetches, FP8
# weight casts per layer, and the top operators by self CPU time.
#
#   bash scripts/gpu/zero3.sh                       # bf16:3 hybrid:3 bf16:1 hybrid:1
#   bash scripts/gpu/zero3.sh --runs hybrid:3        # extra args go to the script
#
# $OUT gets zero3_profile.json (every row, top operators) and zero3_profile.txt (the printout).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUT=${OUT:-/tmp/fp8train-zero3-out}; mkdir -p "$OUT"
t0=$SECONDS
[ -f .whl/install.sh ] && bash .whl/install.sh 2>&1 | tail -5
echo "install: $((SECONDS - t0)) s"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'gpus', torch.cuda.device_count())"
python3 benchmarks/zero3_profile.py --warmup 2 --steps 3 --out "$OUT" "$@" 2>&1 | tee "$OUT/zero3_profile.txt"
echo "zero3.sh: total $((SECONDS - t0)) s"
