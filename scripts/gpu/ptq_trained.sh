#!/usr/bin/env bash
# Issue 15's PTQ quality table on a model the framework trained (125M, or 1B with PTQ_SIZE=1b), in <= ~9 minutes.
#
#   CUDA_VISIBLE_DEVICES=2 bash scripts/gpu/ptq_trained.sh   # from the repo root; carry .whl (hydra, deepspeed)
#   DRY_RUN=1 bash scripts/gpu/ptq_trained.sh                 # the same chain on the CPU: tiny model (~2-3 min)
#   PTQ_SIZE=1b PTQ_GPUS=4 bash scripts/gpu/ptq_trained.sh    # the 1B row: trained on 4 GPUs (torchrun, ~1-2 min),
#                                                             # quantized on the first; PTQ_DEADLINE_S 540 (~9 min)
#
# 1. trains the 125M model in BF16 with quality.sh --qat's base settings (seq 512, 32 sequences per
#    step, lr 1e-3, warmup 50, compiled, the whole stdlib corpus; 1000 steps ~ 16M tokens) into
#    $PTQ_WORK/run. A training that is still running after PTQ_TRAIN_S gets SIGTERM: the trainer
#    checkpoints where it is and stops (its preemption path), and the quantization uses that.
# 2. ONE launch/quantize.py process: the main preset (PTQ_MIXED_PRESET, default rtn_w4_g128) with a
#    greedy mixed-precision plan at 5 average bits (INT8 for the most sensitive layers), then, as
#    `compare` presets, rtn_w4_g128 rtn_w8 gptq_w4_g128 awq_w4_g128 smoothquant_w8a8 fp8_w8a8
#    gptq_w4_g128_plain (in that order). Its deadline_s stops it from starting a preset once the
#    script's budget (PTQ_DEADLINE_S) is nearly spent; the skipped ones are listed under the table.
# 3. benchmarks/ptq_trained_table.py prints ONE table: method, avg bits, ppl, change vs the
#    unquantized model, RTN-W4 gap recovered, the issue's 125M goal and met / NOT met.
#
# Env: PTQ_CHECKPOINT (a finished run folder: skip training), PTQ_STEPS (1000; DRY_RUN 100),
#      PTQ_TRAIN_S (200: SIGTERM to the trainer after it), PTQ_DEADLINE_S (450: the whole script's
#      budget; the quantize deadline is what is left minus PTQ_RESERVE_S=75), PTQ_MIXED_PRESET,
#      PTQ_CALIB_SAMPLES (128), PTQ_EVAL_WINDOWS (128 windows x 512 held-out tokens), PTQ_SENS_WINDOWS
#      (4: windows per layer of the sensitivity pass that ranks layers for the plan), PTQ_WORK
#      (/tmp/fp8train-ptq125), PTQ_SIZE (125m | 1b: the model and the goals the table checks),
#      PTQ_GPUS (1: training processes through torchrun; quantization always runs on the first GPU).
#      The GPU: whatever CUDA_VISIBLE_DEVICES the caller gives (the first one).
# $OUT (default /tmp/fp8train-ptq125-out) gets gpu.txt, train.log, quantize.log, ptq_trained.md,
# ptq_trained.json, table.log and ptq_trained_runs.tgz (summary, metrics, configs, report.*,
# sensitivity.*, plan.yaml; not the weights).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/_lib.sh
gpu_setup /tmp/fp8train-ptq125-out
export WANDB_MODE=disabled
[ "${DRY_RUN:-0}" = 1 ] || python3 -c "import os, torch; print('this run: CUDA_VISIBLE_DEVICES=' + \
os.environ.get('CUDA_VISIBLE_DEVICES', '(unset: all)'), '->', torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
WORK=${PTQ_WORK:-/tmp/fp8train-ptq125}; mkdir -p "$WORK"
SIZE=${PTQ_SIZE:-125m}; GPUS=${PTQ_GPUS:-1}
case "$SIZE" in 125m|1b) ;; *) echo "PTQ_SIZE=$SIZE: choose 125m or 1b (the sizes with goals in benchmarks/ptq_goals.yaml)" >&2; exit 2 ;; esac
DEFAULT_DEADLINE=450; [ "$SIZE" = 1b ] && DEFAULT_DEADLINE=540
DEADLINE=${PTQ_DEADLINE_S:-$DEFAULT_DEADLINE}; RESERVE=${PTQ_RESERVE_S:-75}
MIXED=${PTQ_MIXED_PRESET:-rtn_w4_g128}
COMPARE=rtn_w4_g128,rtn_w8,gptq_w4_g128,awq_w4_g128,smoothquant_w8a8,fp8_w8a8,gptq_w4_g128_plain

if [ "${DRY_RUN:-0}" = 1 ]; then   # tiny model, short windows: the whole chain for real on 2 CPU cores
    STEPS=${PTQ_STEPS:-100}
    TRAIN=(model.size=tiny data.seq_len=64 trainer.global_batch_size=8 trainer.micro_batch_size=8
           trainer.compile=false trainer.eval_every=50 trainer.save_every=50 data.val_batch_size=8
           data.val_batches=4)
    QUANT=(device=cpu calibration.samples=${PTQ_CALIB_SAMPLES:-16} calibration.seq_len=64 calibration.batch_size=8
           eval.windows=${PTQ_EVAL_WINDOWS:-32} eval.seq_len=64 eval.batch_size=8 sensitivity_windows=2)
else                               # quality.sh --qat's base run (fp8train.sweep.qat_recovery)
    STEPS=${PTQ_STEPS:-1000}
    TRAIN=(model.size=$SIZE data.default_corpus_bytes=20000000 data.seq_len=512 trainer.global_batch_size=32
           trainer.micro_batch_size=$((32 / GPUS)) trainer.compile=true trainer.eval_every=500 trainer.save_every=500
           data.val_batch_size=16 data.val_batches=8)
    QUANT=(device=cuda calibration.samples=${PTQ_CALIB_SAMPLES:-128} calibration.seq_len=512 calibration.batch_size=8
           eval.windows=${PTQ_EVAL_WINDOWS:-128} eval.seq_len=512 eval.batch_size=16
           sensitivity_windows=${PTQ_SENS_WINDOWS:-4})
fi

save() {   # whatever exists, also after a failure: logs are in $OUT already, the small run files in a .tgz
    (cd "$WORK" && find . -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' -o -name '*.md' \
        -o -name '*.png' -o -name '*.yaml' \) -not -path '*/checkpoints/*' -print0 \
        | tar czf "$OUT/ptq_trained_runs.tgz" --null -T -) 2>/dev/null || true
}
trap save EXIT
[ -f .whl/install.sh ] && bash .whl/install.sh 2>&1 | tail -3

# 1. the trained model
if [ -n "${PTQ_CHECKPOINT:-}" ]; then
    RUN=$PTQ_CHECKPOINT; echo "== train: skipped, using PTQ_CHECKPOINT=$RUN"
else
    RUN=$WORK/run; rm -rf "$RUN"
    t0=$SECONDS; rc=0
    LAUNCH=(python3); [ "$GPUS" -gt 1 ] && LAUNCH=(torchrun --standalone --nproc_per_node="$GPUS")
    timeout -k 30 "${PTQ_TRAIN_S:-200}" "${LAUNCH[@]}" launch/train.py +recipe=bf16 logger.mode=disabled \
        logger.progress_bar=false trainer.seed=1 optim.lr=1.0e-3 optim.warmup_steps=50 \
        trainer.fp8_telemetry_every=100 trainer.max_steps="$STEPS" "${TRAIN[@]}" hydra.run.dir="$RUN" \
        > "$OUT/train.log" 2>&1 || rc=$?
    echo "== train: $((SECONDS - t0)) s (rc $rc; 124 = stopped by PTQ_TRAIN_S, checkpointed where it was)"
    if [ ! -f "$RUN/checkpoints/latest" ]; then
        tail -30 "$OUT/train.log"; echo "ptq_trained.sh: the training wrote no checkpoint (log: $OUT/train.log)" >&2
        exit 1
    fi
    python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print('   steps', s['steps'], 'preempted', s['preempted'], \
'val loss', s['final_val_loss'], 'tokens/s', round(s.get('tokens_per_s') or 0))" "$RUN/summary.json" || true
fi

# 2. every preset in one quantize process, inside what is left of the budget
LEFT=$((DEADLINE - SECONDS))
QUANT_DEADLINE=$((LEFT - RESERVE)); [ "$QUANT_DEADLINE" -lt 0 ] && QUANT_DEADLINE=0
echo "== quantize: ${LEFT} s left; no preset starts after ${QUANT_DEADLINE} s"
python3 -c "import compressed_tensors" 2>/dev/null || { QUANT+=(export=false)
    echo "   compressed-tensors is not installed here: export=false (evaluated and reported, no model folder)"; }
part quantize "$((LEFT > 60 ? LEFT - 10 : 50))" quantize.log python3 launch/quantize.py checkpoint="$RUN" \
    +quant="$MIXED" plan_budget_bits=5 "compare=[$COMPARE]" output="$WORK/quantized" overwrite=true \
    progress=false deadline_s="$QUANT_DEADLINE" "${QUANT[@]}"
grep -E "^[a-z0-9_]+( \+ plan)?: ppl" "$OUT/quantize.log" || true

# 3. the table
SUMMARY=()
for f in "$RUN/summary.json" "$RUN/../summary.json"; do [ -f "$f" ] && { SUMMARY=(--train-summary "$f"); break; }; done
part table 60 table.log python3 benchmarks/ptq_trained_table.py --report "$WORK/quantized/report.json" \
    --size "$SIZE" "${SUMMARY[@]}" --out-md "$OUT/ptq_trained.md" --out-json "$OUT/ptq_trained.json"
[ -f "$OUT/ptq_trained.md" ] && cat "$OUT/ptq_trained.md" || tail -20 "$OUT/table.log"
finish ptq_trained.sh
