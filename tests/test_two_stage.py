"""The two-stage study end to end on a local Ray: DP compression model on private data ->
label-conditioned LDM pretrained on public data -> DP fine-tuning on private data; then the
evaluation metrics, the privacy ledger (checked against dp-accounting), the report, and
sampling from the fine-tuned generator."""
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.heavy


LDM = {"kind": "ldm", "channels": [8, 16], "num_head_channels": 4, "norm_num_groups": 4,
       "label_embedding_dim": 8, "num_train_timesteps": 50, "num_inference_steps": 3}


def test_compression_then_pretrained_ldm_then_dp_finetune(tmp_path):
    public = {"root": "data/public", "private": False,
              "synthesize": {"kind": "phantom", "n": 20, "seed": 1, "variant": "public"}}
    sweep = {
        "name": "two",
        "output": "runs/two",
        "data": {"root": "data/private", "labels": ["LVEDV", "ESED", "AGE"], "shape": [5, 16, 16],
                 "synthesize": {"kind": "phantom", "n": 24, "seed": 0}},
        "privacy": {"delta": 1e-3, "accountant": "rdp"},
        "cluster": {"workers_per_trial": 1},
        "stages": [
            # DP on the private data: everything downstream carries its cost
            {"name": "ae", "dp": {"enabled": True, "noise_multiplier": 1.2},
             "model": {"kind": "vq_vae", "channels": [4, 8], "num_embeddings": 16, "embedding_dim": 2},
             "train": {"epochs": 1, "batch_size": 4, "physical_batch_size": 4}, "eval": {"n_samples": 4}},
            # ranked by an evaluation metric: the fine-tune starts from the pretraining with the best FD
            {"name": "pre", "needs": "ae", "data": public, "dp": {"enabled": False}, "model": LDM,
             "train": {"epochs": 1, "batch_size": 4, "physical_batch_size": 4, "sample_grid": 2},
             "eval": {"n_samples": 4}, "search": {"metric": "fidelity/fd", "mode": "min"}},
            {"name": "dp", "needs": "ae", "init_from": "pre", "model": LDM,
             "dp": {"enabled": True, "noise_multiplier": 1.0},
             "train": {"epochs": 1, "batch_size": 4, "physical_batch_size": 2, "finetune": "attention",
                       "sample_grid": 2}, "eval": {"n_samples": 4}},
        ],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "orchestrator.launch", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs/two/mlflow.db'}")
    exp = client.get_experiment_by_name("two")
    trials = {r.data.tags["orchestrator.stage"]: r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get("orchestrator.role") == "trial"}
    assert set(trials) == {"ae", "pre", "dp"}
    assert trials["ae"].data.tags["orchestrator.model"] == "vq_vae"
    ae_ckpt = trials["ae"].data.tags["orchestrator.checkpoint"]
    pre, dp = trials["pre"].data, trials["dp"].data
    # each LDM names the compression checkpoint it used; the fine-tune names its init
    assert pre.params["upstream.needs_checkpoint"] == ae_ckpt == dp.params["upstream.needs_checkpoint"]
    assert dp.params["upstream.init_from_checkpoint"] == trials["pre"].data.tags["orchestrator.checkpoint"]
    # the latent scale never comes from private data: public data for the pretraining,
    # inherited by the DP fine-tune
    assert pre.params["latent.scale_source"].startswith("public data")
    assert dp.params["latent.scale_source"].startswith("init_from checkpoint")
    assert float(dp.params["latent.scale_factor"]) == pytest.approx(float(pre.params["latent.scale_factor"]))
    assert dp.tags["orchestrator.dp"] == "true" and dp.metrics["privacy/epsilon"] > 0
    assert int(dp.params["train.trainable_parameters"]) > 0
    assert "samples.png" in [a.path for a in client.list_artifacts(trials["dp"].info.run_id)]

    # evaluation on the test split
    assert {"fidelity/mse", "fidelity/psnr", "fidelity/ssim"} <= set(trials["ae"].data.metrics)
    for run in (trials["pre"], trials["dp"]):
        assert {"fidelity/fd", "fidelity/mmd", "control/ed_es_accuracy", "time/eval_s"} <= set(run.data.metrics)

    # the ledger: the public pretraining adds nothing, the DP compression model and the DP
    # fine-tune compose, and dp-accounting agrees
    def facts(run):
        return (float(run.data.params["privacy.noise_multiplier"]), float(run.data.params["privacy.sample_rate"]),
                int(run.data.metrics["privacy/steps"]))
    ae_f, dp_f = facts(trials["ae"]), facts(trials["dp"])
    assert pre.metrics["privacy/epsilon_total"] == pytest.approx(trials["ae"].data.metrics["privacy/epsilon"], rel=1e-6)
    assert dp.metrics["privacy/epsilon_total"] == pytest.approx(independent_composition([ae_f, dp_f], 1e-3), rel=0.01)
    assert dp.metrics["privacy/epsilon_total"] > dp.metrics["privacy/epsilon"]
    parent = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("orchestrator.role") == "sweep"][0]
    assert parent.data.metrics["privacy/epsilon_total"] == pytest.approx(dp.metrics["privacy/epsilon_total"])
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"privacy_ledger.json", "report"} <= names
    assert any(a.path.endswith(".png") for a in client.list_artifacts(parent.info.run_id, "report"))
    ledger = json.loads((tmp_path / "runs/two/privacy_ledger.json").read_text())
    dp_key = dp.tags["orchestrator.trial_key"]
    assert [m["stage"] for m in ledger["trials"][dp_key]["datasets"][str(tmp_path / "data/private")]["mechanisms"]] \
        in (["ae", "dp"], ["dp", "ae"])

    out = tmp_path / "s.npz"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.sample", "--output", "runs/two", "--run",
                           trials["dp"].info.run_id, "--labels", "LVEDV=150,ESED=1", "--n", "3", "--out", str(out),
                           "--png", str(tmp_path / "s.png")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = np.load(out)
    assert got["images"].shape == (3, 5, 16, 16)
    assert got["images"].min() >= 0 and got["images"].max() <= 1
    assert got["labels"][0][0] == 150 and np.isnan(got["labels"][0][2])  # AGE unnamed -> unknown
    assert (tmp_path / "s.png").stat().st_size > 0

    bad = subprocess.run([sys.executable, "-m", "orchestrator.sample", "--checkpoint", ae_ckpt, "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "expected an ldm" in bad.stderr
