"""The sweep's privacy books: a random number of trials is drawn once and kept for --resume,
and a stage's tuning cost uses the repeat-and-select bound over what its search can draw."""
import json
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import accounting, ledger
from orchestrator.sweep_file import parse_sweep


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
    plan = SimpleNamespace(data=SimpleNamespace(root="/d", private=True), n_train=80, n_units=80, unit="record",
                           val_group_size=None)
    book = accounting.stage_tuning(stage, plan, rows, 1e-5, "rdp", state["num_samples"]["ae"])
    cands = [[ledger.Mechanism(s, 0.1, 20, data="/d")] for s in (0.9, 1.4)]
    assert book["epsilon_repeat_and_select"] == pytest.approx(
        ledger.repeat_and_select_epsilon(cands, 1e-5, mean=5, shape=None), rel=1e-9)
    assert book["epsilon_naive"] == pytest.approx(ledger.naive_tuning_epsilon(cands, 1e-5, "rdp"), rel=1e-9)
    assert "outside_theorem" not in book


def test_ledger_outputs_on_the_runs(tmp_path):
    """What the books publish in MLflow after a stage: each trial's `privacy/epsilon_total`
    (inf, with the `orchestrator.privacy_total` tag saying why, for a lineage that trained
    on private data without DP), the parent's `privacy/epsilon_study` (every DP mechanism
    on the dataset composed), its `privacy/epsilon_total` (the worst lineage: inf here),
    the `orchestrator.tuning_outside_theorem.<stage>` tag and the ledger artifact."""
    from orchestrator.sweep import update_books
    from orchestrator.tracking import TRIAL_KEY
    from tests.helpers import independent_composition, independent_epsilon

    cfg = parse_sweep({"name": "books", "privacy": {"delta": 1e-5, "accountant": "rdp"}, "stages": [
        {"name": "ae", "train": {"epochs": 2, "batch_size": 8, "physical_batch_size": 8},
         "dp": {"enabled": True, "noise_multiplier": 1.0},
         "search": {"parameters": {"dp.noise_multiplier": {"values": [0.9, 1.4]}}}},
        {"name": "ldm", "needs": "ae", "model": {"kind": "ldm"}, "dp": {"enabled": False}}]})
    data = SimpleNamespace(root="/d", private=True)
    plans = {s.name: SimpleNamespace(stage=s, data=data, n_train=80, n_units=80, unit="record",
                                    val_group_size=None, select_data=None) for s in cfg.stages}
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("books")
    parent = client.create_run(exp, tags={"orchestrator.role": "sweep"}).info.run_id

    def row(stage, i, dp, sigma=None, needs=None):
        key = f"{parent}/{stage}/{i}"
        run = client.create_run(exp, tags={TRIAL_KEY: key, "orchestrator.role": "trial", "mlflow.parentRunId": parent})
        return {"key": key, "stage": stage, "trial_id": str(i), "ok": True, "metric": 1.0 + i, "dp": dp,
                "sigma": sigma, "q": 0.1 if dp else None, "steps": 20 if dp else None, "epoch": 2,
                "epsilon": None, "checkpoint": f"/c/{stage}{i}", "private": True, "data": "/d",
                "needs_key": needs, "init_key": None, "run_id": run.info.run_id}

    ae = [row("ae", 0, True, 0.9), row("ae", 1, True, 1.4)]
    ldm = [row("ldm", 2, False, needs=ae[0]["key"])]
    update_books(cfg, plans, {"ae": ae, "ldm": ldm}, {}, client, exp, parent, tmp_path)

    for r in ae:
        run = client.get_run(r["run_id"]).data
        assert run.metrics["privacy/epsilon_total"] == pytest.approx(
            independent_epsilon(r["sigma"], 0.1, 20, 1e-5, "rdp"), rel=0.01)
        assert "orchestrator.privacy_total" not in run.tags
    leak = client.get_run(ldm[0]["run_id"]).data
    assert leak.metrics["privacy/epsilon_total"] > 1e300                   # MLflow's +inf
    assert leak.tags["orchestrator.privacy_total"].startswith("not private")
    assert "ldm" in leak.tags["orchestrator.privacy_total"] and "without DP" in leak.tags["orchestrator.privacy_total"]

    top = client.get_run(parent).data
    assert top.metrics["privacy/epsilon_study"] == pytest.approx(
        independent_composition([(0.9, 0.1, 20), (1.4, 0.1, 20)], 1e-5, "rdp"), rel=0.01)
    assert top.metrics["privacy/epsilon_total"] > 1e300        # a released lineage is not private
    assert "naive" in top.tags["orchestrator.tuning_outside_theorem.ae"]        # grid: outside Papernot-Steinke
    assert "privacy_ledger.json" in [a.path for a in client.list_artifacts(parent)]
    book = json.loads((tmp_path / "privacy_ledger.json").read_text())
    assert book["trials"][ldm[0]["key"]]["epsilon_total"] == "inf"
