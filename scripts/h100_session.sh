#!/usr/bin/env bash
# Run fp8train's GPU checks and benchmarks on the H100 test box in a few long calls.
#
#   bash scripts/h100_session.sh te-piece N   # stage Transformer Engine piece N (carry .te/pN)
#   bash scripts/h100_session.sh main         # install wheels (+TE), GPU tests, benchmarks (carry .whl)
#   bash scripts/h100_session.sh tests        # install wheels (+TE), GPU tests only
#   bash scripts/h100_session.sh bench        # benchmarks + profiles (after tests, on the warm box)
#   bash scripts/h100_session.sh train        # 125M v3_fp8 vs bf16, 1B bf16 vs FP8 through the trainer
#   bash scripts/h100_session.sh multi        # ZeRO-1 FP8 on every GPU vs one GPU (scaling efficiency)
#
# Everything worth keeping lands in $OUT/<phase>.tgz (the device tool brings back at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
phase=${1:?phase}
FINAL_OUT=${OUT:-/tmp/out}; OUT=$(mktemp -d); mkdir -p "$FINAL_OUT"
trap 'tar czf "$FINAL_OUT/$phase.tgz" -C "$OUT" . 2>/dev/null' EXIT

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
    bash "$0" tests; bash "$0" bench ;;
  tests)
    install
    # tests/kernels run their small shapes on the GPU too when it is there (the `device` fixture)
    python3 -m pytest -q -rs -s tests/kernels tests/gpu tests/models/test_dispatch_grouped.py \
      -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
    grep -E "passed|failed|FAILED|Error|step |final|max relative|graphed ==" "$OUT/gpu_tests.log" | tail -40 ;;
  bench)
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader
    python3 benchmarks/bench_linear.py --graphs 4096,2048,2048 16384,4096,4096 --compiled 4096,2048,2048 16384,4096,4096 \
      --out "$OUT/bench_linear.json" > "$OUT/bench_linear.txt" 2>&1; tail -12 "$OUT/bench_linear.txt"
    python3 benchmarks/bench_moe.py --profile hybrid --out "$OUT/bench_moe.json" > "$OUT/bench_moe.txt" 2>&1; grep -B2 -A14 "^MoE block" "$OUT/bench_moe.txt"
    python3 benchmarks/profile_linear.py --recipe hybrid --shape 4096,2048,2048 --sort cpu_time_total --rows 25 > "$OUT/profile_host_small.txt" 2>&1
    python3 benchmarks/profile_linear.py --recipe hybrid --shape 16384,4096,16384 > "$OUT/profile_gpu_large.txt" 2>&1
    head -3 "$OUT/profile_host_small.txt"; head -30 "$OUT/profile_gpu_large.txt" ;;
  train)
    install
    train_run gpu125m_v3_fp8 1 +experiment=gpu_125m +recipe=v3_fp8 trainer.max_steps=150
    train_run gpu125m_bf16 1 +experiment=gpu_125m +recipe=bf16 trainer.max_steps=150
    train_run gpu1b_bf16 1 +experiment=gpu_1b +recipe=bf16
    train_run gpu1b_hybrid_native 1 +experiment=gpu_1b +recipe=hybrid recipe.backend=scaled_mm
    train_run gpu1b_hybrid_te 1 +experiment=gpu_1b +recipe=hybrid recipe.backend=te ;;
  train125)  # 125M: eager vs torch.compile, BF16 vs FP8 (tokens/s, loss), 60 steps each
    install
    for variant in "bf16 false" "hybrid false" "bf16 true" "hybrid true" "v3_fp8 true"; do
      set -- $variant
      train_run "t125_$1_compile_$2" 1 +experiment=gpu_125m +recipe=$1 trainer.compile=$2 \
        trainer.max_steps=60 trainer.eval_every=60 trainer.save_every=1000
    done ;;
  train1b)  # ~1B: BF16 vs FP8 recipes, compiled; TRAIN1B="bf16 hybrid current" STEPS=25 to choose
    install
    for variant in ${TRAIN1B:-bf16 hybrid current}; do
      train_run "t1b_${variant}_compiled" 1 +experiment=gpu_1b +recipe=$variant trainer.compile=true \
        trainer.max_steps=${STEPS:-25}
    done ;;
  compiled)  # torch.compile: custom-operator casts vs Inductor-generated casts
    install
    python3 -m pytest -q -s tests/gpu/test_compile_gpu.py -p no:cacheprovider 2>&1 \
      | grep -E "passed|failed|compiled ==|Error" | head
    for route in operators inductor; do
      echo "== compiled casts: $route"
      python3 benchmarks/bench_linear.py --no-te --compiled-casts $route --shapes 16384,4096,4096 \
        --recipes hybrid current blockwise v3_fp8 --compiled 4096,2048,2048 16384,4096,4096 16384,4096,16384 \
        --out "$OUT/bench_linear_compiled_$route.json" > "$OUT/bench_linear_compiled_$route.txt" 2>&1
      tail -6 "$OUT/bench_linear_compiled_$route.txt"
    done
    train_run t125_hybrid_compile_inductor 1 +experiment=gpu_125m +recipe=hybrid trainer.compiled_casts=inductor \
      trainer.compile=true trainer.max_steps=60 trainer.eval_every=60 trainer.save_every=1000 ;;
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
  final)  # the closing benchmark: linear (2 runs, TE side by side), kernels, host timeline, MoE
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader
    for run in 1 2; do
      python3 benchmarks/bench_linear.py --graphs 4096,2048,2048 --out "$OUT/bench_linear_run$run.json" \
        > "$OUT/bench_linear_run$run.txt" 2>&1; grep "|" "$OUT/bench_linear_run$run.txt"
    done
    python3 benchmarks/bench_quant_kernels.py --out "$OUT/bench_quant.json" > "$OUT/bench_quant.txt" 2>&1
    grep "|" "$OUT/bench_quant.txt" | cut -c1-90
    python3 benchmarks/timeline_linear.py --shapes 4096,2048,2048 16384,4096,16384 --out "$OUT/timeline.json" \
      > "$OUT/timeline.txt" 2>&1; grep -A16 "^ms per" "$OUT/timeline.txt"
    python3 benchmarks/bench_moe.py --out "$OUT/bench_moe.json" > "$OUT/bench_moe.txt" 2>&1; grep -A12 "^MoE block" "$OUT/bench_moe.txt" ;;
  check)  # quick GPU check of kernel/launch changes (no TE): kernel + FP8-path GPU tests, sweeps
    install
    python3 -m pytest -q -rs ${CHECK_TESTS:-tests/kernels tests/gpu/test_lean_launch.py tests/gpu/test_cuda_graphs.py \
      tests/gpu/test_compile_gpu.py tests/gpu/test_scaled_mm_backend.py} -p no:cacheprovider > "$OUT/check_tests.log" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/check_tests.log" | tail -15
    python3 benchmarks/tune_quant_kernels.py --only quantize_1x128_both quantize_128x128_both --out "$OUT/tune_quant.json" > "$OUT/tune_quant.txt" 2>&1
    grep "|" "$OUT/tune_quant.txt" | cut -c1-120
    python3 benchmarks/bench_quant_kernels.py --out "$OUT/bench_quant.json" > "$OUT/bench_quant.txt" 2>&1
    grep "|" "$OUT/bench_quant.txt" | cut -c1-90
    python3 benchmarks/timeline_linear.py --no-te --shapes 4096,2048,2048 16384,16384,4096 > "$OUT/timeline.txt" 2>&1
    grep -A12 "^ms per" "$OUT/timeline.txt"
    python3 benchmarks/bench_host_overhead.py --shape 4096,2048,2048 --recipe hybrid > "$OUT/host_small.txt" 2>&1
    grep "|" "$OUT/host_small.txt" | grep -v "scaled_mm " ;;
  diag)  # kernel launch-config sweep, GPU busy/idle per layer, host time at the small shape
    install
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader
    python3 benchmarks/bench_quant_kernels.py --out "$OUT/bench_quant.json" > "$OUT/bench_quant.txt" 2>&1
    grep "|" "$OUT/bench_quant.txt" | cut -c1-110
    python3 benchmarks/tune_quant_kernels.py --out "$OUT/tune_quant.json" > "$OUT/tune_quant.txt" 2>&1
    tail -9 "$OUT/tune_quant.txt"
    python3 benchmarks/timeline_linear.py ${TIMELINE_ARGS:-} --out "$OUT/timeline.json" > "$OUT/timeline.txt" 2>&1
    grep -A40 "^ms per" "$OUT/timeline.txt" | head -40
    python3 benchmarks/bench_host_overhead.py --shape 4096,2048,2048 --recipe hybrid > "$OUT/host_small.txt" 2>&1
    grep "|" "$OUT/host_small.txt" ;;
  host)  # where host time goes in small layers (no TE needed)
    install
    python3 -m pytest -q -rs tests/gpu/test_scaled_mm_backend.py -k strided -p no:cacheprovider 2>&1 | tail -3
    for r in hybrid current; do
      python3 benchmarks/bench_host_overhead.py --recipe $r > "$OUT/host_$r.txt" 2>&1; head -24 "$OUT/host_$r.txt"
    done
    echo "== with PyTorch TunableOp (cached GEMM choice per shape)"
    PYTORCH_TUNABLEOP_ENABLED=1 PYTORCH_TUNABLEOP_FILENAME=/tmp/tunableop.csv \
      python3 benchmarks/bench_host_overhead.py --recipe hybrid > "$OUT/host_hybrid_tunableop.txt" 2>&1
    head -24 "$OUT/host_hybrid_tunableop.txt" ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
