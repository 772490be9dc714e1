#!/usr/bin/env bash
# What a user sees when they open a study's MLflow store: start `mlflow ui` on it (127.0.0.1,
# a free port), open the experiment in headless Chromium, save a screenshot, stop the server.
#
#   bash cluster/mlflow_screenshot.sh runs/demo/mlflow.db demo mlflow.png [runs|chart]
#
# `runs` (default) shows the experiment's run table, `chart` its chart view. Needs Debian's
# `chromium` package (apt-get install chromium); nothing leaves the machine.
set -euo pipefail
db=$(realpath "$1"); experiment=$2; out=$3; view=${4:-runs}
command -v chromium >/dev/null || { echo "error: chromium not found (apt-get install chromium)" >&2; exit 2; }
uri="sqlite:///$db"
exp_id=$(python - "$uri" "$experiment" <<'EOF'
import sys
from mlflow.tracking import MlflowClient
exp = MlflowClient(tracking_uri=sys.argv[1]).get_experiment_by_name(sys.argv[2])
print(exp.experiment_id if exp else "")
EOF
)
[ -n "$exp_id" ] || { echo "error: no experiment '$experiment' in $db" >&2; exit 2; }
port=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
log=$(mktemp)
mlflow ui --backend-store-uri "$uri" --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 60); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 1
done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "error: mlflow ui did not start:" >&2; cat "$log" >&2; exit 1; }
case $view in
  runs) url="http://127.0.0.1:$port/#/experiments/$exp_id/runs" ;;
  chart) url="http://127.0.0.1:$port/#/experiments/$exp_id/runs?compareRunsMode=CHART" ;;
  *) echo "error: view must be runs or chart, not $view" >&2; exit 2 ;;
esac
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1000 \
  --virtual-time-budget=20000 --screenshot="$(realpath -m "$out")" "$url" >/dev/null 2>&1
echo "$url -> $out"
