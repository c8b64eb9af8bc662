#!/usr/bin/env bash
# Multi-node through the real launch path, on one box: 2 nodes x G GPUs, c10d rendezvous, one run
# folder, a preemption signal mid-run -> checkpoint -> requeue/relaunch -> resume -> finish.
#
#   bash scripts/gpu/multinode.sh            # on the 4-GPU box (root; carry .slurm and .whl)
#   MN_CPU=1 bash scripts/gpu/multinode.sh   # the same on a CPU box: tiny model over gloo
#   MN_PATHS=torchrun bash scripts/gpu/multinode.sh   # only the fallback (no Slurm)
#   MN_REFERENCE=/tmp/fp8train-scaling/runs/parity_125m_hybrid_z1_4gpu bash scripts/gpu/multinode.sh
#                                            # compare with scaling.sh's 4-GPU parity run instead of
#                                            # running the torchrun reference (what issue18.sh does)
#
# Two launch paths, run one after the other on the same GPUs and compared at the end:
#   slurm     scripts/gpu/local_slurm.sh starts a private 2-node Slurm from the staged .debs;
#             launch/slurm/submit.py --nodes 2 --gpus-per-node G submits launch/slurm/train.sbatch
#             (srun -> one torchrun per node -> c10d on the head node). Once the run has logged
#             MN_SLURM_STOP steps, `scancel --batch --signal=USR1` does what Slurm's --signal
#             warning does; the job checkpoints, requeues itself and the next attempt resumes.
#   torchrun  the sbatch template's torchrun line run by hand: two launcher processes (--nnodes 2,
#             c10d, one rdzv id; node 1 on GPUs 0..G-1, node 2 on G..2G-1), same run settings.
#             After a successful Slurm path it runs uninterrupted: the reference curve (skipped
#             when MN_REFERENCE names an uninterrupted run with the same settings). Without
#             Slurm (MN_PATHS=torchrun), after a failed Slurm path, or with MN_TORCHRUN_STOP set,
#             it is the fallback the issue allows: SIGUSR1 to both launchers after
#             MN_TORCHRUN_STOP steps (what srun delivers), then both relaunched into the same
#             run folder (what the requeue does).
# multinode_check.py checks each stop and resume, and that the two loss curves agree: a resume
# that lost the data position, LR schedule, optimizer or FP8 scaling state would not.
# Output: a table, log excerpts, and $OUT/multinode.tgz with every log.
set -euo pipefail
cd "$(dirname "$0")/../.."
# LOGLEVEL=INFO: torchrun's agents log their rendezvous (group_rank, ranks, master) to the job log
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled LOGLEVEL=INFO
FINAL_OUT=${OUT:-/tmp/fp8train-multinode-out}; mkdir -p "$FINAL_OUT"
WORK=${MN_WORK:-/tmp/fp8train-multinode}; rm -rf "$WORK"; mkdir -p "$WORK"
trap 'tar czf "$FINAL_OUT/multinode.tgz" --exclude=checkpoints -C "$WORK" . 2>/dev/null || true' EXIT
say() { echo "[multinode $(date +%H:%M:%S)] $*"; }
PATHS=${MN_PATHS:-slurm torchrun}
G=${MN_GPUS_PER_NODE:-2}
WORLD=$((2 * G))
if [ "${MN_CPU:-0}" = 1 ]; then   # tiny model over gloo: the whole path in ~2 min on 2 cores
    STEPS=${MN_STEPS:-16}
    OVERRIDES=(+recipe=hybrid trainer.device=cpu data.seq_len=32 trainer.micro_batch_size=2
               "trainer.global_batch_size=$((2 * WORLD))" data.val_batch_size=2 data.val_batches=1
               optim.warmup_steps=2)
else   # 125M, FP8 delayed scaling (amax all-reduce across nodes): the settings of the 4-GPU
       # parity run of benchmarks/bench_scaling.py (scaling_presets.yaml), so it can be the reference;
       # the speed policy off, as there: at 125M it would keep every layer in BF16 (sessions 6-7 did)
    [ -f .whl/install.sh ] && bash .whl/install.sh 2>&1 | tail -5
    nvidia-smi --query-gpu=index,name --format=csv,noheader
    STEPS=${MN_STEPS:-14}
    OVERRIDES=(+experiment=gpu_125m data.val_batches=1 +recipe=hybrid trainer.compile=false
               trainer.micro_batch_size=16 trainer.global_batch_size=64 optim.decay_steps=100
               trainer.precision_policy=off)
fi
OVERRIDES+=("trainer.max_steps=$STEPS" "trainer.eval_every=$((STEPS / 2))" trainer.save_every=100000
            trainer.fp8_telemetry_every=0 logger.mode=disabled logger.progress_bar=false)
SLURM_STOP=${MN_SLURM_STOP:-$((STEPS * 3 / 8))}
TORCHRUN_STOP=${MN_TORCHRUN_STOP:-$((STEPS * 5 / 8))}
# MN_REFERENCE: an uninterrupted run with the same settings (the 4-GPU parity run of
# scripts/gpu/scaling.sh); with it the torchrun path only runs as the fallback after a Slurm failure.
REFERENCE=${MN_REFERENCE:-}
[ -n "$REFERENCE" ] && [ ! -f "$REFERENCE/metrics.jsonl" ] && { say "no run in MN_REFERENCE=$REFERENCE: ignored"; REFERENCE=""; }

logged_steps() { [ -f "$1/metrics.jsonl" ] && wc -l <"$1/metrics.jsonl" || echo 0; }

# wait_steps RUN_DIR N TIMEOUT_S CHECK_CMD: until metrics.jsonl has N records (CHECK_CMD must hold)
wait_steps() {
    local deadline=$((SECONDS + $3))
    while [ "$(logged_steps "$1")" -lt "$2" ]; do
        [ "$SECONDS" -lt "$deadline" ] || { say "no $2 steps within $3 s"; return 1; }
        eval "$4" || { say "the run ended before step $2"; return 1; }
        sleep 0.5
    done
}

run_slurm() {
    local run=$WORK/slurm job state restarts deadline
    # `|| return 1`: set -e does not act inside a function called from an `if` (the first GPU run
    # went on to srun against a cluster whose slurmd had died, and waited until the call ended)
    bash scripts/gpu/local_slurm.sh up "$G" || return 1
    # shellcheck disable=SC1091
    source "${FP8TRAIN_SLURM_PREFIX:-/tmp/fp8train-slurm}/env.sh"
    mkdir -p "$run"
    # which GPUs each node's tasks get (gres + the task prolog of local_slurm.sh)
    srun --immediate=60 --nodes=2 --ntasks-per-node=1 --gpus-per-node="$G" bash -c \
        'echo "[multinode] gres check: node $SLURMD_NODENAME (node id $SLURM_NODEID): CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"' \
        | sort | tee "$run/gres_check.log" || return 1
    job=$(python3 launch/slurm/submit.py --nodes 2 --gpus-per-node "$G" --partition gpu --time 30 \
          --signal-seconds 60 --run-dir "$run" --parsable -- "${OVERRIDES[@]}")
    say "slurm: submitted job $job (2 nodes x $G GPUs), run dir $run"
    wait_steps "$run" "$SLURM_STOP" 300 "squeue -h -j $job | grep -q ." \
        || { tail -n 40 "$run"/slurm-*.out; return 1; }
    say "slurm: $(logged_steps "$run") steps logged: scancel --batch --signal=USR1 $job"
    scancel --batch --signal=USR1 "$job"
    deadline=$((SECONDS + 300))
    while :; do
        state=$(scontrol show job -o "$job" | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
        case "$state" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) break ;; esac
        [ "$SECONDS" -lt "$deadline" ] || { say "job $job still $state after 300 s"; scancel "$job"; break; }
        sleep 1
    done
    restarts=$(scontrol show job -o "$job" | grep -o 'Restarts=[0-9]*' | cut -d= -f2)
    say "slurm: job $job ended $state after $restarts requeue(s)"
    cp -r "${FP8TRAIN_SLURM_PREFIX:-/tmp/fp8train-slurm}/log" "$WORK/slurm-daemon-logs" 2>/dev/null || true
    bash scripts/gpu/local_slurm.sh down
    [ "$state" = COMPLETED ] && [ "$restarts" = 1 ]
}

# launch_pair RUN_DIR ATTEMPT: the sbatch template's torchrun line, once per "node", in the background
launch_pair() {
    local run=$1 attempt=$2 node first
    PIDS=()
    for node in 0 1; do
        first=$((node * G))
        say "torchrun: attempt $attempt, launcher $node (node rank by rendezvous) on devices" \
            "$(seq -s, "$first" $((first + G - 1)))" | tee -a "$run/launcher$node.log"
        CUDA_VISIBLE_DEVICES=$(seq -s, "$first" $((first + G - 1))) FP8TRAIN_RUN_ID=torchrun-mn \
        TORCH_ELASTIC_SHUTDOWN_TIMEOUT=60 \
            python3 -m torch.distributed.run --nnodes=2 --nproc_per_node="$G" \
            --rdzv_backend=c10d --rdzv_endpoint="$(hostname -s):29731" --rdzv_id="fp8mn-$attempt" \
            --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
            launch/train.py "hydra.run.dir=$run" "${OVERRIDES[@]}" >>"$run/launcher$node.log" 2>&1 &
        PIDS+=($!)
    done
}

wait_pair() {  # both launchers must exit 0
    local rc=0 pid
    for pid in "${PIDS[@]}"; do wait "$pid" || rc=$?; done
    return $rc
}

# run_torchrun: one uninterrupted run (the reference the resumed Slurm run is compared with), or,
# when Slurm is not run or failed (or MN_TORCHRUN_STOP is set), the preempted-and-relaunched fallback.
run_torchrun() {
    local run=$WORK/torchrun rc=0
    mkdir -p "$run"
    launch_pair "$run" 1
    if [ "$TORCHRUN_PREEMPT" = 0 ]; then
        wait_pair || { say "torchrun: the run failed"; tail -n 30 "$run"/launcher*.log; return 1; }
        return 0
    fi
    wait_steps "$run" "$TORCHRUN_STOP" 300 "kill -0 ${PIDS[0]} 2>/dev/null" \
        || { tail -n 30 "$run"/launcher*.log; kill -TERM "${PIDS[@]}" 2>/dev/null; return 1; }
    say "torchrun: $(logged_steps "$run") steps logged: SIGUSR1 to both launchers" | tee -a "$run/launcher0.log"
    kill -USR1 "${PIDS[@]}"
    wait_pair || rc=$?   # a launcher that forwarded a stop signal exits non-zero (as srun does)
    [ -f "$run/PREEMPTED" ] || { say "torchrun: no PREEMPTED marker (launchers: $rc)"; tail -n 30 "$run"/launcher*.log; return 1; }
    say "torchrun: attempt 1 stopped ($(cat "$run/PREEMPTED")); relaunching both" | tee -a "$run/launcher0.log"
    launch_pair "$run" 2
    wait_pair || { say "torchrun: attempt 2 failed"; tail -n 30 "$run"/launcher*.log; return 1; }
    PREEMPTED_RUNS+=(torchrun)
}

T0=$SECONDS
RUNS=()
PREEMPTED_RUNS=()
STATUS=0
TORCHRUN_PREEMPT=0
[[ " $PATHS " == *" slurm "* ]] || TORCHRUN_PREEMPT=1
[ -n "${MN_TORCHRUN_STOP:-}" ] && TORCHRUN_PREEMPT=1
for path in $PATHS; do
    if [ "$path" = torchrun ] && [ "$TORCHRUN_PREEMPT" = 0 ] && [ -n "$REFERENCE" ]; then
        say "torchrun: not run; the reference is $REFERENCE"; continue
    fi
    t=$SECONDS
    if "run_$path"; then
        say "$path: done in $((SECONDS - t)) s"
        [ "$path" = slurm ] && PREEMPTED_RUNS+=(slurm)
    else
        say "$path: FAILED after $((SECONDS - t)) s"; STATUS=1
        [ "$path" = slurm ] && { say "Slurm failed: the torchrun fallback will be preempted and relaunched"; TORCHRUN_PREEMPT=1; }
    fi
    [ -d "$WORK/$path" ] && RUNS+=("$path=$WORK/$path")
done
PREEMPTED_LIST=$(IFS=,; echo "${PREEMPTED_RUNS[*]:-}")
python3 scripts/gpu/multinode_check.py --steps "$STEPS" --world-size "$WORLD" --fp8 \
    --preempted "$PREEMPTED_LIST" ${REFERENCE:+--reference "$REFERENCE"} "${RUNS[@]}" || STATUS=1
say "total $((SECONDS - T0)) s; paths: $PATHS; status $STATUS"
exit $STATUS
