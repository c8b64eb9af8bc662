#!/usr/bin/env bash
# Run fp8train's GPU checks and benchmarks on the H100 test box in a few long calls.
#
#   bash scripts/h100_session.sh te-piece N   # stage Transformer Engine piece N (carry .te/pN)
#   bash scripts/h100_session.sh main         # install wheels (+TE), GPU tests, benchmarks (carry .whl)
#   bash scripts/h100_session.sh train        # 125M v3_fp8 vs bf16, 1B bf16 vs FP8 through the trainer
#   bash scripts/h100_session.sh multi        # ZeRO-1 FP8 on every GPU vs one GPU (scaling efficiency)
#
# Everything worth keeping lands in $OUT (the device tool brings it back).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
phase=${1:?phase}

install() { [ -f .whl/install.sh ] && bash .whl/install.sh 2>&1 | tail -8; }

summary() {  # print the key numbers of a finished run
  python3 - "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + "/summary.json"))
print({k: s.get(k) for k in ("recipe", "model_size", "world_size", "steps", "tokens_per_s", "mfu",
                             "final_train_loss", "final_val_loss", "peak_memory_gib")})
PY
}

train_run() {  # name, nproc, overrides...
  local name=$1 nproc=$2; shift 2
  FP8TRAIN_RUN_ID=$name torchrun --standalone --nproc_per_node="$nproc" launch/train.py "$@" \
    logger.mode=offline > "$OUT/$name.log" 2>&1 || { tail -30 "$OUT/$name.log"; return 1; }
  summary "runs/$name" | tee -a "$OUT/train_summaries.txt"
  cp "runs/$name/summary.json" "$OUT/$name.summary.json" 2>/dev/null || true
}

case $phase in
  te-piece)
    mkdir -p /root/tew && cp ".te/p$2/"* /root/tew/ && ls /root/tew ;;
  main)
    install
    python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|rror" | head -30
    python3 benchmarks/bench_linear.py --out "$OUT/bench_linear.json" 2>&1 | tail -9
    python3 benchmarks/bench_moe.py --out "$OUT/bench_moe.json" 2>&1 | tail -12 ;;
  train)
    install
    train_run gpu125m_v3_fp8 1 +experiment=gpu_125m +recipe=v3_fp8 trainer.max_steps=150
    train_run gpu125m_bf16 1 +experiment=gpu_125m +recipe=bf16 trainer.max_steps=150
    train_run gpu1b_bf16 1 +experiment=gpu_1b +recipe=bf16
    train_run gpu1b_hybrid_native 1 +experiment=gpu_1b +recipe=hybrid recipe.backend=scaled_mm
    train_run gpu1b_hybrid_te 1 +experiment=gpu_1b +recipe=hybrid recipe.backend=te ;;
  multi)
    install
    n=$(python3 -c "import torch; print(torch.cuda.device_count())")
    for recipe in v3_fp8 bf16; do
      for np in 1 "$n"; do
        train_run "multi_${recipe}_${np}gpu" "$np" +experiment=gpu_125m +recipe=$recipe \
          trainer.max_steps=60 trainer.eval_every=60 trainer.fp8_telemetry_every=20
        cp "runs/multi_${recipe}_${np}gpu/metrics.jsonl" "$OUT/multi_${recipe}_${np}gpu.metrics.jsonl" 2>/dev/null || true
      done
    done ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
