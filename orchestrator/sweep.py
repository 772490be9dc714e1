"""Run a validated sweep: MLflow parent run, one Tune sweep per stage in `needs` order,
selection of upstream checkpoints, and the closing summary.

State that `--resume` needs (the parent run id, finished stages and what they selected)
lives in `<output>/launch.json`; Tune's own experiment state lives in
`<output>/ray_results/<name>-<stage>` and is restored with `Tuner.restore`.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from ray import tune

from orchestrator.config import SweepConfig, stage_order
from orchestrator.launch import STATE_FILE
from orchestrator.preflight import StagePlan
from orchestrator.tracking import (ROLE, MlflowTrialLogger, client_for, default_uri, ensure_experiment)
from orchestrator.trial import DRIVER_CPUS, run_trial
from search_spaces import build_param_space, build_search_alg

STAGE_KEYS_NOT_TRAINED = {"name", "needs", "select", "init_from", "data", "search"}


def _save_state(out: Path, state: dict) -> None:
    tmp = out / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(out / STATE_FILE)  # atomic: a kill mid-write never corrupts the state


def _open_parent(client, exp_id: str, cfg: SweepConfig, sweep_file: str, state: dict) -> str:
    if state.get("parent_run_id"):
        client.update_run(state["parent_run_id"], status="RUNNING")
        return state["parent_run_id"]
    run = client.create_run(exp_id, tags={ROLE: "sweep", "orchestrator.sweep": cfg.name},
                            run_name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "sweep.yaml"
        shutil.copyfile(sweep_file, copy)
        client.log_artifact(run.info.run_id, str(copy))
    return run.info.run_id


def _trial_rows(grid, metric: str) -> list[dict]:
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append({"trial_id": m.get("trial_id") or Path(r.path).name, "ok": r.error is None and metric in m,
                     "metric": m.get(metric), "epsilon": m.get("privacy/epsilon"),
                     "checkpoint": r.checkpoint.path if r.checkpoint else m.get("checkpoint_path")})
    return rows


def public_scale_data(plans: dict[str, StagePlan], stage) -> dict | None:
    """Public data to compute an LDM's latent scale from: its own data if public, else its
    compression stage's data if public; None means no public data is at hand."""
    for name in (stage.name, stage.needs):
        if name and not plans[name].data.private:
            return plans[name].data.model_dump()
    return None


def run_stage(cfg: SweepConfig, plan: StagePlan, meta_base: dict, logger_args: dict, name: str,
              resume: bool, max_concurrent: int, upstream: dict) -> list[dict]:
    stage = plan.stage
    out = cfg.output_dir
    stage_dict = stage.model_dump(exclude=STAGE_KEYS_NOT_TRAINED)
    meta = {**meta_base, "stage": stage.name, "data": plan.data.model_dump(), "run_prefix": name,
            "needs": upstream.get("needs"), "init_from": upstream.get("init_from"),
            "scale_data": upstream.get("scale_data")}
    space = {"stage": build_param_space(stage_dict, stage.search)}
    extra = {"data.root": plan.data.root, "data.private": plan.data.private, "data.n_train": plan.n_train,
             "data.labels": ",".join(plan.data.labels), "data.shape": "x".join(map(str, plan.data.shape)),
             "cluster.workers_per_trial": meta_base["workers"]}
    for key in ("needs", "init_from"):
        if upstream.get(key):
            extra[f"upstream.{key}"] = upstream[key]
    tags = {"orchestrator.private_data": str(plan.data.private).lower()}
    if plan.data.private and not stage.dp.enabled:
        print(f"[{stage.name}] note: trains on private data without DP; its weights are not private "
              "(tagged orchestrator.private_data=true, orchestrator.dp=false)", flush=True)
    logger = MlflowTrialLogger(stage=stage.name, model=stage.model.kind, dp=stage.dp.enabled,
                               extra_tags=tags, extra_params=extra, **logger_args)
    trainable = tune.with_resources(tune.with_parameters(run_trial, meta=meta), {"cpu": DRIVER_CPUS})
    path = out / "ray_results" / name
    if resume and tune.Tuner.can_restore(str(path)):
        print(f"[{stage.name}] resuming the Tune experiment in {path}", flush=True)
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True, param_space=space)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric=stage.search.metric, mode=stage.search.mode,
                                        num_samples=stage.search.num_samples,
                                        search_alg=build_search_alg(stage.search, stage.train.seed),
                                        max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=name, storage_path=str(out / "ray_results"), callbacks=[logger],
                                      verbose=1),
        )
    grid = _fit_noting_interrupts(tuner)
    return _trial_rows(grid, stage.search.metric)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _fit_noting_interrupts(tuner):
    """Tune catches Ctrl-C itself: it saves its state, stops the trials and returns as if
    the sweep had ended. The stage must then not be recorded as finished. Tune puts back
    the SIGINT handler it found only when it caught the signal, which is how we tell."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        grid = tuner.fit()
        interrupted = signal.getsignal(signal.SIGINT) is _interrupt
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted or len(grid) > grid.num_terminated + grid.num_errors:
        raise KeyboardInterrupt
    return grid


def _select(rows: list[dict], how: str, mode: str) -> list[dict]:
    ok = [r for r in rows if r["ok"] and r["checkpoint"]]
    if how == "each" or not ok:
        return ok
    sign = 1 if mode == "min" else -1
    return [min(ok, key=lambda r: sign * r["metric"])]


def _fmt(x, spec=".4g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_summary(cfg: SweepConfig, results: dict, uri: str, out: Path) -> None:
    print("\nsummary")
    print(f"{'stage':<14}{'trials ok':>10}  {'best metric':<24}{'epsilon range':>18}")
    for stage in stage_order(cfg.stages):
        rows = results.get(stage.name)
        if rows is None:
            print(f"{stage.name:<14}{'skipped':>10}")
            continue
        ok = [r for r in rows if r["ok"]]
        best = _select(rows, "best", stage.search.mode)
        best_s = f"{stage.search.metric}={_fmt(best[0]['metric'])}" if best else "-"
        eps = [r["epsilon"] for r in ok if r["epsilon"] is not None]
        eps_s = f"{min(eps):.3g} .. {max(eps):.3g}" if eps else "non-DP"
        print(f"{stage.name:<14}{len(ok):>5}/{len(rows):<4}  {best_s:<24}{eps_s:>18}")
    print(f"\nMLflow experiment '{cfg.name}' in {uri}")
    if uri.startswith("sqlite:"):
        print(f"open it with: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    print(f"results and checkpoints: {out}")


def run_sweep(cfg: SweepConfig, plans: dict[str, StagePlan], args, *, use_gpu: bool, max_concurrent: int) -> int:
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    state = json.loads((out / STATE_FILE).read_text()) if args.resume and (out / STATE_FILE).exists() else {}
    uri = cfg.tracking.uri or default_uri(out)
    client = client_for(uri)
    exp_id = ensure_experiment(client, cfg.name, None if cfg.tracking.uri else out / "mlartifacts")
    parent = _open_parent(client, exp_id, cfg, args.sweep, state)
    state.update({"parent_run_id": parent, "status": "running", "tracking_uri": uri})
    state.setdefault("stages", {})
    _save_state(out, state)
    print(f"MLflow parent run {parent} in experiment '{cfg.name}'", flush=True)

    c = cfg.cluster
    meta_base = {"delta": cfg.privacy.delta, "accountant": cfg.privacy.accountant,
                 "workers": c.workers_per_trial, "cpus_per_worker": c.cpus_per_worker, "use_gpu": use_gpu,
                 "storage_path": str(out / "ray_results"), "max_failures": c.max_failures,
                 "cache_dir": str(out / ".cache")}
    logger_args = {"uri": uri, "experiment_id": exp_id, "parent_run_id": parent}
    results: dict[str, list[dict]] = {}
    selected: dict[str, list[dict]] = {}
    failed = False
    for stage in stage_order(cfg.stages):
        deps = [d for d in (stage.needs, stage.init_from) if d]
        missing = [d for d in deps if not selected.get(d)]
        if missing:
            print(f"[{stage.name}] skipped: stage {missing[0]!r} it depends on produced no checkpoint", flush=True)
            failed = True
            continue
        done = state["stages"].get(stage.name)
        if done and done.get("finished"):
            print(f"[{stage.name}] already finished in the launch being resumed", flush=True)
            results[stage.name], selected[stage.name] = done["rows"], done["selected"]
            continue
        init = selected[stage.init_from][0]["checkpoint"] if stage.init_from else None
        ups = selected[stage.needs] if stage.needs else [None]
        rows = []
        for up in ups:
            name = f"{cfg.name}-{stage.name}"
            if stage.select == "each" and up is not None:
                name += f"-{up['trial_id']}"
            upstream = {"needs": up["checkpoint"] if up else None, "init_from": init,
                        "scale_data": public_scale_data(plans, stage)}
            rows += run_stage(cfg, plans[stage.name], meta_base, logger_args, name, args.resume,
                              max_concurrent, upstream)
        results[stage.name] = rows
        selected[stage.name] = _select(rows, stage.select or "best", stage.search.mode)
        if len([r for r in rows if r["ok"]]) < len(rows):
            failed = True
        state["stages"][stage.name] = {"finished": True, "rows": rows, "selected": selected[stage.name]}
        _save_state(out, state)
        if selected[stage.name]:
            client.set_tag(parent, f"orchestrator.selected.{stage.name}",
                           ",".join(r["checkpoint"] for r in selected[stage.name])[:5000])

    state["status"] = "finished"
    _save_state(out, state)
    client.set_terminated(parent, status="FAILED" if failed else "FINISHED")
    print_summary(cfg, results, uri, out)
    return 1 if failed else 0
