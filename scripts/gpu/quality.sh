#!/usr/bin/env bash
# Issue 17 on GPUs: the FP8-vs-BF16 loss-gap study (recipes x seeds, one run per GPU) and the
# 125M QAT recovery measurement, through the real trainer.
#
#   bash scripts/gpu/quality.sh --budget   # ~8 min on 4 GPUs: bf16, v3_fp8 and its fix, 4 seeds,
#                                          # 125M at seq 512, 600 steps; resolves gaps of ~1%
#   bash scripts/gpu/quality.sh --full     # 6 recipes x 8 seeds, 125M at seq 1024, 2000 steps: several
#                                          # hours of GPU time. Each call stops itself before
#                                          # QUALITY_DEADLINE_S (runs checkpoint) and the next call of
#                                          # the same command continues; the table covers what finished
#   bash scripts/gpu/quality.sh --resolve  # the issue's 0.25 % question for the card's recipe only: bf16 and
#                                          # v3_fp8 x 12 seeds, 125M at seq 512, 1500 steps: ~11 min on 4
#                                          # GPUs = two back-to-back calls of the same command (the box must
#                                          # stay warm: the study folder lives in /tmp); the half-width is
#                                          # ~0.7 x the paired per-seed sd (0.25 % if that sd is <= 0.35 %)
#   bash scripts/gpu/quality.sh --qat      # 125M QAT recovery (W4 g128): base 1000 steps, then 5% and
#                                          # 20% fine-tunes with and without QAT (2 GPUs), RTN-W4 ppl; ~6 min
#                                          # QAT_BASE_STEPS=3000: a base trained longer, whose weights
#                                          # leave their Gaussian init and cost RTN-W4 more (session 7's
#                                          # 1000-step base: +0.07 %, a ratio of tiny numbers)
#   bash scripts/gpu/quality.sh --dry-run --budget   # print the planned commands (works on CPU)
#
# Env: QUALITY_WORK (study folder, default /tmp/fp8train-quality; kept between calls so --full can
# continue), QUALITY_DATA (a prepared dataset folder; default: the embedded stdlib corpus, ~11 MB,
# so long runs repeat it), QUALITY_DEADLINE_S (default 420 for --budget, 540 for --full and --resolve),
# QUALITY_RESOLVE_RECIPES (the recipes --resolve compares with bf16, default v3_fp8; session 8 resolved
# v3_fp8 in one 553 s call on 4 H200s; the candidate fix: QUALITY_RESOLVE_RECIPES=v3_fp8_blockwise),
# QUALITY_RUNS_PER_GPU (default 2 for --resolve: a compiled 125M step keeps an H200 busy only about
# half the time, so two runs share a GPU; 1 otherwise),
# QUALITY_VARIANTS (--resolve: "LABEL=OVERRIDES;..." recipes that are not presets, e.g.
# "v3_guard=+recipe=v3_fp8 trainer.fp8_guard.mode=act": the card's recipe with the FP8 health guard
# promoting the layers whose gradients underflow),
# QUALITY_REUSE (a quality_runs.tgz of an earlier call of the same mode, e.g. the one committed under
# benchmarks/results/h200x4_session8/quality_resolve/: its finished runs of QUALITY_REUSE_RECIPES,
# default bf16, are unpacked into the study folder first, so the study skips them; same seeds, same
# overrides, same code path for those recipes; the note must say which runs were reused).
# Every FP8 run has all eligible layers in FP8 (the study adds trainer.precision_policy=off; session 7's
# --budget study ran before that and its FP8 recipes converted 0 of 85 layers).
# $OUT gets quality.md, quality.json, loss_gap.png, qat_recovery.md/json and quality_runs.tgz.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
MODE=--budget; DRY=()
for arg in "$@"; do
    case "$arg" in
        --budget|--full|--resolve|--qat) MODE=$arg ;;
        --dry-run) DRY=(--dry-run) ;;
        *) echo "quality.sh: unknown argument $arg (use --budget | --full | --resolve | --qat [--dry-run])" >&2; exit 2 ;;
    esac
done
FINAL_OUT=${OUT:-/tmp/fp8train-quality-out}; mkdir -p "$FINAL_OUT"
WORK=${QUALITY_WORK:-/tmp/fp8train-quality}; mkdir -p "$WORK"
DATA=(); [ -n "${QUALITY_DATA:-}" ] && DATA=("data.path=$QUALITY_DATA")
[ -n "${QUALITY_DATA:-}" ] || DATA=("data.default_corpus_bytes=20000000")  # the whole stdlib (~12 MB)
ALL=(logger.mode=disabled model.size=125m optim.lr=1.0e-3 optim.warmup_steps=50 trainer.compile=true
     trainer.fp8_telemetry_every=100 "${DATA[@]}")
# the design card's formats (E5M2 activations, E4M3 weights and gradients) with 1x128 / 128x128
# online scales: the v3_fp8 variant the CPU investigation points to (docs/QUALITY.md)
FIX=v3_fp8_blockwise

save() {
    study=$WORK/study; [ "$MODE" = --resolve ] && study=$WORK/resolve
    for f in quality.md quality.json loss_gap.png; do cp "$study/$f" "$FINAL_OUT/" 2>/dev/null || true; done
    for f in qat_recovery.md qat_recovery.json; do cp "$WORK/qat/$f" "$FINAL_OUT/" 2>/dev/null || true; done
    (cd "$WORK" && find . -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' -o -name '*.md' \) \
        -not -path '*/checkpoints/*' -print0 | tar czf "$FINAL_OUT/quality_runs.tgz" --null -T -) 2>/dev/null || true
}
[ ${#DRY[@]} -eq 0 ] && trap save EXIT
t0=$SECONDS
if [ -n "${QUALITY_REUSE:-}" ]; then
    [ -f "$QUALITY_REUSE" ] || { echo "quality.sh: QUALITY_REUSE=$QUALITY_REUSE is not a file" >&2; exit 2; }
    sub=study; [ "$MODE" = --resolve ] && sub=resolve
    for recipe in ${QUALITY_REUSE_RECIPES:-bf16}; do
        tar xzf "$QUALITY_REUSE" -C "$WORK" --wildcards "./$sub/$recipe/*" 2>/dev/null || {
            echo "quality.sh: $QUALITY_REUSE holds no $sub/$recipe runs; list its recipes with" \
                 "tar tzf $QUALITY_REUSE | cut -d/ -f3 | sort -u, or drop $recipe from QUALITY_REUSE_RECIPES" >&2
            exit 2; }
        echo "reused $(ls "$WORK/$sub/$recipe"/seed*/summary.json | wc -l) finished $recipe runs from $QUALITY_REUSE"
    done
fi
if [ ${#DRY[@]} -eq 0 ]; then
    [ -f .whl/install.sh ] && bash .whl/install.sh 2>&1 | tail -3
    nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count())"
fi

case "$MODE" in
--budget)
    python3 -m fp8train.sweep.quality --out "$WORK/study" --recipes "bf16,v3_fp8,$FIX" --seeds 1,2,3,4 \
        --deadline-s "${QUALITY_DEADLINE_S:-420}" "${DRY[@]}" -- "${ALL[@]}" data.seq_len=512 \
        trainer.global_batch_size=32 trainer.micro_batch_size=32 trainer.max_steps=600 trainer.eval_every=100 \
        trainer.save_every=200 data.val_batch_size=16 data.val_batches=16 ;;
--full)
    python3 -m fp8train.sweep.quality --out "$WORK/study" --recipes "bf16,v3_fp8,$FIX,hybrid,current,blockwise" \
        --seeds 1,2,3,4,5,6,7,8 --deadline-s "${QUALITY_DEADLINE_S:-540}" "${DRY[@]}" -- "${ALL[@]}" \
        data.seq_len=1024 trainer.global_batch_size=64 trainer.micro_batch_size=32 trainer.max_steps=2000 \
        trainer.eval_every=250 trainer.save_every=250 data.val_batch_size=16 data.val_batches=32 ;;
--resolve)
    GPUS=auto
    if [ ${#DRY[@]} -eq 0 ]; then
        n=$(python3 -c "import torch; print(torch.cuda.device_count())")
        GPUS=$(python3 -c "print(','.join(str(g) for _ in range(${QUALITY_RUNS_PER_GPU:-2}) for g in range($n)))")
        echo "run slots (GPU ids): $GPUS"
    fi
    VARIANTS=()  # QUALITY_VARIANTS="LABEL=OVERRIDES;LABEL=OVERRIDES": recipes that are not presets
    if [ -n "${QUALITY_VARIANTS:-}" ]; then
        IFS=';' read -ra specs <<< "$QUALITY_VARIANTS"
        for spec in "${specs[@]}"; do VARIANTS+=(--variant "$spec"); done
    fi
    python3 -m fp8train.sweep.quality --out "$WORK/resolve" --recipes "bf16,${QUALITY_RESOLVE_RECIPES:-v3_fp8}" \
        "${VARIANTS[@]}" --seeds "$(seq -s, 1 12)" \
        --gpus "$GPUS" \
        --deadline-s "${QUALITY_DEADLINE_S:-540}" "${DRY[@]}" -- "${ALL[@]}" data.seq_len=512 \
        trainer.global_batch_size=32 trainer.micro_batch_size=32 trainer.max_steps=1500 trainer.eval_every=250 \
        trainer.save_every=250 data.val_batch_size=16 data.val_batches=16 ;;
--qat)
    if [ ${#DRY[@]} -gt 0 ]; then echo "python3 -m fp8train.sweep.qat_recovery --out $WORK/qat{,_x0.2} ..."; exit 0; fi
    # base: compiled BF16; fine-tunes: eager (QAT's fake quantizer is not compiled), a fresh cosine
    # from 10% of the peak LR to 0; 5% extra steps (the goal), then 20% reusing the same base
    QAT_ARGS=(--recipe bf16 --preset w4_g128 --steps "${QAT_BASE_STEPS:-1000}" --eval-batches 64 --finetune-peak 0.1
              --finetune "trainer.compile=false")
    QAT_COMMON=("${ALL[@]}" data.seq_len=512 trainer.global_batch_size=32 trainer.micro_batch_size=32
                trainer.eval_every=500 trainer.save_every=500 data.val_batch_size=16 data.val_batches=8)
    python3 -m fp8train.sweep.qat_recovery --out "$WORK/qat" --extra 0.05 "${QAT_ARGS[@]}" -- "${QAT_COMMON[@]}"
    python3 -m fp8train.sweep.qat_recovery --out "$WORK/qat_x0.2" --base "$WORK/qat/base" --extra 0.2 \
        "${QAT_ARGS[@]}" -- "${QAT_COMMON[@]}"
    cp "$WORK/qat_x0.2/qat_recovery.md" "$FINAL_OUT/qat_recovery_x0.2.md" ;;
esac
echo "quality.sh $MODE: total $((SECONDS - t0)) s"
