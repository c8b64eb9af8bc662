#!/usr/bin/env bash
# Install, configure and start a local Slurm cluster for the `slurm` tests (run as root).
#
#   bash .ci/slurm/setup.sh            # two simulated nodes when network namespaces work, else one
#   FP8TRAIN_SLURM_NODES=1 bash .ci/slurm/setup.sh   # force the one-node cluster
#   bash .ci/slurm/teardown.sh         # stop the daemons (by pid) and remove the namespaces
#
# Two-node mode: slurmctld runs in the host namespace on the bridge address 10.77.0.1;
# slurmd for fp8node<i> runs inside `ip netns exec fp8node<i> unshare --uts`, so each node
# has its own IP (10.77.0.1<i>), hostname and /etc/hosts (ip netns bind-mounts
# /etc/netns/<ns>/hosts). Jobs started by that slurmd inherit the namespaces, so a
# 2-node job really rendezvouses over TCP. One-node mode is the recipe of
# ../shared/notes/integration-facts.md: NodeName=$(hostname), everything on the host.
# Rerunning setup.sh restarts the daemons with a fresh config; job ids keep increasing
# because the controller state (StateSaveLocation) is kept.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"

[ "$(id -u)" = 0 ] || die "run as root (it installs packages, writes /etc/slurm and starts daemons)"
NODES=${FP8TRAIN_SLURM_NODES:-auto}
case "$NODES" in auto|1|2) ;; *) die "FP8TRAIN_SLURM_NODES=$NODES: use 1, 2 or auto" ;; esac
HOST=$(hostname -s)

install_packages() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return; fi
    log "installing slurm-wlm and munge (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

# netns_works: can this machine create a network namespace with a veth pair?
netns_works() {
    command -v ip >/dev/null && command -v unshare >/dev/null || return 1
    ip netns add fp8probe 2>/dev/null || return 1
    local ok=0
    ip link add fp8probe0 type veth peer name fp8probe1 2>/dev/null || ok=1
    ip link del fp8probe0 2>/dev/null || true
    ip netns del fp8probe 2>/dev/null || true
    return $ok
}

start_munge() {
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    if pid_alive /run/munge/munged.pid; then log "munged already running"; return; fi
    runuser -u munge -- /usr/sbin/munged
    echo started >"$FP8_SLURM_STATE/munged.ours"   # teardown stops munged only if we started it
    munge -n | unmunge >/dev/null || die "munge round trip failed"
}

# make_node_netns I: namespace fp8node<I> with a veth into the bridge and its own /etc/hosts.
make_node_netns() {
    local i=$1 ns=${FP8_NODE_PREFIX}$1
    ip netns del "$ns" 2>/dev/null || true
    ip link del "fp8veth$i" 2>/dev/null || true
    ip netns add "$ns"
    ip link add "fp8veth$i" type veth peer name "eth$i"
    ip link set "eth$i" netns "$ns"
    ip link set "fp8veth$i" master "$FP8_BRIDGE" up
    ip netns exec "$ns" ip addr add "$FP8_SUBNET_PREFIX.1$i/24" dev "eth$i"
    ip netns exec "$ns" ip link set "eth$i" up
    ip netns exec "$ns" ip link set lo up
    mkdir -p "/etc/netns/$ns"
    { echo "127.0.0.1 localhost"; hosts_lines; } >"/etc/netns/$ns/hosts"
}

hosts_lines() {
    echo "$FP8_SUBNET_PREFIX.1 $HOST"
    for i in $(seq "$NODES"); do echo "$FP8_SUBNET_PREFIX.1$i ${FP8_NODE_PREFIX}$i"; done
}

make_network() {
    ip link del "$FP8_BRIDGE" 2>/dev/null || true
    ip link add name "$FP8_BRIDGE" type bridge
    ip addr add "$FP8_SUBNET_PREFIX.1/24" dev "$FP8_BRIDGE"
    ip link set "$FP8_BRIDGE" up
    for i in $(seq "$NODES"); do make_node_netns "$i"; done
}

# write_conf: slurm.conf for NODES nodes with CPUs=<this machine's cores> each.
write_conf() {
    local cpus mem_mb nodes_line part_nodes ctl
    cpus=$(nproc)
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    mem_mb=$((mem_mb / NODES))
    if [ "$MODE" = netns ]; then
        ctl="$HOST($FP8_SUBNET_PREFIX.1)"
        nodes_line="NodeName=${FP8_NODE_PREFIX}[1-$NODES] NodeAddr=$FP8_SUBNET_PREFIX.1[1-$NODES]"
        part_nodes="${FP8_NODE_PREFIX}[1-$NODES]"
    else
        ctl="$HOST"
        nodes_line="NodeName=$HOST"
        part_nodes="$HOST"
    fi
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$FP8_SLURM_LOGS"
    cat >"$FP8_SLURM_CONF" <<CONF
# Written by fp8train .ci/slurm/setup.sh ($MODE mode, $NODES node(s)); rerun it to regenerate.
ClusterName=fp8ci
SlurmctldHost=$ctl
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$FP8_SLURM_STATE/slurmctld.pid
SlurmdPidFile=$FP8_SLURM_STATE/slurmd-%n.pid
SlurmctldLogFile=$FP8_SLURM_LOGS/slurmctld.log
SlurmdLogFile=$FP8_SLURM_LOGS/slurmd-%n.log
# Completed jobs stay visible to scontrol for 10 minutes (the tests read their state).
MinJobAge=600
# A requeued job may start again only after the step credential lifetime (default 120 s):
# shorten it so the preemption test does not idle for two minutes.
AuthInfo=cred_expire=10
# Schedule every few seconds (defaults: 60 s main loop, 30 s backfill) so CI jobs start fast.
SchedulerParameters=sched_interval=5,bf_interval=5
# Seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or times out.
KillWait=60
$nodes_line CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$FP8_PARTITION Nodes=$part_nodes Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
}

start_slurm() {
    log "starting slurmctld"
    slurmctld
    for i in $(seq "$NODES"); do
        if [ "$MODE" = netns ]; then
            local node=${FP8_NODE_PREFIX}$i
            mkdir -p "/var/spool/slurmd/$node"
            log "starting slurmd for $node in network namespace $node"
            # nsenter rather than `ip netns exec`: the latter remounts /sys, which hides
            # /sys/fs/cgroup, and slurmd 22.05 refuses to start without it. The private
            # mount namespace gives the node its own /etc/hosts.
            nsenter --net="/run/netns/$node" unshare --uts --mount --propagation private \
                sh -c "hostname $node && mount --bind /etc/netns/$node/hosts /etc/hosts \
                       && exec slurmd -N $node" || slurmd_failed "$node"
        else
            mkdir -p "/var/spool/slurmd/$HOST"
            log "starting slurmd for $HOST"
            slurmd || slurmd_failed "$HOST"
        fi
    done
}

slurmd_failed() {
    tail -n 20 "$FP8_SLURM_LOGS/slurmd-$1.log" >&2 || true
    die "slurmd for node $1 did not start (log above)"
}

# registered_since TIME: how many nodes' slurmd registered at or after TIME. sinfo alone is not
# enough: slurmctld restores node states from StateSaveLocation, so a node can read "idle"
# before its new slurmd has started.
registered_since() {
    scontrol show node -o 2>/dev/null | grep -o 'SlurmdStartTime=[0-9T:-]*' | cut -d= -f2 \
        | awk -v t="$1" '$1 >= t' | wc -l
}

# wait_idle TIME: poll until every node's slurmd registered after TIME and sinfo shows it idle
# (30 s), else print the logs and fail.
wait_idle() {
    local states
    for _ in $(seq 60); do
        states=$(sinfo -h -N -o '%N %t' 2>/dev/null || true)
        if [ "$(registered_since "$1")" = "$NODES" ] && [ "$(grep -c ' idle$' <<<"$states")" = "$NODES" ]; then
            log "cluster up: $(tr '\n' ' ' <<<"$states")"
            return
        fi
        sleep 0.5
    done
    tail -n 20 "$FP8_SLURM_LOGS"/*.log >&2 || true
    die "nodes not idle after 30 s (sinfo: ${states:-no answer}); logs above"
}

main() {
    local t0=$SECONDS
    install_packages
    bash "$HERE/teardown.sh" --keep-munge 2>/dev/null || true
    mkdir -p "$FP8_SLURM_STATE"
    if [ "$NODES" != 1 ] && netns_works; then
        MODE=netns; NODES=2
    else
        [ "$NODES" = 2 ] && die "two-node mode asked but network namespaces are not available here"
        MODE=host; NODES=1
    fi
    echo "$MODE $NODES" >"$FP8_SLURM_STATE/mode"
    start_munge
    [ "$MODE" = netns ] && make_network
    write_conf
    local started
    started=$(date +%Y-%m-%dT%H:%M:%S)
    start_slurm
    wait_idle "$started"
    log "ready in $((SECONDS - t0)) s ($MODE mode, $NODES node(s), partition $FP8_PARTITION)"
}

main "$@"
