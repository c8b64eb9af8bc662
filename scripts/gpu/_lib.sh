# Shared by scripts/gpu/*.sh (sourced from the repo root, never run).

# gpu_setup DEFAULT_OUT: $OUT (DEFAULT_OUT unless set) created, the repo importable, the machine logged.
gpu_setup() {
    OUT=${OUT:-$1}; mkdir -p "$OUT"
    export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
    gpu_header
}

# The machine into $OUT/gpu.txt: the GPUs (or, with DRY_RUN=1, a CPU dry run under the Triton
# interpreter: sets DRY=(--dry-run) for the benchmark), then torch and triton versions.
gpu_header() {
    DRY=()
    if [ "${DRY_RUN:-0}" = 1 ]; then
        export TRITON_INTERPRET=1; DRY=(--dry-run); echo "dry run on the CPU" | tee "$OUT/gpu.txt"
    else
        nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    fi
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
        | tee -a "$OUT/gpu.txt"
}

# part NAME LIMIT_S LOG COMMAND...: run one part under its own timeout into $OUT/LOG; a failure
# is remembered in the array `failed` (the caller reports it at the end) and stops nothing.
failed=()
part() {
    local name=$1 limit=$2 log=$3; shift 3
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$log" 2>&1 || failed+=("$name (rc $?)")
    echo "== $name: $((SECONDS - t0)) s"
}

# The final tables of a benchmark log (from its first "## " heading on), or its tail when it has none.
show_tables() {
    if grep -q "^## " "$1"; then sed -n '/^## /,$p' "$1"; else tail -40 "$1"; fi
}

# Exit 1 naming the failed parts, or say that all passed.
finish() {
    if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]} (logs in $OUT)" >&2; exit 1; fi
    echo "$1: all parts passed in ${SECONDS} s"
}
