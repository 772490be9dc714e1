"""Tiny sweeps end to end: the real CLI, a real local Ray with 2 Train workers per trial
over gloo, real Opacus, results read back through MLflow's client."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.test_privacy import independent_epsilon

pytestmark = pytest.mark.heavy

N, BATCH, EPOCHS = 30, 4, 2   # 24 training volumes -> q = 1/6, 6 steps per epoch; ~2 per rank, often 0


def write_sweep(tmp_path: Path, **stage_overrides) -> Path:
    stage = {
        "name": "ae",
        "model": {"kind": "beta_vae", "channels": [4, 8], "latent_channels": 2, "norm_num_groups": 4},
        "train": {"epochs": EPOCHS, "lr": 1e-3, "batch_size": BATCH, "physical_batch_size": 2, "seed": 0},
        "dp": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0},
        "search": {"method": "grid", "metric": "val/loss", "mode": "min",
                   "parameters": {"dp.noise_multiplier": {"values": [0.8, 1.5]}}},
    }
    stage.update(stage_overrides)
    sweep = {
        "name": "e2e",
        "output": "runs/e2e",
        "data": {"root": "data/phantom", "labels": ["LVEDV", "LVESV", "ESED"], "shape": [5, 16, 16],
                 "synthesize": {"kind": "phantom", "n": N, "seed": 1}},
        "privacy": {"delta": 1e-3, "accountant": "rdp"},
        "cluster": {"workers_per_trial": 2},
        "stages": [stage],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def launch(tmp_path, sweep, *extra):
    proc = subprocess.run([sys.executable, "-m", "orchestrator.launch", str(sweep), *extra], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_trials_two_workers_dp_sweep_lands_in_mlflow(tmp_path):
    sweep = write_sweep(tmp_path)
    proc = launch(tmp_path, sweep)
    assert "summary" in proc.stdout and "Ray dashboard: http://127.0.0.1:" in proc.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs/e2e/mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("orchestrator.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("orchestrator.role") == "trial"]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert "sweep.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]

    n_train = 24
    steps = EPOCHS * math.ceil(n_train / BATCH)
    sigmas = set()
    for run in children:
        tags, params = run.data.tags, run.data.params
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert (tags["orchestrator.stage"], tags["orchestrator.model"], tags["orchestrator.dp"]) == ("ae", "beta_vae", "true")
        assert run.info.status == "FINISHED"
        assert params["train.batch_size"] == str(BATCH) and params["model.latent_channels"] == "2"
        sigma, q = float(params["privacy.noise_multiplier"]), float(params["privacy.sample_rate"])
        assert sigma == float(params["dp.noise_multiplier"])
        sigmas.add(sigma)
        assert q == pytest.approx(BATCH / n_train)
        assert params["privacy.accountant"] == "rdp" and float(params["privacy.delta"]) == 1e-3
        for key in ("train/loss", "val/loss", "privacy/epsilon", "privacy/steps"):
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, EPOCHS + 1)), key
        # every sampling event was a step on both ranks, and epsilon recomputes independently
        assert run.data.metrics["privacy/steps"] == steps
        assert run.data.metrics["privacy/epsilon"] == pytest.approx(
            independent_epsilon(sigma, q, steps, 1e-3, "rdp"), rel=0.01)
    assert sigmas == {0.8, 1.5}
