"""The sweep's privacy books: a random number of trials is drawn once and kept for --resume,
and a stage's tuning cost uses the repeat-and-select bound over what its search can draw."""
import json
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import accounting, ledger
from orchestrator.config import parse_sweep


def test_random_trial_count_is_drawn_once_and_priced_by_repeat_and_select(tmp_path):
    from orchestrator.sweep import trial_count

    cfg = parse_sweep({"name": "rs", "stages": [{
        "name": "ae", "train": {"epochs": 2, "batch_size": 8, "physical_batch_size": 8},
        "dp": {"enabled": True, "noise_multiplier": 1.0},
        "search": {"method": "random", "num_samples": {"distribution": "poisson", "mean": 5},
                   "parameters": {"dp.noise_multiplier": {"values": [0.9, 1.4]}}}}]})
    stage = cfg.stages[0]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    parent = client.create_run(client.create_experiment("rs")).info.run_id
    state = {}
    k = trial_count(stage, state, tmp_path, client, parent)
    assert state["num_samples"]["ae"]["drawn"] == k
    assert json.loads((tmp_path / "launch.json").read_text())["num_samples"]["ae"]["drawn"] == k
    assert trial_count(stage, state, tmp_path, client, parent) == k   # a resume reuses the draw
    assert client.get_run(parent).data.params["search.num_samples_drawn.ae"] == str(k)

    rows = [{"key": f"p/ae/{i}", "stage": "ae", "trial_id": str(i), "dp": True, "sigma": s, "q": 8 / 80,
             "steps": 20, "private": True, "data": "/d"} for i, s in enumerate((0.9, 1.4))]
    plan = SimpleNamespace(data=SimpleNamespace(root="/d", private=True), n_train=80)
    book = accounting.stage_tuning(stage, plan, rows, 1e-5, "rdp", state["num_samples"]["ae"])
    cands = [[ledger.Mechanism(s, 0.1, 20, data="/d")] for s in (0.9, 1.4)]
    assert book["epsilon_repeat_and_select"] == pytest.approx(
        ledger.repeat_and_select_epsilon(cands, 1e-5, mean=5, shape=None), rel=1e-9)
    assert book["epsilon_naive"] == pytest.approx(ledger.naive_tuning_epsilon(cands, 1e-5, "rdp"), rel=1e-9)
    assert "outside_theorem" not in book
