#!/usr/bin/env bash
# Stop the local CI Slurm cluster started by setup.sh: cancel its jobs, stop slurmd(s) and
# slurmctld by the pids in their pid files, stop munged if setup.sh started it, and remove
# the node network namespaces and the bridge. Packages, slurm.conf and the controller
# state (job id counter) stay.
#
#   bash .ci/slurm/teardown.sh [--keep-munge]
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
KEEP_MUNGE=0
[ "${1:-}" = --keep-munge ] && KEEP_MUNGE=1

# Cancel what is still queued or running, so no job step outlives its slurmd.
if pid_alive "$FP8_SLURM_STATE/slurmctld.pid"; then
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        for _ in $(seq 30); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 1; done
    fi
fi

for f in "$FP8_SLURM_STATE"/slurmd-*.pid; do
    [ -e "$f" ] && stop_pidfile "$f" "slurmd $(basename "$f" .pid)"
done
stop_pidfile "$FP8_SLURM_STATE/slurmctld.pid" slurmctld

if [ "$KEEP_MUNGE" = 0 ] && [ -e "$FP8_SLURM_STATE/munged.ours" ]; then
    stop_pidfile /run/munge/munged.pid munged
    rm -f "$FP8_SLURM_STATE/munged.ours"
fi

for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$FP8_NODE_PREFIX" || true); do
    log "removing network namespace $ns"
    ip netns del "$ns" 2>/dev/null
    rm -rf "/etc/netns/$ns"
done
ip link del "$FP8_BRIDGE" 2>/dev/null && log "removed bridge $FP8_BRIDGE"
rm -f "$FP8_SLURM_STATE/mode"
exit 0
