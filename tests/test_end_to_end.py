"""Tiny sweeps end to end: the real CLI, a real local Ray with 2 Train workers per trial
over gloo, real Opacus, results read back through MLflow's client."""
import math
from pathlib import Path

import pytest

from tests.helpers import (client_for, independent_composition, independent_epsilon, launch, noise_ledger_lines,
                           parent_run, stage, sweep_dict, trial_runs, write_sweep)

pytestmark = pytest.mark.heavy

N, BATCH, EPOCHS = 30, 4, 2   # 15 subjects x (ED, ES), 11 in training: 22 volumes -> q = 2/11, 6 steps per epoch


def e2e_sweep(tmp_path: Path, **stage_keys) -> Path:
    ae = stage(model={"latent_channels": 2},
               train={"epochs": EPOCHS, "lr": 1e-3, "batch_size": BATCH, "seed": 0},
               dp={"max_grad_norm": 1.0},
               search={"method": "grid", "metric": "val/loss", "mode": "min",
                       "parameters": {"dp.noise_multiplier": {"values": [0.8, 1.5]}}})
    ae.update(stage_keys)
    return write_sweep(tmp_path, sweep_dict("e2e", n=N, seed=1, labels=("LVEDV", "LVESV", "ESED"),
                                            cluster={"workers_per_trial": 2}, stages=[ae]))


def test_two_trials_two_workers_dp_sweep_lands_in_mlflow(tmp_path):
    proc = launch(tmp_path, e2e_sweep(tmp_path))
    assert "summary" in proc.stdout and "Ray dashboard: http://127.0.0.1:" in proc.stdout

    client = client_for(tmp_path / "runs/e2e/mlflow.db")
    parent, children = parent_run(client, "e2e"), trial_runs(client, "e2e")
    assert len(children) == 2
    assert parent.info.status == "FINISHED"
    assert "sweep.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]

    n_train = 22
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
        # the ledger's outputs on the trial: a lineage of one DP trial costs its own epsilon
        assert tags["orchestrator.private_data"] == "true"
        assert run.data.metrics["privacy/epsilon_total"] == pytest.approx(run.data.metrics["privacy/epsilon"], rel=1e-6)
        assert "orchestrator.privacy_total" not in tags
    assert sigmas == {0.8, 1.5}
    # ... and on the parent: the study composes both trials (same private data), the worst
    # lineage is the total, and a grid search is flagged as outside repeat-and-select
    assert parent.data.metrics["privacy/epsilon_study"] == pytest.approx(
        independent_composition([(s, BATCH / n_train, steps) for s in sigmas], 1e-3, "rdp"), rel=0.01)
    assert parent.data.metrics["privacy/epsilon_total"] == pytest.approx(
        max(r.data.metrics["privacy/epsilon"] for r in children), rel=1e-6)
    assert parent.data.tags["orchestrator.tuning_outside_theorem.ae"]


def test_patient_level_dp_two_workers(tmp_path):
    """privacy.unit subject on 2 gloo workers: Poisson sampling over the 11 training subjects
    (q = 4/11, batch_size counts subjects), every sampling event a step on both ranks (no hang
    on empty local batches), epsilon at q over subjects, recomputable from the logged params,
    and the patient's epsilon is the trial's."""
    ae = stage(model={"latent_channels": 2}, train={"epochs": EPOCHS, "lr": 1e-3, "batch_size": BATCH, "seed": 0},
               dp={"noise_multiplier": 1.1, "max_grad_norm": 1.0})
    sweep = write_sweep(tmp_path, sweep_dict("subj", n=N, seed=1, labels=("LVEDV", "LVESV", "ESED"),
                                             privacy={"unit": "subject"}, cluster={"workers_per_trial": 2},
                                             stages=[ae]))
    proc = launch(tmp_path, sweep)
    assert "per patient" in proc.stdout
    client = client_for(tmp_path / "runs/subj/mlflow.db")
    (run,) = trial_runs(client, "subj")
    params, metrics = run.data.params, run.data.metrics
    assert params["privacy.unit"] == "subject" and params["data.n_subjects"] == "11"
    assert params["data.n_train"] == "22" and params["data.max_volumes_per_subject"] == "2"
    q = float(params["privacy.sample_rate"])
    assert q == pytest.approx(BATCH / 11)
    steps = EPOCHS * math.ceil(11 / BATCH)
    assert metrics["privacy/steps"] == steps
    assert noise_ledger_lines(tmp_path / "runs/subj", run) == steps
    assert metrics["privacy/epsilon"] == pytest.approx(independent_epsilon(1.1, q, steps, 1e-3, "rdp"), rel=0.01)
    assert metrics["privacy/epsilon_subject"] == metrics["privacy/epsilon"]
    assert metrics["privacy/epsilon_total_subject"] == pytest.approx(metrics["privacy/epsilon"], rel=1e-6)
    parent = parent_run(client, "subj")
    assert parent.data.metrics["privacy/epsilon_total_subject"] == pytest.approx(metrics["privacy/epsilon"], rel=1e-6)
