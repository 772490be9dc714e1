"""MLflow over http: an unreachable server is one clear error before anything trains;
credentials never reach logs. Helpers to run a real `mlflow server` on loopback (used by
tests/test_mlflow_server.py, where the server restarts mid-sweep)."""
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests

from orchestrator.errors import ConfigError
from orchestrator.tracking import check_reachable, redact
from tests.helpers import free_port


REPO = Path(__file__).resolve().parents[1]


def start_server(tmp_path, port):
    """The project's own server recipe (cluster/mlflow-server.sh) on a loopback port."""
    env = {**os.environ, "MLFLOW_DIR": str(tmp_path), "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1",
           "MLFLOW_HOST": "127.0.0.1"}
    for key in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    proc = subprocess.Popen(["bash", str(REPO / "cluster" / "mlflow-server.sh")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except requests.exceptions.RequestException:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError("mlflow server did not start")


def stop_server(proc):
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_unreachable_server_is_one_clear_error():
    with pytest.raises(ConfigError) as err:
        check_reachable(f"http://user:secret@127.0.0.1:{free_port()}")
    msg = str(err.value)
    assert msg.startswith("tracking.uri: ") and "does not answer" in msg and "secret" not in msg


def test_redact_hides_credentials_only():
    assert redact("http://bob:pw@h:5000/x") == "http://***@h:5000/x"
    assert redact("postgresql://u:p@db/mlflow") == "postgresql://***@db/mlflow"
    assert redact("sqlite:////tmp/a@b/mlflow.db") == "sqlite:////tmp/a@b/mlflow.db"


def test_launch_with_unreachable_tracking_server_stops_before_training(tmp_path, capsys):
    import yaml

    from orchestrator.launch import main

    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "x", "output": str(tmp_path / "out"),
                                     "tracking": {"uri": f"http://127.0.0.1:{free_port()}"},
                                     "stages": [{"name": "a"}]}))
    assert main([str(sweep)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: tracking.uri: ")
    assert not (tmp_path / "out" / "launch.json").exists()


def test_an_unbounded_patient_epsilon_replaces_the_finite_one_before_it(tmp_path, capsys):
    """Group privacy finds no finite patient-level bound once the record-level epsilon is
    large (the privacy_cost study's epsilon-10 trials from their third epoch). That inf must
    be the trial's latest `privacy/epsilon_subject` in MLflow and on the console: dropped as
    non-finite, the epoch before's 46.96 stood as the patient's epsilon (an under-report)."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from orchestrator.progress import ConsoleProgress
    from orchestrator.report import _number
    from orchestrator.tracking import MlflowTrialLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e")
    parent = client.create_run(exp).info.run_id
    logger = MlflowTrialLogger(uri=uri, experiment_id=exp, parent_run_id=parent, stage="dp", model="ldm", dp=True)
    console = ConsoleProgress("dp", 2, [], False, "val/loss")
    trial = SimpleNamespace(trial_id="t1", config={"stage": {"dp": {"enabled": True}}}, last_result=None)
    logger.on_trial_start(0, [], trial)
    for epoch, subject in ((1, 46.96), (2, float("inf"))):
        result = {"epoch": epoch, "train/loss": 0.1, "val/loss": 0.1, "privacy/epsilon": 5.0 * epoch,
                  "privacy/epsilon_subject": subject, "fidelity/fd": float("nan"), "privacy.group_size": 4}
        logger.on_trial_result(0, [], trial, result)
        console.on_trial_result(0, [], trial, result)
    trial.last_result = result
    console.on_trial_complete(0, [], trial)
    run = client.search_runs([exp], "tags.`orchestrator.role` = 'trial'")[0]
    assert _number(run.data.metrics["privacy/epsilon_subject"]) == float("inf")
    assert [m.value for m in client.get_metric_history(run.info.run_id, "privacy/epsilon")] == [5.0, 10.0]
    assert "fidelity/fd" not in run.data.metrics   # NaN still never goes
    out = capsys.readouterr().out
    assert "eps_patient=46.96" in out and "eps_patient=inf" in out and "per patient inf" in out
