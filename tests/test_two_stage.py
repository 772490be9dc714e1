"""The two-stage study end to end on a local Ray: DP compression models on private data (two
trials, the best one selected) -> label-conditioned LDM pretrained on public data -> DP
fine-tuning on private data planned from a target epsilon, once per compression model
(`select: each`); then the evaluation metrics, the privacy ledger (checked against
dp-accounting), the report, and sampling from the fine-tuned generator."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import (TINY_LDM, client_for, independent_composition, independent_epsilon, launch, parent_run,
                           stage, sweep_dict, trial_runs, write_sweep)

pytestmark = pytest.mark.heavy

TARGET_EPSILON = 6.0


def facts(run):
    return (float(run.data.params["privacy.noise_multiplier"]), float(run.data.params["privacy.sample_rate"]),
            int(run.data.metrics["privacy/steps"]))


def test_compression_then_pretrained_ldm_then_dp_finetune(tmp_path):
    public = {"root": "data/public", "private": False,
              "synthesize": {"kind": "phantom", "n": 20, "seed": 1, "variant": "public"}}
    stages = [
        # DP on the private data: everything downstream carries its cost; two trials to choose from
        stage("ae", model={"kind": "vq_vae", "channels": [4, 8], "num_embeddings": 16, "embedding_dim": 2},
              train={"physical_batch_size": 4}, eval={"n_samples": 4},
              search={"parameters": {"dp.noise_multiplier": {"values": [1.2, 3.0]}}}),
        # on the best compression model (val/loss); ranked by an evaluation metric: the
        # fine-tune starts from the pretraining with the best FD
        stage("pre", needs="ae", data=public, model=TINY_LDM, dp={"enabled": False, "noise_multiplier": None},
              train={"physical_batch_size": 4, "sample_grid": 2}, eval={"n_samples": 4},
              search={"metric": "fidelity/fd", "mode": "min"}),
        # one fine-tune per compression model, each planned to end at the target epsilon
        stage("dp", needs="ae", select="each", init_from="pre", model=TINY_LDM,
              dp={"target_epsilon": TARGET_EPSILON, "noise_multiplier": None},
              train={"finetune": "attention", "sample_grid": 2}, eval={"n_samples": 4}),
    ]
    # spread_cpus: the lone non-DP trial takes both trial slots' CPUs; DP stages keep one each
    raw = sweep_dict("two", n=24, labels=("LVEDV", "ESED", "AGE"), data={"root": "data/private"}, stages=stages,
                     cluster={"spread_cpus": True, "max_concurrent_trials": 2})
    out = launch(tmp_path, write_sweep(tmp_path, raw))

    client = client_for(tmp_path / "runs/two/mlflow.db")
    runs = trial_runs(client, "two")
    by_stage = {name: [r for r in runs if r.data.tags["orchestrator.stage"] == name] for name in ("ae", "pre", "dp")}
    assert len(runs) == sum(map(len, by_stage.values()))
    ae, (pre_run,), dps = by_stage["ae"], by_stage["pre"], by_stage["dp"]
    assert len(ae) == 2 and dps
    assert all(r.data.tags["orchestrator.model"] == "vq_vae" for r in ae)
    if (os.cpu_count() or 1) >= 2:
        assert {r.data.params["cluster.cpus_per_worker"] for r in ae + dps} == {"1.0"}
        assert pre_run.data.params["cluster.cpus_per_worker"] == "2.0"
        assert "each worker takes 2 CPUs (2 torch threads; cluster.spread_cpus)" in out.stdout
    ckpt = {r.info.run_id: r.data.tags["orchestrator.checkpoint"] for r in runs}
    ae_by_ckpt = {ckpt[r.info.run_id]: r for r in ae}
    assert len(ae_by_ckpt) == 2

    # `select: best` among two: the pretraining uses the compression model with the lower val/loss
    best_ae = min(ae, key=lambda r: r.data.metrics["val/loss"])
    assert ae[0].data.metrics["val/loss"] != ae[1].data.metrics["val/loss"]
    pre = pre_run.data
    assert pre.params["upstream.needs_checkpoint"] == ckpt[best_ae.info.run_id]
    # the latent scale never comes from private data: public data for the pretraining,
    # inherited by the DP fine-tune
    assert pre.params["latent.scale_source"].startswith("public data")
    # which data each trial trained on, as a tag
    assert pre.tags["orchestrator.private_data"] == "false"
    assert all(r.data.tags["orchestrator.private_data"] == "true" for r in ae + dps)

    for run in dps:
        dp = run.data
        ae_run = ae_by_ckpt[dp.params["upstream.needs_checkpoint"]]   # each fine-tune names its compression model
        assert dp.params["upstream.init_from_checkpoint"] == ckpt[pre_run.info.run_id]
        assert dp.params["latent.scale_source"].startswith("init_from checkpoint")
        assert float(dp.params["latent.scale_factor"]) == pytest.approx(float(pre.params["latent.scale_factor"]))
        assert dp.tags["orchestrator.dp"] == "true"
        assert int(dp.params["train.trainable_parameters"]) > 0
        assert "samples.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
        # target_epsilon: sigma solved before training so that the planned steps end there
        sigma, q, steps = facts(run)
        assert float(dp.params["dp.target_epsilon"]) == TARGET_EPSILON
        assert dp.metrics["privacy/epsilon"] == pytest.approx(TARGET_EPSILON, abs=0.05)
        assert dp.metrics["privacy/epsilon"] <= TARGET_EPSILON + 1e-9
        assert independent_epsilon(sigma, q, steps, 1e-3, "rdp") == pytest.approx(TARGET_EPSILON, rel=0.01)
        # the ledger: the public pretraining adds nothing of its own, but it was trained in
        # the latent space of the best compression model, so a fine-tune of it carries that
        # model too; with the compression model it decodes with and its own training, all
        # compose, and dp-accounting agrees
        lineage = {ae_run.info.run_id: ae_run, best_ae.info.run_id: best_ae}
        assert dp.metrics["privacy/epsilon_total"] == pytest.approx(
            independent_composition([facts(r) for r in lineage.values()] + [facts(run)], 1e-3), rel=0.01)
        assert dp.metrics["privacy/epsilon_total"] > dp.metrics["privacy/epsilon"]
        for name in ("fidelity/fd", "fidelity/mmd", "control/ed_es_accuracy", "time/eval_s"):
            assert name in dp.metrics
    assert pre.metrics["privacy/epsilon_total"] == pytest.approx(best_ae.data.metrics["privacy/epsilon"], rel=1e-6)
    for name in ("fidelity/fd", "fidelity/mmd", "control/ed_es_accuracy", "time/eval_s"):
        assert name in pre.metrics
    for run in ae:   # evaluation on the test split
        assert {"fidelity/mse", "fidelity/psnr", "fidelity/ssim"} <= set(run.data.metrics)

    parent = parent_run(client, "two")
    assert parent.data.metrics["privacy/epsilon_total"] == pytest.approx(
        max(r.data.metrics["privacy/epsilon_total"] for r in runs if "privacy/epsilon_total" in r.data.metrics))
    # the study: every DP mechanism of the launch on the private data, composed
    assert parent.data.metrics["privacy/epsilon_study"] == pytest.approx(
        independent_composition([facts(r) for r in ae + dps], 1e-3), rel=0.01)
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"privacy_ledger.json", "report"} <= names
    assert any(a.path.endswith(".png") for a in client.list_artifacts(parent.info.run_id, "report"))
    ledger = json.loads((tmp_path / "runs/two/privacy_ledger.json").read_text())
    for run in dps:   # its own compression model, the best one (through `pre`), itself
        own = ae_by_ckpt[run.data.params["upstream.needs_checkpoint"]]
        listed = ledger["trials"][run.data.tags["orchestrator.trial_key"]]["datasets"][str(tmp_path / "data/private")]
        assert sorted(m["stage"] for m in listed["mechanisms"]) == ["ae"] * (1 + (own is not best_ae)) + ["dp"]

    out = tmp_path / "s.npz"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.sample", "--output", "runs/two", "--run",
                           dps[0].info.run_id, "--labels", "LVEDV=150,ESED=1", "--n", "3", "--out", str(out),
                           "--png", str(tmp_path / "s.png")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = np.load(out)
    assert got["images"].shape == (3, 5, 16, 16)
    assert got["images"].min() >= 0 and got["images"].max() <= 1
    assert got["labels"][0][0] == 150 and np.isnan(got["labels"][0][2])  # AGE unnamed -> unknown
    assert (tmp_path / "s.png").stat().st_size > 0

    bad = subprocess.run([sys.executable, "-m", "orchestrator.sample", "--checkpoint", ckpt[ae[0].info.run_id],
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "expected an ldm" in bad.stderr

    # `select: each`: one fine-tune per compression model
    assert sorted(r.data.params["upstream.needs_checkpoint"] for r in dps) == sorted(ae_by_ckpt), \
        "select: each ran the fine-tune on only some of the compression models"
