"""orchestrator.report on a real MLflow SQLite store shaped like a two-stage study (no Ray)."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import report
from orchestrator.report import main, pareto_front
from tests.helpers import free_port

INF = math.inf
T0 = 1_700_000_000_000
EXP = "two_stage_test"

# name: (stage, model, dp, private, params, metrics, status, extra tags)
# ae: compression (fidelity/mse, psnr); pretrain: public LDM; finetune: DP LDM on private data.
TRIALS = [
    ("ae-a1", "ae", "beta_vae", True, True, {"privacy.noise_multiplier": 0.8, "train.batch_size": 32,
     "model.latent_channels": 3}, {"privacy/epsilon": 8.1, "fidelity/mse": 0.012, "fidelity/psnr": 30.0,
     "val/loss": 0.5}, "FINISHED", {"orchestrator.checkpoint": "/ckpt/ae-a1/checkpoint_000002"}),
    ("ae-a2", "ae", "beta_vae", True, True, {"privacy.noise_multiplier": 1.5, "train.batch_size": 32,
     "model.latent_channels": 3}, {"privacy/epsilon": 2.3, "fidelity/mse": 0.020, "fidelity/psnr": 25.0,
     "val/loss": 0.7}, "FINISHED", {}),
    ("ae-a3", "ae", "beta_vae", True, True, {"privacy.noise_multiplier": 1.5, "train.batch_size": 32,
     "model.latent_channels": 4}, {"privacy/epsilon": 2.3, "fidelity/mse": 0.018, "fidelity/psnr": 26.0,
     "val/loss": 0.65}, "FINISHED", {}),
    ("ae-a4", "ae", "beta_vae", True, True, {"privacy.noise_multiplier": 3.0, "train.batch_size": 64,
     "model.latent_channels": 4}, {"privacy/epsilon": 0.9, "fidelity/mse": 0.025, "fidelity/psnr": 22.0,
     "val/loss": 0.9}, "FAILED", {}),
    ("ae-a5", "ae", "vq_vae", True, True, {"privacy.noise_multiplier": 0.8, "train.batch_size": 32,
     "model.embedding_dim": 8}, {"privacy/epsilon": 9.0, "fidelity/mse": 0.013, "fidelity/psnr": 29.0,
     "val/loss": 0.55}, "FINISHED", {}),
    ("ae-a6", "ae", "beta_vae", False, True, {"dp.noise_multiplier": 1.0, "train.batch_size": 32,
     "model.latent_channels": 4}, {"fidelity/mse": 0.005, "fidelity/psnr": 35.0, "val/loss": 0.3}, "FINISHED",
     {"orchestrator.checkpoint": "/ckpt/ae-a6/checkpoint_000003"}),
    ("pretrain-p1", "pretrain", "ldm", False, False, {"train.batch_size": 16, "upstream.needs":
     "/ckpt/ae-a1/checkpoint_000002"}, {"fidelity/fd": 60.0, "fidelity/mmd": 0.2, "val/loss": 0.4}, "FINISHED", {}),
    ("finetune-f1", "finetune", "ldm", True, True, {"privacy.noise_multiplier": 2.0, "train.batch_size": 16,
     "upstream.needs": "/ckpt/ae-a1/checkpoint_000002"}, {"privacy/epsilon": 1.0, "privacy/epsilon_total": 9.1,
     "fidelity/fd": 45.0, "control/r_mean": 0.3, "control/ed_es_accuracy": 0.6}, "FINISHED", {}),
    ("finetune-f2", "finetune", "ldm", True, True, {"privacy.noise_multiplier": 0.7, "train.batch_size": 16},
     {"privacy/epsilon": 10.0, "privacy/epsilon_total": 18.1, "fidelity/fd": 30.0, "control/r_mean": 0.5,
      "control/ed_es_accuracy": 0.8}, "FINISHED", {}),
    # an old run without privacy/epsilon_total: falls back to its own epsilon (5), dominated by p1
    ("finetune-f3", "finetune", "ldm", True, True, {"privacy.noise_multiplier": 1.1, "train.batch_size": 16},
     {"privacy/epsilon": 5.0, "fidelity/fd": 65.0}, "FINISHED", {}),
    # epsilon_total logged as +inf (SQLite stores max float): dominated by n1 at inf
    ("finetune-f4", "finetune", "ldm", True, True, {"privacy.noise_multiplier": 1.3, "train.batch_size": 16},
     {"privacy/epsilon": 2.0, "privacy/epsilon_total": INF, "fidelity/fd": 28.0}, "FINISHED", {}),
    # no epsilon_total, but built on a6 (non-DP on private data): inf through the lineage
    ("finetune-f5", "finetune", "ldm", True, True, {"privacy.noise_multiplier": 1.2, "train.batch_size": 16,
     "upstream.needs": "/ckpt/ae-a6/checkpoint_000002"}, {"privacy/epsilon": 1.5, "fidelity/fd": 35.0},
     "FINISHED", {}),
    ("finetune-n1", "finetune", "ldm", False, True, {"train.batch_size": 16}, {"fidelity/fd": 25.0,
     "control/r_mean": 0.6, "control/ed_es_accuracy": 0.9}, "FINISHED", {}),
    ("finetune-r1", "finetune", "ldm", True, True, {"train.batch_size": 16}, {}, "RUNNING", {}),
]
# by hand: the fd front among generators, the mse/psnr front among compression models
FRONT_FD = {"pretrain-p1", "finetune-f1", "finetune-f2", "finetune-n1"}
FRONT_MSE = {"ae-a1", "ae-a3", "ae-a4", "ae-a6"}
ORDER = ["ae-a4", "ae-a2", "ae-a3", "ae-a1", "ae-a5", "ae-a6", "pretrain-p1", "finetune-f3", "finetune-f1",
         "finetune-f2", "finetune-f4", "finetune-f5", "finetune-n1", "finetune-r1"]
LINEAGE_INF = {"finetune-f5"}


def _create_run(client, exp_id, parent, t, name, stage, model, dp, private, params, metrics, status, tags):
    from mlflow.entities import Metric, Param

    run = client.create_run(exp_id, start_time=t, run_name=name, tags={
        "mlflow.parentRunId": parent, "orchestrator.role": "trial", "orchestrator.stage": stage,
        "orchestrator.model": model, "orchestrator.dp": str(dp).lower(),
        "orchestrator.private_data": str(private).lower(), **tags})
    rid = run.info.run_id
    params = {"dp.enabled": str(dp), "model.kind": model, **params}
    if dp and "privacy.noise_multiplier" in params:
        params["privacy.sample_rate"] = 0.1
    history = [Metric(k, float(v), t + 10, 2) for k, v in metrics.items()]
    if "privacy/epsilon" in metrics:  # an earlier epoch: the report must use the latest value
        history.append(Metric("privacy/epsilon", metrics["privacy/epsilon"] / 2, t + 5, 1))
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()], metrics=history)
    if status != "RUNNING":
        client.set_terminated(rid, status=status, end_time=t + 500)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("report")
    out = root / "out"
    out.mkdir()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXP, artifact_location=(out / "mlartifacts").as_uri())
    # an older launch of the same experiment, with one compression trial only
    old = client.create_run(exp_id, start_time=T0 - 10**6, run_name="old",
                            tags={"orchestrator.role": "sweep"}).info.run_id
    _create_run(client, exp_id, old, T0 - 10**6 + 1, "old-ae", "ae", "beta_vae", True, True,
                {"privacy.noise_multiplier": 1.0, "train.batch_size": 8, "model.latent_channels": 2},
                {"privacy/epsilon": 4.0, "fidelity/mse": 0.03, "val/loss": 1.0}, "FINISHED", {})
    client.set_terminated(old, status="FINISHED")
    parent = client.create_run(exp_id, start_time=T0, run_name="launch",
                               tags={"orchestrator.role": "sweep"}).info.run_id
    ids = {}
    for i, (name, *rest) in enumerate(TRIALS):
        ids[name] = _create_run(client, exp_id, parent, T0 + 1000 * (i + 1), name, *rest)
    (out / "launch.json").write_text(json.dumps({"parent_run_id": parent, "tracking_uri": uri,
                                                 "status": "running", "stages": {}}))
    return {"root": root, "out": out, "uri": uri, "client": client, "exp_id": exp_id, "parent": parent,
            "old": old, "ids": ids, "names": {v: k for k, v in ids.items()}}


def _table(stdout: str) -> tuple[list[str], list[dict]]:
    """The printed table as (header, [cells by header])."""
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("stage "))
    header = lines[start].split()
    rows = []
    for ln in lines[start + 1:]:
        if not ln.strip():
            break
        assert len(ln) <= 100, ln
        cells = ln.replace("inf (non-DP)", "inf(non-DP)").replace("0 (public)", "0(public)").split()
        if len(cells) == len(header) - 1:
            cells.append("")  # not on the front
        assert len(cells) == len(header), ln
        rows.append(dict(zip(header, cells)))
    return header, rows


def _g(x) -> str:
    return "inf" if x >= 1e308 else "0" if x == 0 else f"{x:.4g}"


def _expected_cells(client, run_id: str, front: set, names: dict) -> dict:
    """What the table must show for one run, read back through the MLflow client."""
    run = client.get_run(run_id)
    tags, params, m = run.data.tags, run.data.params, run.data.metrics
    name = names[run_id]
    dp, private = tags["orchestrator.dp"] == "true", tags["orchestrator.private_data"] == "true"
    model = tags["orchestrator.model"]
    latent = {"beta_vae": params.get("model.latent_channels"), "vq_vae": params.get("model.embedding_dim")}.get(model)
    if dp:
        eps = _g(m["privacy/epsilon"]) if "privacy/epsilon" in m else "-"
    else:
        eps = "inf(non-DP)" if private else "0(public)"
    if not dp and private:
        total = "inf"
    elif "privacy/epsilon_total" in m:
        total = _g(m["privacy/epsilon_total"])
    elif name in LINEAGE_INF:
        total = "inf"
    else:
        total = eps if private else "0"
    return {"stage": tags["orchestrator.stage"], "model": model, "DP": "yes" if dp else "no",
            "sigma": _g(float(params["privacy.noise_multiplier"])) if dp and "privacy.noise_multiplier" in params
            else "-", "batch": params["train.batch_size"], "latent": latent or "-", "epsilon": eps,
            "eps_total": total, "fd": _g(m["fidelity/fd"]) if "fidelity/fd" in m else "-",
            "r_mean": _g(m["control/r_mean"]) if "control/r_mean" in m else "-",
            "ed_es_acc": _g(m["control/ed_es_accuracy"]) if "control/ed_es_accuracy" in m else "-",
            "status": run.info.status, "front": "*" if name in front else ""}


def test_report_from_output_folder(store, capsys):
    client, out = store["client"], store["out"]
    assert main([str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "metric fidelity/fd (lower is better)" in stdout
    header, rows = _table(stdout)
    assert header == ["stage", "model", "DP", "sigma", "batch", "latent", "epsilon", "eps_total", "fd", "r_mean",
                      "ed_es_acc", "status", "front"]
    # the csv holds the run ids, in the table's order
    with open(out / "report" / "trials.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [store["names"][r["run_id"]] for r in csv_rows] == ORDER
    assert len(rows) == len(TRIALS)
    for cells, crow in zip(rows, csv_rows):
        assert cells == _expected_cells(client, crow["run_id"], FRONT_FD, store["names"])
    front = {store["names"][r["run_id"]] for r in csv_rows if r["front"] == "true"}
    assert front == FRONT_FD
    r1 = next(r for r in csv_rows if store["names"][r["run_id"]] == "finetune-r1")
    assert r1["status"] == "RUNNING" and r1["fidelity/fd"] == "" and r1["front"] == "false"

    png = out / "report" / "epsilon_vs_fidelity_fd.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[0] > 100
    logged = {a.path for a in client.list_artifacts(store["parent"], "report")}
    assert {"report/epsilon_vs_fidelity_fd.png", "report/trials.csv"} <= logged


def test_collect_trials_fields(store):
    rows = report.collect_trials(store["client"], store["exp_id"], store["parent"])
    by = {store["names"][r["run_id"]]: r for r in rows}
    assert [store["names"][r["run_id"]] for r in rows] == ORDER
    assert by["ae-a6"]["epsilon"] == INF and by["ae-a6"]["epsilon_total"] == INF and by["ae-a6"]["sigma"] is None
    assert by["pretrain-p1"]["epsilon"] == 0 and by["pretrain-p1"]["epsilon_total"] == 0
    assert by["finetune-f4"]["epsilon_total"] == INF  # stored as max float, read back as inf
    assert by["finetune-f5"]["epsilon_total"] == INF and by["finetune-f5"]["epsilon_total_source"] == "upstream non-DP"
    assert by["finetune-f3"]["epsilon_total"] == 5.0 and by["finetune-f3"]["epsilon_total_source"] == "own"
    assert by["ae-a1"]["epsilon"] == 8.1  # the latest value, not the first epoch's
    assert by["ae-a5"]["latent"] == "8" and by["ae-a5"]["family"] == "compression"
    assert by["finetune-r1"]["epsilon_total"] is None and by["finetune-r1"]["status"] == "RUNNING"
    assert by["finetune-f1"]["sigma"] == 2.0 and by["finetune-f1"]["sample_rate"] == 0.1


@pytest.mark.parametrize("metric,mode", [("fidelity/mse", "min"), ("fidelity/psnr", "max")])
def test_compression_front(store, capsys, tmp_path, metric, mode):
    assert main([str(store["out"]), "--metric", metric, "--out", str(tmp_path), "--no-log"]) == 0
    stdout = capsys.readouterr().out
    assert f"({'lower' if mode == 'min' else 'higher'} is better)" in stdout
    with open(tmp_path / "trials.csv") as f:
        front = {store["names"][r["run_id"]] for r in csv.DictReader(f) if r["front"] == "true"}
    assert front == FRONT_MSE
    assert (tmp_path / f"epsilon_vs_{metric.replace('/', '_')}.png").is_file()


def test_one_front_across_families(store, capsys, tmp_path):
    def front(*extra):
        assert main([str(store["out"]), "--metric", "val/loss", "--out", str(tmp_path), "--no-log", *extra]) == 0
        with open(tmp_path / "trials.csv") as f:
            return {store["names"][r["run_id"]] for r in csv.DictReader(f) if r["front"] == "true"}

    # per family: the public LDM alone among generators; a4, a3, a1, a6 among compression models
    assert front() == {"pretrain-p1", "ae-a4", "ae-a3", "ae-a1", "ae-a6"}
    # one front: the public run (0, 0.4) dominates every finite compression point; a6 beats it at inf
    assert front("--one-front") == {"pretrain-p1", "ae-a6"}
    assert "one front over all trials" in capsys.readouterr().out


def test_mode_override_and_unknown_metric(store, capsys, tmp_path):
    # psnr read as lower-is-better: the worst images at each budget form the front
    assert main([str(store["out"]), "--metric", "fidelity/psnr", "--mode", "min", "--out", str(tmp_path),
                 "--no-log"]) == 0
    with open(tmp_path / "trials.csv") as f:
        front = {store["names"][r["run_id"]] for r in csv.DictReader(f) if r["front"] == "true"}
    assert front == {"ae-a4"}  # lowest epsilon and lowest psnr dominates all
    capsys.readouterr()
    assert main([str(store["out"]), "--metric", "fidelity/mmd", "--out", str(tmp_path), "--no-log"]) == 0
    assert "lower is better" in capsys.readouterr().out
    assert main([str(store["out"]), "--metric", "custom/thing", "--out", str(tmp_path), "--no-log"]) == 0
    cap = capsys.readouterr()
    assert "direction unknown" in cap.out and "no trial has custom/thing" in cap.err


def test_report_from_experiment_name(store, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main([EXP, "--tracking-uri", store["uri"], "--out", str(tmp_path / "r"), "--no-log"]) == 0
    stdout = capsys.readouterr().out
    assert store["parent"] in stdout  # the latest launch, not the older one
    _, rows = _table(stdout)
    assert len(rows) == len(TRIALS)
    assert (tmp_path / "r" / "epsilon_vs_fidelity_fd.png").is_file()
    # the environment variable works too; --parent picks the older launch, whose only metric is mse
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert main([EXP, "--parent", store["old"], "--out", str(tmp_path / "old"), "--no-log"]) == 0
    stdout = capsys.readouterr().out
    assert "metric fidelity/mse" in stdout and len(_table(stdout)[1]) == 1
    # the default output folder for an experiment name is ./report
    monkeypatch.chdir(tmp_path)
    assert main([EXP, "--no-log"]) == 0
    assert (tmp_path / "report" / "trials.csv").is_file()


def test_bad_inputs(store, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "launch.json").write_text("{not json")
    gone_db = tmp_path / "gone_db"
    gone_db.mkdir()
    (gone_db / "launch.json").write_text(json.dumps({"parent_run_id": "0" * 32,
                                                     "tracking_uri": f"sqlite:///{gone_db / 'mlflow.db'}"}))
    bad_parent = tmp_path / "bad_parent"
    bad_parent.mkdir()
    (bad_parent / "launch.json").write_text(json.dumps({"parent_run_id": "0" * 32, "tracking_uri": store["uri"]}))
    cases = [
        ([str(tmp_path / "nope")], "no folder"),
        ([str(empty)], "no launch.json"),
        ([str(bad_json)], "not readable JSON"),
        ([str(gone_db)], "does not exist"),
        ([str(bad_parent)], "not found"),
        (["no_such_experiment", "--tracking-uri", store["uri"]], "no folder and no MLflow experiment"),
        ([EXP, "--tracking-uri", f"http://127.0.0.1:{free_port()}"], "cannot reach"),
        ([EXP, "--tracking-uri", store["uri"], "--parent", "f" * 32], "--parent"),
    ]
    for argv, words in cases:
        assert main(argv + ["--no-log"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, (argv, err)
    assert not (gone_db / "mlflow.db").exists()  # no empty store was created on the way


def test_cli_error_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    p = subprocess.run([sys.executable, "-m", "orchestrator.report", str(tmp_path / "missing")],
                       cwd=Path(__file__).parents[1], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr


def test_empty_sweep(store, capsys, tmp_path):
    client = store["client"]
    parent = client.create_run(store["exp_id"], start_time=T0 - 5 * 10**6,
                               tags={"orchestrator.role": "sweep"}).info.run_id
    assert main([EXP, "--tracking-uri", store["uri"], "--parent", parent, "--out", str(tmp_path)]) == 0
    assert "no trials yet" in capsys.readouterr().out
    assert (tmp_path / "epsilon_vs_val_loss.png").is_file()
    assert {a.path for a in client.list_artifacts(parent, "report")} == {"report/epsilon_vs_val_loss.png",
                                                                        "report/trials.csv"}


# ---- pareto_front on hand cases --------------------------------------------------------

def _pts(*xy):
    return [{"run_id": str(i), "x": x, "y": y} for i, (x, y) in enumerate(xy)]


def test_pareto_min_and_ties():
    rows = _pts((1, 5), (2, 4), (3, 6), (2, 4), (0.5, 9), (2, 4.5))
    # (2,4) twice: a tie, both stay; (3,6) dominated by (2,4); (2,4.5) same x, worse y
    assert pareto_front(rows, "x", "y", "min") == {"0", "1", "3", "4"}
    # equal y at a higher x is dominated
    assert pareto_front(_pts((1, 5), (2, 5)), "x", "y", "min") == {"0"}


def test_pareto_inf():
    # a non-DP point (x = inf) is on the front only if its y beats every finite point
    assert pareto_front(_pts((1, 5), (INF, 3)), "x", "y", "min") == {"0", "1"}
    assert pareto_front(_pts((1, 5), (INF, 5)), "x", "y", "min") == {"0"}
    assert pareto_front(_pts((1, 5), (INF, 6)), "x", "y", "min") == {"0"}
    assert pareto_front(_pts((1, 5), (INF, 3), (INF, 2)), "x", "y", "min") == {"0", "2"}
    assert pareto_front(_pts((INF, 3), (INF, 3)), "x", "y", "min") == {"0", "1"}
    # public (x = 0) with the worst y is still on the front
    assert pareto_front(_pts((0, 9), (1, 5), (INF, 3)), "x", "y", "min") == {"0", "1", "2"}


def test_pareto_max_mode():
    rows = _pts((1, 0.3), (2, 0.5), (3, 0.4), (INF, 0.9))
    assert pareto_front(rows, "x", "y", "max") == {"0", "1", "3"}
    assert pareto_front(rows, "x", "y", "min") == {"0"}
    with pytest.raises(ValueError):
        pareto_front(rows, "x", "y", "best")


def test_pareto_missing_values_and_metric_dicts():
    rows = _pts((1, 5), (None, 1), (2, None), (3, float("nan")), (4, 4))
    assert pareto_front(rows, "x", "y", "min") == {"0", "4"}
    rows = [{"run_id": "a", "eps": 1.0, "metrics": {"fidelity/fd": 3.0}},
            {"run_id": "b", "eps": 2.0, "metrics": {"fidelity/fd": 4.0}}]
    assert pareto_front(rows, "eps", "fidelity/fd", "min") == {"a"}
    assert pareto_front(rows, "eps", "fidelity/fd", "max") == {"a", "b"}


def test_metric_mode_and_format():
    assert report.metric_mode("fidelity/fd") == ("min", True)
    assert report.metric_mode("fidelity/ssim") == ("max", True)
    assert report.metric_mode("control/LVEDV/r") == ("max", True)
    assert report.metric_mode("control/LVEDV/mae") == ("min", True)
    assert report.metric_mode("my/metric") == ("min", False)
    assert report.metric_mode("my/metric", "max") == ("max", True)
    assert [report.fmt_num(v) for v in (None, INF, 0.0, 123.456, 0.0012346, 1.0)] == \
        ["-", "inf", "0", "123.5", "0.001235", "1"]
    assert report.plot_name("fidelity/fd") == "epsilon_vs_fidelity_fd.png"
