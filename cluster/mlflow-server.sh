#!/usr/bin/env bash
# Start an MLflow tracking server for studies run on a cluster.
#
#   cluster/mlflow-server.sh                                   # SQLite + artifacts under ./mlflow-server
#   MLFLOW_DIR=/shared/mlflow cluster/mlflow-server.sh
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db-host/mlflow cluster/mlflow-server.sh
#   MLFLOW_HOST=10.0.0.5 MLFLOW_ALLOWED_HOSTS=10.0.0.5:5000 cluster/mlflow-server.sh   # see the warning
#
# Runs in the foreground (Ctrl-C or SIGTERM stops it); run it under nohup/tmux/systemd, or in
# the background of a batch script. Prints the `tracking:` line to put in the sweep file.
#
# Artifacts go through the server (--serve-artifacts): clients upload and download them over
# HTTP and never need the artifact folder mounted; the server writes them under
# MLFLOW_ARTIFACTS_DESTINATION (a local folder, or s3://..., gs://... with that client installed).
#
# Who talks to MLflow: only `python -m orchestrator.launch` (its Tune callback logs every
# trial, reading artifacts from the shared `output` folder). So the default, a server on the
# node that runs the launch bound to 127.0.0.1, is reachable by everything that needs it.
# From a laptop: ssh -N -L 5000:127.0.0.1:5000 THAT_NODE, then http://127.0.0.1:5000.
#
# Settings (environment):
#   MLFLOW_DIR                    folder for the SQLite db and artifacts       [./mlflow-server]
#   MLFLOW_BACKEND_STORE_URI      runs, params, metrics                         [sqlite:///$MLFLOW_DIR/mlflow.db]
#                                 PostgreSQL: postgresql://USER@HOST:5432/DB (pip install psycopg2-binary;
#                                 the password from ~/.pgpass or PGPASSWORD, not on the command line)
#   MLFLOW_ARTIFACTS_DESTINATION  where the server stores artifacts            [$MLFLOW_DIR/artifacts]
#   MLFLOW_HOST                   interface to listen on                        [127.0.0.1]
#   MLFLOW_PORT                                                                [5000]
#   MLFLOW_WORKERS                server worker processes                       [2]
#   MLFLOW_ALLOWED_HOSTS          Host headers accepted (mlflow --allowed-hosts) [MLflow's default:
#                                 localhost and private IPs]; set it to the name clients use, e.g.
#                                 mlflow.internal:5000, when they use a name
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's background job runner (GenAI features this
#                                 project does not use; 7 more processes)      [false]
# Extra arguments are passed to `mlflow server`.
set -euo pipefail

MLFLOW_DIR=${MLFLOW_DIR:-$PWD/mlflow-server}
MLFLOW_BACKEND_STORE_URI=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$MLFLOW_DIR/mlflow.db}
MLFLOW_ARTIFACTS_DESTINATION=${MLFLOW_ARTIFACTS_DESTINATION:-$MLFLOW_DIR/artifacts}
MLFLOW_HOST=${MLFLOW_HOST:-127.0.0.1}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
MLFLOW_WORKERS=${MLFLOW_WORKERS:-2}
MLFLOW_ALLOWED_HOSTS=${MLFLOW_ALLOWED_HOSTS:-}
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

redact() {  # scheme://user:password@host -> scheme://user:***@host
    sed -E 's#(://[^:/@]+):[^@/]*@#\1:***@#' <<<"$1"
}

mkdir -p "$MLFLOW_DIR"
case "$MLFLOW_ARTIFACTS_DESTINATION" in
    *://*) ;;
    *) mkdir -p "$MLFLOW_ARTIFACTS_DESTINATION"
       MLFLOW_ARTIFACTS_DESTINATION=$(cd "$MLFLOW_ARTIFACTS_DESTINATION" && pwd) ;;
esac

case "$MLFLOW_HOST" in
    127.*|localhost|::1) url_host=$MLFLOW_HOST ;;
    *)
        echo "warning: MLflow listens on $MLFLOW_HOST:$MLFLOW_PORT, reachable from other machines;" \
             "it has no authentication by default: anyone who reaches the port can read and change" \
             "every run. Prefer 127.0.0.1 and an SSH tunnel, or a firewall that admits only the" \
             "cluster's nodes." >&2
        if [[ "$MLFLOW_HOST" == 0.0.0.0 || "$MLFLOW_HOST" == "::" ]]; then
            url_host=$(hostname -f 2>/dev/null || hostname)
        else
            url_host=$MLFLOW_HOST
        fi
        [[ "$url_host" == *:* ]] && url_host="[$url_host]" ;;
esac

args=(server
      --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
      --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
      --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS")
[[ -n "$MLFLOW_ALLOWED_HOSTS" ]] && args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")

echo "MLflow server: http://$url_host:$MLFLOW_PORT"
echo "  backend store: $(redact "$MLFLOW_BACKEND_STORE_URI")"
echo "  artifacts:     $MLFLOW_ARTIFACTS_DESTINATION (served through the server)"
echo "put this in the sweep file (or export MLFLOW_TRACKING_URI for cluster/slurm.sbatch):"
echo "  tracking: {uri: http://$url_host:$MLFLOW_PORT}"
# exec: the server takes this script's PID, so a signal to it reaches the server
exec mlflow "${args[@]}" "$@"
