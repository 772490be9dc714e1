# shellcheck shell=bash
# Start, join, wait for and stop a Ray cluster over a SLURM allocation.
#
# Sourced by cluster/slurm.sbatch; not run on its own. Every setting is an environment
# variable read when a function runs, so a caller (the batch script, or a test) sets them
# before calling:
#
#   source cluster/ray_slurm.sh
#   start_head "$head_node"                 # ray start --head --block, in the background
#   start_worker "$node"                    # ray start --address HEAD --block, in the background
#   wait_for_nodes "$n" 300                 # until n nodes are alive in the cluster (or fail)
#   ...                                     # run drivers against "$RAY_HEAD_ADDRESS"
#   stop_all                                # SIGTERM every launcher started here, then SIGKILL
#
# RAY_SLURM_LAUNCH is the command that runs a command on one node; the node name follows it,
# then the command. Under SLURM it is `srun --nodes=1 --ntasks=1 -w` (one job step per
# node). On one machine, `RAY_SLURM_LAUNCH=ray_slurm_local_launch` ignores the node name and
# runs the command here, so "nodes" are local `ray start` processes (Ray allows several
# raylets on one host): the head's RAY_PORT, RAY_DASHBOARD_PORT and RAY_CLIENT_PORT must be
# free (other Rays on the machine use the defaults); per-node ports can be pinned with
# RAY_HEAD_ARGS / RAY_WORKER_ARGS; one RAY_TEMP_DIR serves all. That is how
# tests/test_cluster_recipes.py exercises this file.
#
# Only processes started through these functions are ever signalled: stop_all never runs
# `ray stop` (which would stop every Ray of this user on the node, other jobs' included).

# --- settings (defaults; set any of them before calling) ---------------------------------
#  RAY_SLURM_LAUNCH   launcher + options, the node name is appended   [srun --nodes=1 --ntasks=1 -w]
#  RAY_SLURM_NODES    nodes, space separated                          [scontrol show hostnames $SLURM_JOB_NODELIST]
#  RAY_HEAD_IP        IP the workers and drivers use to reach the head [hostname --ip-address on the head]
#  RAY_PORT           GCS port of the head                            [6379]
#  RAY_NUM_CPUS       CPUs Ray declares per node                      [$SLURM_CPUS_PER_TASK, else Ray detects]
#  RAY_NUM_GPUS       GPUs Ray declares per node                      [$SLURM_GPUS_PER_TASK or $SLURM_GPUS_ON_NODE, else Ray detects]
#  RAY_TEMP_DIR       session/log/socket root on every node (short!)  [unset: Ray's /tmp/ray; slurm.sbatch: /tmp/ray-$SLURM_JOB_ID]
#  RAY_DASHBOARD_HOST where the head's dashboard listens              [127.0.0.1]
#  RAY_DASHBOARD_PORT                                                 [8265]
#  RAY_CLIENT_PORT    Ray Client server on the head (ray://head:PORT) [10001]
#  RAY_NODE_MANAGER_PORT, RAY_OBJECT_MANAGER_PORT, RAY_MIN_WORKER_PORT, RAY_MAX_WORKER_PORT
#                     fixed ports for firewalled networks             [unset: Ray picks]
#  RAY_HEAD_ARGS      extra `ray start` flags for the head            []
#  RAY_WORKER_ARGS    extra `ray start` flags for each worker         []
#  RAY_STOP_TIMEOUT   seconds stop_all waits after SIGTERM            [45; Ray drains up to 30]
#  RAY_SLURM_LOG_DIR  where each launcher's stdout/stderr goes        [$RAY_TEMP_DIR, else /tmp]
# Token authentication: Ray reads the cluster token from ~/.ray/auth_token (or
# RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN); every node must see the same token, e.g. a home
# directory shared by all nodes. Set RAY_AUTH_MODE=token (or disabled) explicitly: a
# joining `ray start` does not guess it.

# PIDs (on this host) of the launchers started here: srun steps, or local `ray start --block`.
RAY_SLURM_PIDS=()

ray_slurm_local_launch() {
    # Launcher for one machine: drop the node name, run the command here. `exec` makes the
    # background job's PID the command's own, so stop_all signals `ray start` itself, and
    # `setsid` makes it a process group that stop_all's SIGKILL fallback can take down whole.
    shift
    exec setsid "$@"
}

_ray_slurm_launch() {
    # _ray_slurm_launch NODE CMD...: run CMD on NODE through RAY_SLURM_LAUNCH.
    local node=$1
    shift
    # shellcheck disable=SC2086  # the launcher is a command line, split on purpose
    ${RAY_SLURM_LAUNCH:-srun --nodes=1 --ntasks=1 -w} "$node" "$@"
}

ray_slurm_nodes() {
    if [[ -n "${RAY_SLURM_NODES:-}" ]]; then
        echo "$RAY_SLURM_NODES"
    else
        scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM allocation: set RAY_SLURM_NODES}" | tr '\n' ' '
    fi
}

_ray_slurm_count() {
    # digits after the last colon: SLURM_GPUS_PER_TASK may read `a100:2`
    local v=${1##*:}
    [[ "$v" =~ ^[0-9]+$ ]] && echo "$v"
}

_ray_slurm_resource_args() {
    local cpus=${RAY_NUM_CPUS:-${SLURM_CPUS_PER_TASK:-}}
    local gpus=${RAY_NUM_GPUS:-$(_ray_slurm_count "${SLURM_GPUS_PER_TASK:-${SLURM_GPUS_ON_NODE:-}}")}
    [[ -n "$cpus" ]] && printf -- '--num-cpus=%s\n' "$cpus"
    [[ -n "$gpus" ]] && printf -- '--num-gpus=%s\n' "$gpus"
    [[ -n "${RAY_TEMP_DIR:-}" ]] && printf -- '--temp-dir=%s\n' "$RAY_TEMP_DIR"
    [[ -n "${RAY_NODE_MANAGER_PORT:-}" ]] && printf -- '--node-manager-port=%s\n' "$RAY_NODE_MANAGER_PORT"
    [[ -n "${RAY_OBJECT_MANAGER_PORT:-}" ]] && printf -- '--object-manager-port=%s\n' "$RAY_OBJECT_MANAGER_PORT"
    [[ -n "${RAY_MIN_WORKER_PORT:-}" ]] && printf -- '--min-worker-port=%s\n' "$RAY_MIN_WORKER_PORT"
    [[ -n "${RAY_MAX_WORKER_PORT:-}" ]] && printf -- '--max-worker-port=%s\n' "$RAY_MAX_WORKER_PORT"
    return 0
}

ray_slurm_head_ip() {
    # ray_slurm_head_ip NODE: the address other nodes reach NODE at.
    if [[ -n "${RAY_HEAD_IP:-}" ]]; then
        echo "$RAY_HEAD_IP"
        return
    fi
    local ip
    ip=$(_ray_slurm_launch "$1" hostname --ip-address | awk '{print $1}')
    if [[ -z "$ip" || "$ip" == 127.* || "$ip" == "::1" ]]; then
        # /etc/hosts maps the hostname to loopback on some systems: ask the interfaces
        ip=$(_ray_slurm_launch "$1" hostname -I | awk '{print $1}')
    fi
    echo "$ip"
}

_ray_slurm_log() {
    local dir=${RAY_SLURM_LOG_DIR:-${RAY_TEMP_DIR:-/tmp}}
    mkdir -p "$dir"
    echo "$dir/ray-slurm-$1.log"
}

start_head() {
    # start_head NODE: `ray start --head --block` on NODE in the background; sets and
    # exports RAY_HEAD_ADDRESS (ip:port), the address workers and drivers use.
    local node=$1
    local ip
    ip=$(ray_slurm_head_ip "$node")
    if [[ -z "$ip" ]]; then
        echo "ray_slurm: could not find the IP of head node $node (set RAY_HEAD_IP)" >&2
        return 1
    fi
    export RAY_HEAD_ADDRESS="$ip:${RAY_PORT:-6379}"
    local args
    mapfile -t args < <(_ray_slurm_resource_args)
    # shellcheck disable=SC2206  # RAY_HEAD_ARGS is a list of flags, split on purpose
    args+=(--dashboard-host="${RAY_DASHBOARD_HOST:-127.0.0.1}" --dashboard-port="${RAY_DASHBOARD_PORT:-8265}"
           --ray-client-server-port="${RAY_CLIENT_PORT:-10001}" ${RAY_HEAD_ARGS:-})
    local log
    log=$(_ray_slurm_log "head-$node")
    echo "ray_slurm: head on $node at $RAY_HEAD_ADDRESS (log: $log)"
    _ray_slurm_launch "$node" ray start --head --block --node-ip-address="$ip" \
        --port="${RAY_PORT:-6379}" "${args[@]}" >"$log" 2>&1 &
    RAY_SLURM_PIDS+=($!)
}

start_worker() {
    # start_worker NODE: `ray start --address $RAY_HEAD_ADDRESS --block` on NODE in the background.
    local node=$1
    : "${RAY_HEAD_ADDRESS:?start_head first (or set RAY_HEAD_ADDRESS=ip:port)}"
    local args
    mapfile -t args < <(_ray_slurm_resource_args)
    # shellcheck disable=SC2206
    args+=(${RAY_WORKER_ARGS:-})
    local log
    log=$(_ray_slurm_log "worker-$node")
    echo "ray_slurm: worker on $node joins $RAY_HEAD_ADDRESS (log: $log)"
    _ray_slurm_launch "$node" ray start --address="$RAY_HEAD_ADDRESS" --block "${args[@]}" >"$log" 2>&1 &
    RAY_SLURM_PIDS+=($!)
}

wait_for_nodes() {
    # wait_for_nodes N [TIMEOUT_S]: return 0 once N nodes are alive in the cluster at
    # RAY_HEAD_ADDRESS; 1 on timeout or when a launcher started here has exited.
    local want=$1 timeout=${2:-300}
    RAY_SLURM_WANT=$want RAY_SLURM_TIMEOUT=$timeout RAY_SLURM_WATCH="${RAY_SLURM_PIDS[*]}" \
    python - <<'PY'
import os, socket, sys, time
want, deadline = int(os.environ["RAY_SLURM_WANT"]), time.monotonic() + float(os.environ["RAY_SLURM_TIMEOUT"])
address, pids = os.environ["RAY_HEAD_ADDRESS"], [int(p) for p in os.environ["RAY_SLURM_WATCH"].split()]
host, port = address.rsplit(":", 1)

def launchers_alive():
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"ray_slurm: launcher {pid} exited before the cluster was up (see its log)", file=sys.stderr)
            return False
        except PermissionError:
            pass
    return True

def gcs_listening():
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
        return True
    except OSError:
        return False

import ray

connected, last = False, None
while time.monotonic() < deadline and launchers_alive():
    try:
        if not connected and gcs_listening():
            ray.init(address=address, log_to_driver=False, logging_level="ERROR", configure_logging=False)
            connected = True
        if connected:
            alive = sum(1 for n in ray.nodes() if n["Alive"])
            if alive != last:
                print(f"ray_slurm: {alive}/{want} nodes alive", flush=True)
                last = alive
            if alive >= want:
                sys.exit(0)
    except Exception as exc:  # the GCS is starting, or went away: retry until the deadline
        print(f"ray_slurm: waiting for the head ({type(exc).__name__}: {exc})", flush=True)
        ray.shutdown()
        connected = False
    time.sleep(1)
print(f"ray_slurm: fewer than {want} nodes alive at {address} in time", file=sys.stderr)
sys.exit(1)
PY
}

stop_all() {
    # SIGTERM every launcher started here (srun forwards it to its step; `ray start --block`
    # drains and stops the Ray processes it started), wait, then SIGKILL what is left.
    local pid deadline
    ((${#RAY_SLURM_PIDS[@]})) || return 0
    echo "ray_slurm: stopping Ray (${#RAY_SLURM_PIDS[@]} launchers)"
    # workers first, the head last
    for ((i = ${#RAY_SLURM_PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${RAY_SLURM_PIDS[i]}" 2>/dev/null
    done
    deadline=$((SECONDS + ${RAY_STOP_TIMEOUT:-45}))
    for pid in "${RAY_SLURM_PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "ray_slurm: launcher $pid still running after SIGTERM; SIGKILL" >&2
            # its process group when it leads one (local launcher), else the launcher alone
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
        fi
        wait "$pid" 2>/dev/null
    done
    RAY_SLURM_PIDS=()
}
