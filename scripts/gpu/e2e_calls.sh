#!/usr/bin/env bash
# Dense end-to-end calls of the GPU plan (issue 12), one device call each, carrying .whl_lite:
#
#   bash scripts/gpu/e2e_calls.sh mem       # 1b bf16 / hybrid(off) / current(off): peak after the X_cols fix
#   bash scripts/gpu/e2e_calls.sh graphs    # the same, compiled steps replayed as CUDA graphs
#   bash scripts/gpu/e2e_calls.sh graphs-ops   # CUDA graphs + the custom-operator casts
#   bash scripts/gpu/e2e_calls.sh small     # 125m bf16 / hybrid(table) / hybrid(calibrate)
#   bash scripts/gpu/e2e_calls.sh small-graphs   # 125m and 350m, policy table, graphs + operator casts
#   bash scripts/gpu/e2e_calls.sh best      # 1b bf16 / hybrid / current / blockwise, graphs + operator casts
#   bash scripts/gpu/e2e_calls.sh idle      # 1b graphed (the experiment's default): where the GPU waits
#   bash scripts/gpu/e2e_calls.sh whole     # 1b, one CUDA graph for the whole model (compile_scope=model)
#   bash scripts/gpu/e2e_calls.sh graph-test   # tests/gpu/test_graphed_training.py (graphed = compiled losses)
#   bash scripts/gpu/e2e_calls.sh cal       # 1b with gpu_1b's default policy (calibrate, graph timing)
#   bash scripts/gpu/e2e_calls.sh roles     # 1b graphed: gradient casts fused by Inductor vs the operators
#
# Every run is its own process (--isolate); each phase is capped so a device call still returns a table.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUT=${OUT:-/tmp/fp8train-e2e-out}
mkdir -p "$OUT"
[ -f .whl_lite/install.sh ] && bash .whl_lite/install.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
e2e() {  # name budget_s args...
  local name=$1 budget=$2; shift 2
  local t0=$SECONDS
  timeout "$budget" python3 benchmarks/bench_e2e.py --isolate --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? $((SECONDS - t0)) s"
  sed -n '/^end to end/,$p' "$OUT/$name.log" | head -40
  grep -E "Error|error:|skipping cudagraphs|cudagraph" "$OUT/$name.log" | sort | uniq -c | head -12
}
graphs=trainer.compile_mode=reduce-overhead
for phase in "$@"; do
  case $phase in
    mem) e2e e2e_mem 240 --runs 1b:bf16 1b:hybrid:off 1b:current:off --steps 12 --profile-steps 3 ;;
    graphs) e2e e2e_graphs 300 --runs 1b:bf16 1b:hybrid:off 1b:current:off --steps 12 --profile-steps 3 --extra $graphs ;;
    graphs-ops) e2e e2e_graphs_ops 240 --runs 1b:hybrid:off 1b:current:off --steps 12 --profile-steps 3 \
                  --extra $graphs trainer.compiled_casts=operators ;;
    small) e2e e2e_small 240 --runs 125m:bf16 125m:hybrid 125m:hybrid:calibrate --steps 20 --profile-steps 3 \
             --extra trainer.precision_calibration=graphs ;;
    best) e2e e2e_best 330 --runs 1b:bf16 1b:hybrid:off 1b:current:off 1b:blockwise:off --steps 12 \
            --profile-steps 3 --extra $graphs trainer.compiled_casts=operators ;;
    idle) e2e e2e_idle 300 --runs 1b:bf16 1b:hybrid:off 1b:current:off --steps 8 --profile-steps 2 --idle-steps 1 ;;
    whole) e2e e2e_whole 450 --runs 1b:bf16 1b:hybrid:off --steps 12 --profile-steps 3 \
             --idle-steps 1 --extra trainer.compile_scope=model ;;
    cal) e2e e2e_cal 240 --runs 1b:bf16 1b:hybrid:calibrate 1b:current:calibrate --steps 12 --profile-steps 2 ;;
    roles) e2e e2e_roles 300 --runs 1b:bf16 1b:hybrid:off 1b:current:off --steps 12 --profile-steps 2 ;
           e2e e2e_roles_grads 240 --runs 1b:hybrid:off 1b:current:off --steps 12 --profile-steps 2 \
             --extra "trainer.inductor_cast_roles=[grad_output]" ;;
    small-graphs) e2e e2e_small_graphs 290 --runs 125m:bf16 125m:hybrid 125m:current 350m:bf16 350m:hybrid \
                    350m:current --steps 12 --profile-steps 2 --budget-s 250 --extra $graphs trainer.compiled_casts=operators ;;
    graph-test) t0=$SECONDS
      timeout 420 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_graphed_training.py > "$OUT/graph_test.log" 2>&1
      echo "== graph-test rc=$? $((SECONDS - t0)) s"; grep -E "step [0-9]|passed|failed|Error" "$OUT/graph_test.log" | tail -40 ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
# $OUT comes back as at most 8 files: the phase logs, gpu.txt and one archive of the run folders
(cd "$OUT" && tar czf runs.tgz $(find . -mindepth 1 -maxdepth 1 -type d -printf '%P ') && \
  find . -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +)
