"""A sweep logging over http to a real MLflow server started by the project's recipe
(cluster/mlflow-server.sh), with the server restarted mid-sweep:
nothing is lost (every epoch of every trial, the parent's artifacts), and the sweep never
stops for the outage."""
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import free_port, parent_run, stage, sweep_dict, trial_runs, write_sweep
from tests.test_tracking import start_server, stop_server

pytestmark = pytest.mark.heavy


def test_sweep_over_http_survives_a_server_restart(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path / "server", port)
    epochs = 4
    sweep = sweep_dict("over_http", output="runs/h", n=30, seed=4, labels=("LVEDV", "ESED"), privacy={"accountant": "prv"},
                       cluster={"max_concurrent_trials": 1}, tracking={"uri": uri},
                       stages=[stage(train={"epochs": epochs, "batch_size": 8, "physical_batch_size": 4},
                                     eval={"n_samples": 4})])
    path = write_sweep(tmp_path, sweep, "s.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.launch", str(path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = MlflowClient(tracking_uri=uri)
        deadline = time.time() + 600
        logged = 0
        while logged < 1 and time.time() < deadline and proc.poll() is None:
            time.sleep(1)
            runs = trial_runs(client, "over_http")
            logged = max([len(client.get_metric_history(r.info.run_id, "val/loss")) for r in runs] or [0])
        assert proc.poll() is None, "the sweep ended before the server could be restarted"
        stop_server(server)
        time.sleep(15)   # the sweep trains on while nothing answers
        server = start_server(tmp_path / "server", port)
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-4000:]
        assert "unreachable" in out and "is back" in out

        parent, trials = parent_run(client, "over_http"), trial_runs(client, "over_http")
        assert len(trials) == 1
        for run in trials:
            assert run.info.status == "FINISHED"
            steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "privacy/epsilon")})
            assert steps == list(range(1, epochs + 1)), "epochs logged during the outage were lost"
            assert "fidelity/ssim" in run.data.metrics and "privacy/epsilon_total" in run.data.metrics
        names = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"sweep.yaml", "privacy_ledger.json", "report"} <= names
        # artifacts went over http into the server's own artifact store
        assert list((tmp_path / "server" / "artifacts").rglob("privacy_ledger.json"))
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_server(server)
