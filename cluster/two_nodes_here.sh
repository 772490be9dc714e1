#!/usr/bin/env bash
# Try the cluster path on one machine: an MLflow server over http (cluster/mlflow-server.sh)
# and a two-node Ray cluster (a head and a worker node joining it, with the SLURM recipe's
# own start/join/wait/stop functions from cluster/ray_slurm.sh, `srun` replaced by local
# processes), then the launch joins that cluster, logs over http, and everything is torn
# down at the end.
#
#   bash cluster/two_nodes_here.sh SWEEP.yaml [launch args...]
#   bash cluster/two_nodes_here.sh sweeps/demo.yaml --smoke-test --output runs/two_nodes
#
# Each node declares CPUS_PER_NODE CPUs (default 1). The MLflow server's store and artifacts
# go to WORK (default runs/two_nodes_here); it stays bound to 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP=${1:?usage: bash cluster/two_nodes_here.sh SWEEP.yaml [launch args...]}
shift
WORK=${WORK:-runs/two_nodes_here}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

free_ports() {   # free_ports N: N free TCP ports on this machine
    python - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}
read -r -a P <<<"$(free_ports 16)"

# Ray's socket paths must stay short (108 bytes): a temp dir under /tmp.
export RAY_TEMP_DIR
RAY_TEMP_DIR=$(mktemp -d /tmp/rayXXXX)
export RAY_SLURM_LAUNCH=ray_slurm_local_launch RAY_SLURM_NODES="node0 node1"
export RAY_SLURM_LOG_DIR="$WORK/logs" RAY_NUM_CPUS=${CPUS_PER_NODE:-1} RAY_NUM_GPUS=0
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$RAY_TEMP_DIR/token"
python -c "import secrets; print(secrets.token_hex(32))" >"$RAY_AUTH_TOKEN_PATH"
export RAY_PORT=${P[0]} RAY_DASHBOARD_PORT=${P[1]} RAY_CLIENT_PORT=${P[2]}
flags=(--node-manager-port --object-manager-port --dashboard-agent-listen-port
       --dashboard-agent-grpc-port --runtime-env-agent-port --metrics-export-port)
RAY_HEAD_ARGS="--include-log-monitor=false"
RAY_WORKER_ARGS="--include-log-monitor=false"
for i in "${!flags[@]}"; do   # two raylets on one host: each node its own ports
    RAY_HEAD_ARGS+=" ${flags[$i]}=${P[$((3 + i))]}"
    RAY_WORKER_ARGS+=" ${flags[$i]}=${P[$((9 + i))]}"
done
export RAY_HEAD_ARGS RAY_WORKER_ARGS

MLFLOW_PORT=${P[15]}
MLFLOW_HOST=127.0.0.1 MLFLOW_PORT=$MLFLOW_PORT MLFLOW_DIR="$WORK/mlflow" \
    setsid bash cluster/mlflow-server.sh >"$WORK/mlflow-server.log" 2>&1 &
MLFLOW_PID=$!
disown "$MLFLOW_PID" 2>/dev/null || true

# shellcheck source=cluster/ray_slurm.sh
source cluster/ray_slurm.sh
cleanup() {
    stop_all || true
    kill -TERM -- "-$MLFLOW_PID" 2>/dev/null || true
    sleep 2
    kill -KILL -- "-$MLFLOW_PID" 2>/dev/null || true
    rm -rf "$RAY_TEMP_DIR"
}
trap cleanup EXIT

start_head node0
start_worker node1
wait_for_nodes 2 180
echo "two-node Ray cluster at $RAY_HEAD_ADDRESS"

URI="http://127.0.0.1:$MLFLOW_PORT"
for _ in $(seq 120); do
    python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$URI" \
        2>/dev/null && break
    sleep 1
done
echo "MLflow server at $URI (log: $WORK/mlflow-server.log)"

set +e
python -m orchestrator.launch "$SWEEP" --address "$RAY_HEAD_ADDRESS" --tracking-uri "$URI" "$@"
rc=$?
set -e
echo "launch exited with $rc; MLflow store and artifacts kept in $WORK/mlflow"
exit $rc
