#!/usr/bin/env bash
# A private two-node Slurm cluster on ONE host, from the .deb files staged by
# scripts/gpu/stage_slurm_debs.sh: nothing is installed into /, nothing needs the network.
#
#   bash scripts/gpu/local_slurm.sh up [GPUS_PER_NODE]   # root; prints `source <prefix>/env.sh`
#   source /tmp/fp8train-slurm/env.sh                    # PATH, LD_LIBRARY_PATH, SLURM_CONF
#   bash scripts/gpu/local_slurm.sh down                 # cancel jobs, stop daemons (by pid)
#
# How it differs from the CI cluster (.ci/slurm/setup.sh), and why:
#   * packages: `dpkg -x` into $PREFIX/root, not apt-get install. Only the shared libraries this
#     system lacks (asked of ldd) go on LD_LIBRARY_PATH, so no newer system library is shadowed.
#   * two nodes without network namespaces (the GPU box may not grant CAP_NET_ADMIN, and has no
#     iproute2): both slurmd run on this host (`slurmd -N NAME`), on two ports of 127.0.0.1.
#     Node 1 is named after this host (`hostname -s`), node 2 the same plus `-n2`, each its own
#     NodeHostname: Debian's Slurm (no --enable-multiple-slurmd) refuses two nodes with one
#     NodeHostname, and it rewrites a node named `localhost`. Node 1 sorts first, so it is the
#     job's head node and the c10d rendezvous endpoint resolves without touching /etc/hosts.
#   * GPUs: each node owns GPUS_PER_NODE of them through gres (/dev/nvidiaN). Slurm numbers a
#     node's GPUs 0..n-1 (right on real nodes); a TaskProlog shifts node 2's by n, so
#     CUDA_VISIBLE_DEVICES is 0,1 on node 1 and 2,3 on node 2 (2 GPUs each).
#   * slurmd execs slurmstepd from a compiled-in path (/usr/sbin). Rather than write there, the
#     private copy of libslurmfull.so has that 9-byte string replaced by /tmp/f8sb, a symlink to
#     $PREFIX/sbin.
#   * munged runs as root with its socket, key, pid and log under $PREFIX (AuthInfo=socket=...).
#   * ports 16817-16819 (not Slurm's defaults), so a CI cluster on the same host is not disturbed.
# Without /dev/nvidia* (the CPU box), character devices made under $PREFIX/dev (mknod, major 195;
# never opened) stand in for the GPUs, so the GPU submission (--gpus-per-node) runs end to end
# on a CPU with the trainer on the CPU.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PREFIX=${FP8TRAIN_SLURM_PREFIX:-/tmp/fp8train-slurm}
STEPD_LINK=/tmp/f8sb          # exactly as long as "/usr/sbin": replaces it inside libslurmfull.so
DEBS=${FP8TRAIN_SLURM_DEBS:-$REPO/.slurm/debs}
NODES=("$(hostname -s)" "$(hostname -s)-n2")   # the first is the head node: its name must resolve
CTL_PORT=16817
log() { echo "[local-slurm $(date +%H:%M:%S)] $*" >&2; }
die() { echo "[local-slurm] ERROR: $*" >&2; exit 1; }
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pidfile() {  # FILE NAME: SIGTERM, wait up to 10 s, then SIGKILL
    local pid
    pid_alive "$1" || { rm -f "$1"; return 0; }
    pid=$(cat "$1"); log "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    rm -f "$1"
}

unpack() {
    command -v dpkg >/dev/null || die "dpkg not found: cannot unpack the .deb files"
    ls "$DEBS"/*.deb >/dev/null 2>&1 || die "no .deb files in $DEBS: run scripts/gpu/stage_slurm_debs.sh" \
        "on the CPU box and carry .slurm"
    rm -rf "$PREFIX/root" && mkdir -p "$PREFIX/root" "$PREFIX/sbin" "$PREFIX/bin" "$PREFIX/missing-libs"
    for deb in "$DEBS"/*.deb; do dpkg -x "$deb" "$PREFIX/root"; done
    local usr=$PREFIX/root/usr
    ln -sf "$usr/sbin/slurmctld-wlm" "$PREFIX/sbin/slurmctld"
    ln -sf "$usr/sbin/slurmd-wlm" "$PREFIX/sbin/slurmd"
    ln -sf "$usr/sbin/slurmstepd-wlm" "$PREFIX/sbin/slurmstepd"
    ln -sf "$usr/sbin/munged" "$PREFIX/sbin/munged"
    for tool in sbatch srun scontrol scancel squeue sinfo munge unmunge; do
        ln -sf "$usr/bin/$tool" "$PREFIX/bin/$tool"
    done
    ln -sfn "$PREFIX/sbin" "$STEPD_LINK"
    python3 - "$usr/lib/x86_64-linux-gnu/slurm-wlm/libslurmfull.so" "$STEPD_LINK" <<'PY'
import sys
path, link = sys.argv[1], sys.argv[2].encode()
old = b"/usr/sbin\x00%s/slurmstepd"
data = open(path, "rb").read()
if data.count(old) != 1 or len(link) != len(b"/usr/sbin"):
    sys.exit(f"{path}: expected one '/usr/sbin' slurmstepd path to patch, found {data.count(old)}")
open(path, "wb").write(data.replace(old, link + old[len(b"/usr/sbin"):]))
PY
}

# find_missing_libs: copy into missing-libs every library ldd cannot find on this system.
find_missing_libs() {
    local slurmlib=$PREFIX/root/usr/lib/x86_64-linux-gnu/slurm-wlm round missing name src
    for round in 1 2 3 4; do
        missing=$(find "$PREFIX/root/usr/sbin" "$PREFIX/root/usr/bin" "$slurmlib" "$PREFIX/missing-libs" \
                    -type f -exec sh -c 'LD_LIBRARY_PATH=$0 ldd "$1" 2>/dev/null' \
                    "$slurmlib:$PREFIX/missing-libs" {} \; | awk '/not found/ {print $1}' | sort -u)
        [ -z "$missing" ] && return 0
        for name in $missing; do
            src=$(find "$PREFIX/root" -name "$name" | head -n 1)
            [ -n "$src" ] || die "library $name needed but not staged (nor on this system)"
            log "using the staged $name (not on this system)"
            cp -L "$src" "$PREFIX/missing-libs/"
        done
    done
}

write_env() {
    cat >"$PREFIX/env.sh" <<ENV
# written by scripts/gpu/local_slurm.sh: the private Slurm's commands and config
export PATH=$PREFIX/bin:$PREFIX/sbin:\$PATH
export LD_LIBRARY_PATH=$PREFIX/root/usr/lib/x86_64-linux-gnu/slurm-wlm:$PREFIX/missing-libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export SLURM_CONF=$PREFIX/etc/slurm.conf
ENV
}

start_munge() {
    mkdir -p "$PREFIX/etc" "$PREFIX/run/munge" "$PREFIX/log" "$PREFIX/state"
    chmod 0755 "$PREFIX" "$PREFIX/run" "$PREFIX/run/munge"
    dd if=/dev/urandom of="$PREFIX/etc/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$PREFIX/etc/munge.key"
    "$PREFIX/sbin/munged" --force --socket="$PREFIX/run/munge/munge.socket.2" \
        --key-file="$PREFIX/etc/munge.key" --pid-file="$PREFIX/run/munged.pid" \
        --log-file="$PREFIX/log/munged.log" --seed-file="$PREFIX/state/munged.seed" \
        || { tail -5 "$PREFIX/log/munged.log" >&2; die "munged did not start"; }
    munge -S "$PREFIX/run/munge/munge.socket.2" -n | unmunge -S "$PREFIX/run/munge/munge.socket.2" \
        >/dev/null || die "munge round trip failed"
}

# gpu_files GPUS_PER_NODE: /dev/nvidiaN for both nodes, or fake files on a machine without GPUs.
gpu_files() {
    local total=$(( $1 * 2 )) dir=/dev i
    if [ ! -e /dev/nvidia$((total - 1)) ]; then
        dir=$PREFIX/dev; mkdir -p "$dir"
        log "no /dev/nvidia$((total - 1)): stand-in GPU device nodes in $dir (a CPU dry run)"
        for i in $(seq 0 $((total - 1))); do
            rm -f "$dir/nvidia$i"; mknod "$dir/nvidia$i" c 195 "$i" || die "mknod $dir/nvidia$i failed"
        done
    fi
    echo "$dir"
}

# write_task_prolog GPUS_PER_NODE: Slurm numbers each node's GPUs from 0 (on a real cluster
# every node has its own 0..n-1); two nodes on one host must not both take GPUs 0..n-1, so the
# task prolog shifts the second node's CUDA_VISIBLE_DEVICES by GPUS_PER_NODE.
write_task_prolog() {
    cat >"$PREFIX/etc/task_prolog.sh" <<PROLOG
#!/bin/bash
# Written by scripts/gpu/local_slurm.sh: node-local GPU indexes -> this host's device numbers.
case "\$SLURMD_NODENAME" in ${NODES[1]}) base=$1 ;; *) base=0 ;; esac
if [ -n "\${CUDA_VISIBLE_DEVICES:-}" ]; then
    ids=""
    for i in \${CUDA_VISIBLE_DEVICES//,/ }; do ids="\${ids:+\$ids,}\$((i + base))"; done
    echo "export CUDA_VISIBLE_DEVICES=\$ids"
fi
PROLOG
    chmod 0755 "$PREFIX/etc/task_prolog.sh"
}

write_conf() {
    local gpus=$1 devdir cpus mem host
    devdir=$(gpu_files "$gpus")
    write_task_prolog "$gpus"
    cpus=$(( $(nproc) / 2 )); [ "$cpus" -ge 1 ] || cpus=1
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.4)}' /proc/meminfo)
    host=$(hostname -s)
    mkdir -p "$PREFIX/etc" "$PREFIX/spool" "$PREFIX/state/ctld"
    # slurmd loads a cgroup plugin even with proctrack/linuxproc and task/none; on a cgroup v2
    # host without systemd it would ask systemd (dbus) for a scope: make the directories itself.
    printf 'IgnoreSystemd=yes\nIgnoreSystemdOnFailure=yes\n' >"$PREFIX/etc/cgroup.conf"
    cat >"$PREFIX/etc/gres.conf" <<GRES
NodeName=${NODES[0]} Name=gpu File=$devdir/nvidia[0-$((gpus - 1))]
NodeName=${NODES[1]} Name=gpu File=$devdir/nvidia[$gpus-$((2 * gpus - 1))]
GRES
    cat >"$PREFIX/etc/slurm.conf" <<CONF
# Written by scripts/gpu/local_slurm.sh: 2 nodes on one host (two slurmd), $gpus GPU(s) each.
ClusterName=fp8local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTL_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$PREFIX/run/munge/munge.socket.2,cred_expire=10
PluginDir=$PREFIX/root/usr/lib/x86_64-linux-gnu/slurm-wlm
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
TaskProlog=$PREFIX/etc/task_prolog.sh
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
ReturnToService=2
StateSaveLocation=$PREFIX/state/ctld
SlurmdSpoolDir=$PREFIX/spool/%n
SlurmctldPidFile=$PREFIX/run/slurmctld.pid
SlurmdPidFile=$PREFIX/run/slurmd-%n.pid
SlurmctldLogFile=$PREFIX/log/slurmctld.log
SlurmdLogFile=$PREFIX/log/slurmd-%n.log
MinJobAge=600
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=60
NodeName=${NODES[0]} NodeHostname=${NODES[0]} NodeAddr=127.0.0.1 Port=$((CTL_PORT + 1)) CPUs=$cpus RealMemory=$mem Gres=gpu:$gpus State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=${NODES[1]} NodeAddr=127.0.0.1 Port=$((CTL_PORT + 2)) CPUs=$cpus RealMemory=$mem Gres=gpu:$gpus State=UNKNOWN
PartitionName=gpu Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
}

wait_idle() {
    local states=""
    for _ in $(seq 60); do
        states=$(sinfo -h -N -o '%N %t %G' 2>/dev/null || true)
        if [ "$(grep -c ' idle ' <<<"$states")" = 2 ]; then log "cluster up: $(tr '\n' ';' <<<"$states")"; return; fi
        sleep 0.5
    done
    tail -n 20 "$PREFIX"/log/*.log >&2 || true
    die "nodes not idle after 30 s (sinfo: ${states:-no answer}); logs above"
}

prepare_cgroup_v2() {
    # Slurm 22.05's cgroup/v2 plugin (loaded by slurmd whatever the proctrack/task plugins) makes
    # /sys/fs/cgroup/system.slice/<node>_slurmstepd.scope itself under IgnoreSystemd, but not
    # system.slice: on a host without systemd (the GPU box) slurmd died with "Could not create scope
    # directory ... No such file or directory". Make the slice and offer it the controllers.
    [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = cgroup2fs ] || return 0
    mkdir -p /sys/fs/cgroup/system.slice 2>/dev/null || log "cannot create /sys/fs/cgroup/system.slice (read-only cgroup fs?)"
    local c
    for c in cpuset cpu memory; do
        echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
        echo "+$c" >/sys/fs/cgroup/system.slice/cgroup.subtree_control 2>/dev/null || true
    done
}

up() {
    local gpus=${1:-2} t0=$SECONDS node
    [ "$(id -u)" = 0 ] || die "run as root (slurmd starts job steps as the submitting user)"
    [[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE=$gpus: need a positive integer"
    getent hosts "${NODES[0]}" >/dev/null || die "this host's name ${NODES[0]} does not resolve" \
        "(getent hosts): the job's rendezvous endpoint would not either; use the torchrun fallback"
    down 2>/dev/null || true
    unpack
    find_missing_libs
    write_env
    # shellcheck disable=SC1091
    source "$PREFIX/env.sh"
    start_munge
    write_conf "$gpus"
    prepare_cgroup_v2
    slurmctld || { tail -20 "$PREFIX/log/slurmctld.log" >&2; die "slurmctld did not start"; }
    for node in "${NODES[@]}"; do
        mkdir -p "$PREFIX/spool/$node"
        slurmd -N "$node" || { tail -20 "$PREFIX/log/slurmd-$node.log" >&2; die "slurmd $node did not start"; }
    done
    wait_idle
    log "ready in $((SECONDS - t0)) s: 2 nodes x $gpus GPU(s); now: source $PREFIX/env.sh"
}

down() {
    [ -f "$PREFIX/env.sh" ] || return 0
    # shellcheck disable=SC1091
    source "$PREFIX/env.sh"
    if pid_alive "$PREFIX/run/slurmctld.pid"; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
        if [ -n "${jobs// /}" ]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 30); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 1; done
        fi
    fi
    for f in "$PREFIX"/run/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "$f" "slurmd $(basename "$f" .pid)"; done
    stop_pidfile "$PREFIX/run/slurmctld.pid" slurmctld
    stop_pidfile "$PREFIX/run/munged.pid" munged
    [ -L "$STEPD_LINK" ] && rm -f "$STEPD_LINK"
    return 0
}

case "${1:-}" in
    up) up "${2:-2}" ;;
    down) down ;;
    *) die "usage: $0 up [GPUS_PER_NODE] | down" ;;
esac
