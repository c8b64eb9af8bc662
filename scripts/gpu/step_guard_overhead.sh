#!/usr/bin/env bash
# What the step guard (fp8train/train/step_guard.py) costs per optimizer step on the GPU.
#   bash scripts/gpu/step_guard_overhead.sh        # from the repo root; ~2-4 minutes on one H100
# Needs torch + triton only (no DeepSpeed, Hydra or wandb). Prints the table; JSON and the log
# go to $OUT (step_guard.json, step_guard.log).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0))"
python benchmarks/bench_step_guard.py --sizes 125m,1b --recipes bf16,hybrid --steps 20 \
  --json "$OUT/step_guard.json" 2>&1 | tee "$OUT/step_guard.log"
