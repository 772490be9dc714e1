"""MLflow over http: a real `mlflow server` on loopback. An outage (server restart) queues
the trial logger's writes without stopping anything; they all arrive once it is back."""
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import requests

from orchestrator.errors import ConfigError
from orchestrator.tracking import MlflowTrialLogger, check_reachable, client_for, ensure_experiment, redact


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path, port):
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
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


@pytest.mark.heavy
def test_logger_survives_a_server_restart(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setattr("orchestrator.tracking.RETRY_EVERY_S", 0.0)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    try:
        client = client_for(uri)
        exp = ensure_experiment(client, "outage", None)
        parent = client.create_run(exp, tags={"orchestrator.role": "sweep"}).info.run_id
        logger = MlflowTrialLogger(uri, exp, parent, stage="s", model="beta_vae", dp=True)
        trial = SimpleNamespace(trial_id="t1", config={"stage": {"train": {"lr": 0.001}}})
        art = tmp_path / "samples.png"
        art.write_bytes(b"\x89PNG fake bytes are fine for an artifact")
        logger.on_trial_start(0, [], trial)
        logger.on_trial_result(0, [], trial, {"epoch": 1, "train/loss": 1.0, "privacy/epsilon": 0.5})

        stop_server(server)
        t0 = time.monotonic()
        for epoch in (2, 3):   # the server is down: queued, the sweep goes on
            logger.on_trial_result(0, [], trial, {"epoch": epoch, "train/loss": 1.0 / epoch,
                                                  "privacy/epsilon": 0.5 * epoch, "privacy.noise_multiplier": 1.1})
        logger._enqueue(trial, "artifact", str(art))
        logger.on_trial_complete(0, [], trial)
        assert time.monotonic() - t0 < 60
        assert logger._pending, "writes made during the outage are queued"

        server = start_server(tmp_path, port)
        assert logger.flush(patience_s=60)
        run_id = logger.run_id(trial)
        history = client_for(uri).get_metric_history(run_id, "privacy/epsilon")
        assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 1.0), (3, 1.5)]
        run = client_for(uri).get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["privacy.noise_multiplier"] == "1.1"
        assert [a.path for a in client_for(uri).list_artifacts(run_id)] == ["samples.png"]
    finally:
        stop_server(server)
