"""What a launch releases, end to end (issue 10): one real launch on a local Ray, read back
through MLflow, checks that DP noise is secret unless `dp.reproducible` says otherwise
(identical DP trials differ, identical non-DP and reproducible ones do not), that the
parent's epsilon_total is infinite when a private lineage trained without DP, that no real
private volume reaches a logged picture, and that selection on DP / public metrics is what
ranks the trials and what the ledger lists."""
import json

import pytest
import torch

from tests.helpers import TINY_LDM, client_for, independent_composition, launch, parent_run, stage, sweep_dict, \
    trial_runs, write_sweep
from trainers.checkpoints import CHECKPOINT_FILE

pytestmark = pytest.mark.heavy

NO_EVAL = {"enabled": False}


def release_sweep(tmp_path):
    dp = stage("dp", train={"epochs": 1, "batch_size": 4, "seed": 0}, eval=NO_EVAL,
               search={"method": "grid", "num_samples": 2, "select_on": "dp",
                       "select_dp": {"clip": 1.0, "noise_multiplier": 4.0},
                       "parameters": {"dp.reproducible": {"values": [False, True]}}})
    plain = stage("plain", train={"epochs": 1, "batch_size": 4, "seed": 0}, dp={"enabled": False}, eval=NO_EVAL,
                  search={"method": "grid", "num_samples": 2, "select_on": "public",
                          "select_data": {"root": "data/pub", "private": False,
                                          "synthesize": {"kind": "phantom", "n": 20, "seed": 3,
                                                         "variant": "public"}}})
    gen = stage("gen", needs="plain", model=TINY_LDM, dp={"enabled": False}, eval=NO_EVAL,
                train={"epochs": 1, "batch_size": 4, "seed": 0, "sample_grid": 2, "max_steps_per_epoch": 1})
    gen["model"] = dict(TINY_LDM)
    return write_sweep(tmp_path, sweep_dict("rel", n=24, stages=[dp, plain, gen]))


def weights(run):
    state = torch.load(f"{run.data.tags['orchestrator.checkpoint']}/{CHECKPOINT_FILE}", weights_only=True)
    return torch.cat([v.flatten().float() for v in state["model"].values()])


def test_what_a_launch_releases(tmp_path):
    proc = launch(tmp_path, release_sweep(tmp_path))
    client = client_for(tmp_path / "runs/rel/mlflow.db")
    runs = trial_runs(client, "rel")
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.data.tags["orchestrator.stage"], []).append(r)
    assert {k: len(v) for k, v in by_stage.items()} == {"dp": 4, "plain": 2, "gen": 1}

    # 1. DP noise and batches are secret: identical DP trials end with different weights;
    # dp.reproducible ones (tagged as no DP release) and identical non-DP ones do not.
    secret = [r for r in by_stage["dp"] if r.data.params["dp.reproducible"] == "False"]
    replay = [r for r in by_stage["dp"] if r.data.params["dp.reproducible"] == "True"]
    assert {r.data.tags["orchestrator.dp_release"] for r in secret} == {"true"}
    assert {r.data.tags["orchestrator.dp_release"] for r in replay} == {"false"}
    # (reproducible up to float summation order: `auto` = bk times its per-layer kernels on
    # the first batch and may pick another one; noise differs by about the learning rate)
    assert (weights(secret[0]) - weights(secret[1])).abs().max() > 5e-4
    assert torch.allclose(weights(replay[0]), weights(replay[1]), rtol=1e-4, atol=1e-5)
    assert torch.equal(weights(by_stage["plain"][0]), weights(by_stage["plain"][1]))
    assert "not a DP release" in proc.stdout

    # 4. a private lineage without DP makes the worst released model infinite
    parent = parent_run(client, "rel")
    metrics = parent.data.metrics
    assert metrics["privacy/epsilon_total"] > 1e300          # MLflow stores inf as the largest double
    assert 0 < metrics["privacy/epsilon_total_dp"] < 100
    ledger = json.loads((tmp_path / "runs/rel/privacy_ledger.json").read_text())
    assert ledger["epsilon_total_max"] == "inf"

    # 7. no real private volume in any logged picture: the non-DP generator's grid is one
    # row of generated volumes (2.4 x 4 inches at 80 dpi; a row of real volumes would make it 352 px high)
    import matplotlib.image as mpimg

    grid = client.download_artifacts(by_stage["gen"][0].info.run_id, "samples.png", str(tmp_path))
    assert mpimg.imread(grid).shape[:2] == (192, 320)

    # 8. selection: the DP stage is ranked by a noisy validation loss, the non-DP one on
    # public data; the ledger lists the selection mechanisms
    for r in by_stage["dp"]:
        assert "select/val/loss" in r.data.metrics and float(r.data.params["select.noise_multiplier"]) == 4.0
    for r in by_stage["plain"]:
        assert "select/val/loss" in r.data.metrics
    sel = ledger["tuning"]["dp"]["selection"]
    assert sel["select_on"] == "dp" and len(sel["mechanisms"]) == 4 and sel["data"].endswith("#validation")
    assert sel["epsilon"] == pytest.approx(independent_composition([(4.0, 1.0, 4)], 1e-3, "rdp"), rel=1e-3)
    assert metrics["privacy/epsilon_selection/dp"] == pytest.approx(sel["epsilon"])
    assert metrics["privacy/epsilon_selection/plain"] == 0.0
    assert ledger["tuning"]["plain"]["selection"]["data"].endswith("data/pub")
    chosen = {r.data.tags["orchestrator.checkpoint"]: r for r in by_stage["dp"]}[parent.data.tags["orchestrator.selected.dp"]]
    assert chosen.data.metrics["select/val/loss"] == min(r.data.metrics["select/val/loss"] for r in by_stage["dp"])
