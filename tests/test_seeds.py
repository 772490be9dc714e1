"""A configuration over several `train.seed`s (orchestrator/seeds.py) and the report's
aggregate table, CSV and error-bar plots, on a real MLflow SQLite store (no Ray)."""
from __future__ import annotations

import csv
import math

import pytest
from scipy import stats

from orchestrator import seeds
from orchestrator.report import main
from orchestrator.config import StageConfig, search_combinations
from tests.test_report import _create_run

T0 = 1_700_000_000_000


def row(run_id, stage, seed, fd, eps=1.0, n=32, ckpt=None, upstream=(), **extra):
    params = {"train.seed": str(seed), "dp.target_epsilon": str(eps), "eval.n_samples": str(n), "model.kind": "ldm"}
    return {"run_id": run_id, "stage": stage, "model": "ldm", "family": "generator", "dp": True, "epsilon_total": eps,
            "params": params, "fidelity/fd": fd, "eval/n_samples": n, "checkpoint": ckpt, "upstream": list(upstream),
            **extra}


def test_seed_is_a_searched_dimension():
    stage = StageConfig.model_validate({"name": "g", "model": {"kind": "ldm"},
                                        "search": {"parameters": {"train.seed": {"values": [0, 1, 2]}}}})
    assert [t["train"]["seed"] for _, t in search_combinations(stage, 10)] == [0, 1, 2]


def test_trials_differing_only_in_seed_are_one_configuration_with_a_t_interval():
    rows = [row("a", "ft", 0, 10.0), row("b", "ft", 1, 12.0), row("c", "ft", 2, 14.0),
            row("d", "ft", 0, 30.0, eps=10.0)]
    groups = seeds.aggregate(rows, ["fidelity/fd"])
    assert [g["n"] for g in groups] == [3, 1]
    g = groups[0]
    half = stats.t.ppf(0.975, 2) * 2.0 / math.sqrt(3)  # sd 2 over 3 seeds
    assert g["fidelity/fd"] == 12.0 and g["fidelity/fd_interval"] == "seeds"
    assert (g["fidelity/fd_low"], g["fidelity/fd_high"]) == pytest.approx((12 - half, 12 + half))
    assert groups[1]["fidelity/fd_interval"] == ""  # one seed, no bootstrap logged: no interval


def test_one_seed_falls_back_to_its_bootstrap_interval_and_sample_counts_split_configurations():
    rows = [row("a", "ft", 0, 10.0, **{"fidelity/fd_ci_low": 8.0, "fidelity/fd_ci_high": 13.0}),
            row("b", "ft", 1, 20.0, n=64)]
    groups = seeds.aggregate(rows, ["fidelity/fd"])
    assert len(groups) == 2  # eval.n_samples is part of the configuration
    assert (groups[0]["fidelity/fd_low"], groups[0]["fidelity/fd_high"], groups[0]["fidelity/fd_interval"]) == \
        (8.0, 13.0, "bootstrap")
    assert "not comparable" in seeds.sample_count_note(rows, "fidelity/fd")
    assert seeds.sample_count_note(rows[:1], "fidelity/fd") is None


def test_fine_tuned_trials_of_different_pretraining_seeds_group_by_the_upstream_configuration():
    rows = [row("p0", "pre", 0, 50.0, ckpt="/c/p0/checkpoint_000001"),
            row("p1", "pre", 1, 52.0, ckpt="/c/p1/checkpoint_000001"),
            row("f0", "ft", 0, 10.0, upstream=["/c/p0/checkpoint_000001"]),
            row("f1", "ft", 0, 11.0, upstream=["/c/p1/checkpoint_000001"])]
    assert [g["n"] for g in seeds.aggregate(rows, ["fidelity/fd"])] == [2, 2]


def test_report_prints_and_plots_configurations_over_seeds(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("seeds", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, start_time=T0, tags={"orchestrator.role": "sweep"}).info.run_id
    t = T0
    for stage, base in (("pretrained", 20.0), ("scratch", 60.0)):
        for eps in (1.0, 10.0):
            for seed in (0, 1, 2):
                t += 1000
                _create_run(client, exp, parent, t, f"{stage}-{eps}-{seed}", stage, "ldm", True, True,
                            {"privacy.noise_multiplier": 1.0, "train.seed": seed, "dp.target_epsilon": eps,
                             "eval.n_samples": 32},
                            {"privacy/epsilon": eps, "fidelity/fd": base / eps ** 0.3 + seed,
                             "eval/n_samples": 32, "utility/r_mean": 0.9 - 0.1 * seed - base / 200},
                            "FINISHED", {})
    assert main(["seeds", "--tracking-uri", uri, "--parent", parent, "--out", str(tmp_path / "r"), "--no-log"]) == 0
    out = capsys.readouterr().out
    assert "over seeds" in out and "equal sample counts" in out
    with open(tmp_path / "r" / "configurations.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and {r["n"] for r in table} == {"3"}
    first = next(r for r in table if r["stage"] == "pretrained" and float(r["epsilon_total"]) == 1.0)
    assert float(first["fidelity/fd"]) == pytest.approx(21.0)  # mean of 20, 21, 22
    assert float(first["fidelity/fd_low"]) < 21.0 < float(first["fidelity/fd_high"])
    assert (tmp_path / "r" / "epsilon_vs_fidelity_fd_by_configuration.png").stat().st_size > 10_000
    assert (tmp_path / "r" / "epsilon_vs_utility_r_mean_by_configuration.png").is_file()
