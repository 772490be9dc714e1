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
