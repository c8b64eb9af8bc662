# Shared names for the local CI Slurm cluster (sourced by setup.sh and teardown.sh).
#
# The cluster is one slurmctld in the host's network namespace plus one slurmd per
# simulated node. In two-node mode every slurmd lives in its own network namespace
# (`ip netns`) and UTS namespace (its own hostname), wired to a bridge, so torchrun's
# c10d rendezvous and gloo really talk over TCP between two "hosts". All namespaces
# share the file system, like compute nodes sharing a network file system.

FP8_SLURM_STATE=/run/fp8train-slurm          # pid files and the chosen mode
FP8_SLURM_LOGS=/var/log/slurm                # daemon logs (printed when setup fails)
FP8_SLURM_CONF=/etc/slurm/slurm.conf
FP8_BRIDGE=fp8br0                            # bridge joining the node namespaces
FP8_SUBNET_PREFIX=10.77.0                    # controller .1, node i at .1i
FP8_NODE_PREFIX=fp8node                      # node names fp8node1, fp8node2
FP8_PARTITION=debug

log() { echo "[slurm-ci] $*" >&2; }
die() { echo "[slurm-ci] ERROR: $*" >&2; exit 1; }

# pid_alive FILE: true when FILE names a running process.
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_pidfile FILE NAME: SIGTERM the process in FILE, wait up to 10 s, then SIGKILL it.
stop_pidfile() {
    local file=$1 name=$2 pid
    pid_alive "$file" || { rm -f "$file"; return 0; }
    pid=$(cat "$file")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    rm -f "$file"
}
