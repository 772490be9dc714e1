"""Run a validated sweep: MLflow parent run, one Tune sweep per stage in `needs` order,
selection of upstream checkpoints, and the closing summary.

State that `--resume` needs (the parent run id, finished stages and what they selected)
lives in `<output>/launch.json`; Tune's own experiment state lives in
`<output>/ray_results/<name>-<stage>` and is restored with `Tuner.restore`.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import secrets

import numpy as np
from ray import tune

from orchestrator import accounting
from orchestrator.config import RandomCount, SweepConfig, stage_order
from orchestrator.ledger import draw_num_samples, write_ledger_json
from orchestrator.launch import STATE_FILE
from orchestrator.preflight import StagePlan
from orchestrator.progress import ConsoleProgress
from orchestrator.tracking import (ROLE, TRIAL_KEY, MlflowTrialLogger, client_for, default_uri, ensure_experiment,
                                   redact, with_patience)
from orchestrator.trial import DRIVER_CPUS, run_trial
from search_spaces import build_param_space, build_search_alg

STAGE_KEYS_NOT_TRAINED = {"name", "needs", "select", "init_from", "data", "search", "privacy"}


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
        # credentials in a URI (tracking.uri: http://user:pass@host) never reach MLflow
        copy.write_text(redact(Path(sweep_file).read_text()))
        client.log_artifact(run.info.run_id, str(copy))
    return run.info.run_id


def _trial_rows(grid, metric: str) -> list[dict]:
    rows = []
    for r in grid:
        m = r.metrics or {}
        stage_cfg = (r.config or {}).get("stage", {})
        dp = stage_cfg.get("dp", {}).get("enabled")
        rows.append({"trial_id": m.get("trial_id") or Path(r.path).name, "ok": r.error is None and metric in m,
                     "metric": m.get(metric), "epsilon": m.get("privacy/epsilon"),
                     "checkpoint": r.checkpoint.path if r.checkpoint else m.get("checkpoint_path"),
                     "dp": bool(dp), "sigma": m.get("privacy.noise_multiplier"), "q": m.get("privacy.sample_rate"),
                     "steps": m.get("privacy/steps"), "epoch": m.get("epoch"),
                     "select_sigma": m.get("select.noise_multiplier"),
                     "unit": m.get("privacy.unit", "record"), "group_size": m.get("privacy.group_size"),
                     "dp_release": bool(dp) and not stage_cfg.get("dp", {}).get("reproducible"),
                     # trained with canaries (stage `audit`): never selected, never a released model
                     "audit": bool(stage_cfg.get("audit"))})
    return rows


def public_scale_data(plans: dict[str, StagePlan], stage) -> dict | None:
    """Public data to compute an LDM's latent scale from: its own data if public, else its
    compression stage's data if public; None means no public data is at hand."""
    for name in (stage.name, stage.needs):
        if name and not plans[name].data.private:
            return plans[name].data.model_dump()
    return None


def run_stage(cfg: SweepConfig, plan: StagePlan, meta_base: dict, logger_args: dict, name: str,
              resume: bool, max_concurrent: int, upstream: dict, num_samples: int, verbose: bool = False) -> list[dict]:
    stage = plan.stage
    out = cfg.output_dir
    stage_dict = stage.model_dump(exclude=STAGE_KEYS_NOT_TRAINED)
    meta = {**meta_base, "stage": stage.name, "data": plan.data.model_dump(), "run_prefix": name,
            "needs": upstream.get("needs"), "init_from": upstream.get("init_from"),
            "scale_data": upstream.get("scale_data"), "select": selection_meta(plan, meta_base), "unit": plan.unit}
    space = {"stage": build_param_space(stage_dict, stage.search)}
    extra = {"data.root": plan.data.root, "data.private": plan.data.private, "data.n_train": plan.n_train,
             "data.labels": ",".join(plan.data.labels), "data.shape": "x".join(map(str, plan.data.shape)),
             "cluster.workers_per_trial": meta_base["workers"], "cluster.cpus_per_worker": meta_base["cpus_per_worker"],
             "privacy.unit": plan.unit}
    if plan.n_subjects is not None:
        extra.update({"data.n_subjects": plan.n_subjects, "data.max_volumes_per_subject": plan.group_size})
    for key in ("needs", "init_from"):
        if upstream.get(key):
            extra[f"upstream.{key}"] = upstream[key]
    tags = {"orchestrator.private_data": str(plan.data.private).lower()}
    if plan.data.private and not stage.dp.enabled:
        print(f"[{stage.name}] note: trains on private data without DP; its weights are not private "
              "(tagged orchestrator.private_data=true, orchestrator.dp=false)", flush=True)
    searched = list(stage.search.parameters)
    repeats = stage.search.method == "grid" and num_samples > 1
    logger = MlflowTrialLogger(stage=stage.name, model=stage.model.kind, dp=stage.dp.enabled,
                               extra_tags=tags, extra_params=extra, searched=searched, repeats=repeats, **logger_args)
    progress = ConsoleProgress(stage.name, stage.train.epochs, searched, repeats, ranking_metric(stage))
    trainable = tune.with_resources(tune.with_parameters(run_trial, meta=meta), {"cpu": DRIVER_CPUS})
    path = out / "ray_results" / name
    if resume and tune.Tuner.can_restore(str(path)):
        print(f"[{stage.name}] resuming the Tune experiment in {path}", flush=True)
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True, param_space=space)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric=ranking_metric(stage), mode=stage.search.mode,
                                        num_samples=num_samples,
                                        search_alg=build_search_alg(stage.search, stage.train.seed),
                                        max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=name, storage_path=str(out / "ray_results"), callbacks=[logger, progress],
                                      verbose=1 if verbose else 0),
        )
    grid = _fit_noting_interrupts(tuner)
    return _trial_rows(grid, ranking_metric(stage))


def ranking_metric(stage) -> str:
    """The metric Tune ranks trials by: the stage's own, or its `select/` twin computed on
    public data or with DP (trainers/loop.py: _selection_metrics)."""
    return stage.search.metric if stage.search.select_on == "private" else f"select/{stage.search.metric}"


def selection_meta(plan: StagePlan, meta_base: dict) -> dict | None:
    s = plan.stage.search
    if s.select_on == "private":
        return None
    out = {"on": s.select_on, "metric": s.metric}
    if s.select_on == "public":
        out.update(data=plan.select_data.model_dump(), cache_dir=meta_base["cache_dir"])
    else:
        # unit subject: one subject moves the clipped sum by up to (its volumes) x clip
        group = (plan.val_group_size or 1) if plan.unit == "subject" else 1
        out.update(clip=s.select_dp.clip, noise_multiplier=s.select_dp.noise_multiplier, group=group)
    return out


def trial_count(stage, state: dict, out: Path, client, parent: str) -> int:
    """Tune's num_samples; a random count is drawn once per launch (kept for --resume: a
    redraw after an interruption would void the repeat-and-select bound)."""
    spec = stage.search.num_samples
    if not isinstance(spec, RandomCount):
        return int(spec)
    drawn = state.setdefault("num_samples", {})
    if stage.name not in drawn:
        rng = np.random.default_rng(secrets.randbits(128))
        drawn[stage.name] = {**spec.model_dump(exclude_none=True), "drawn": draw_num_samples(spec.model_dump(), rng)}
        _save_state(out, state)
        with_patience(client.log_param, parent, f"search.num_samples_drawn.{stage.name}", drawn[stage.name]["drawn"])
    k = int(drawn[stage.name]["drawn"])
    law = spec.distribution + (f" shape {spec.shape:g}" if spec.shape is not None else "")
    print(f"[{stage.name}] number of trials drawn from {law} with mean {spec.mean:g}: {k}"
          + (" (nothing is trained or released; the repeat-and-select bound allows a zero draw)" if k == 0 else ""),
          flush=True)
    return k


def stage_plan_line(stage, plan: StagePlan) -> str:
    """`ae_dp (4 trials: dp.noise_multiplier x model.latent_channels, DP, private data)`."""
    spec = stage.search.num_samples
    if isinstance(spec, RandomCount):
        count = f"~{spec.mean:g} trials (random count)"
    else:
        n = stage_trials(stage, int(spec))
        count = f"{n} trial{'s' if n != 1 else ''}"
    over = " x ".join(stage.search.parameters)
    kind = "DP" if stage.dp.enabled else "non-DP"
    data = "private data" if plan.data.private else "public data"
    return f"{stage.name} ({count}{': ' + over if over else ''}; {stage.model.kind}, {kind}, {data})"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def update_books(cfg: SweepConfig, plans: dict[str, StagePlan], results: dict, state: dict, client,
                 exp_id: str, parent: str, out: Path) -> dict:
    """Recompute the privacy ledger over the stages finished so far and publish it: each
    trial's `privacy/epsilon_total`, the parent's totals and tuning costs, and the ledger
    JSON (see orchestrator/accounting.py)."""
    delta, acct = cfg.privacy.delta, cfg.privacy.accountant
    rows = [r for stage_rows in results.values() for r in stage_rows if "key" in r]
    by_key = {r["key"]: r for r in rows}
    trials = {}
    for r in rows:
        total, book = accounting.lineage_total(r, by_key, delta, acct)
        trials[r["key"]] = {"stage": r["stage"], "trial": r["trial_id"], "epsilon": r.get("epsilon"), **book}
        if r.get("audit"):   # trained with canaries: its training counts in the study, it is no release
            trials[r["key"]].update(audit=True, released=False)
        if r.get("total_logged") == total or not (r.get("dp") or r.get("private") or total):
            continue
        found = with_patience(client.search_runs, [exp_id], filter_string=f"tags.`{TRIAL_KEY}` = '{r['key']}'",
                              max_results=1)
        if not found:
            continue
        run_id = found[0].info.run_id
        # MLflow stores +inf as the largest double; the tag says why it is not finite.
        with_patience(client.log_metric, run_id, "privacy/epsilon_total", total, step=int(r.get("epoch") or 0))
        if book.get("epsilon_total_subject") is not None:   # the patient's, when subjects are declared
            with_patience(client.log_metric, run_id, "privacy/epsilon_total_subject", book["epsilon_total_subject"],
                          step=int(r.get("epoch") or 0))
        if not math.isfinite(total):
            with_patience(client.set_tag, run_id, "orchestrator.privacy_total",
                          "not private: " + "; ".join(book.get("not_private", []))[:4000])
        r["total_logged"] = total
    tuning = {}
    for name, stage_rows in results.items():
        if stage_rows and all("key" in r for r in stage_rows):
            tuning[name] = accounting.stage_tuning(plans[name].stage, plans[name], stage_rows, delta, acct,
                                                   state.get("num_samples", {}).get(name))
    study = accounting.study_totals(rows, delta, acct)
    # The worst released model: a lineage that trained on private data without DP is
    # infinite, and so is this total (the worst DP-trained lineage is reported beside it).
    totals = [t["epsilon_total"] for t in trials.values() if t.get("released", True)]
    dp_totals = [t for t in totals if _finite(t)]
    subject = [t.get("epsilon_total_subject") for t in trials.values() if t.get("released", True)]
    payload = {"sweep": cfg.name, "parent_run_id": parent, "accountant": acct, "delta": delta,
               "how_to_recompute": "each mechanism is a Poisson-subsampled Gaussian (sigma = noise multiplier, "
                                   "q = sample rate) applied `steps` times; compose a trial's lineage per dataset; "
                                   "a selection mechanism (tuning.<stage>.selection) is a Gaussian with q = 1, "
                                   "one step, on the people of the split named after '#'",
               "trials": trials, "tuning": tuning, "study": study,
               "epsilon_total_max": max(totals) if totals else None,
               "epsilon_total_max_dp": max(dp_totals) if dp_totals else None,
               # per patient: None when a released model's data declares no subjects
               "epsilon_total_max_subject": max(subject) if subject and None not in subject else None}
    path = out / "privacy_ledger.json"
    write_ledger_json(path, _jsonable(payload))
    metrics = {"privacy/epsilon_study": study["epsilon_total"]}
    if totals:
        metrics["privacy/epsilon_total"] = max(totals)
    if dp_totals:
        metrics["privacy/epsilon_total_dp"] = max(dp_totals)
    if payload["epsilon_total_max_subject"] is not None:
        metrics["privacy/epsilon_total_subject"] = payload["epsilon_total_max_subject"]
    for name, t in tuning.items():
        sel = t["selection"]
        metrics[f"privacy/epsilon_selection/{name}"] = sel["epsilon"]
        if not _finite(sel["epsilon"]) and f"select:{name}" not in state.setdefault("warned", []):
            print(f"[{name}] privacy of selection: {sel['note']}", flush=True)
            state["warned"].append(f"select:{name}")
        if _finite(t.get("epsilon_naive")) and t.get("private"):
            metrics[f"privacy/epsilon_tuning_naive/{name}"] = t["epsilon_naive"]
        if _finite(t.get("epsilon_repeat_and_select")):
            metrics[f"privacy/epsilon_tuning_repeat_select/{name}"] = t["epsilon_repeat_and_select"]
        if t.get("outside_theorem") and t.get("private") and name not in state.setdefault("warned", []):
            print(f"[{name}] privacy of tuning: {t['outside_theorem']}", flush=True)
            state["warned"].append(name)
            with_patience(client.set_tag, parent, f"orchestrator.tuning_outside_theorem.{name}",
                          t["outside_theorem"][:4000])
    for k, v in metrics.items():
        with_patience(client.log_metric, parent, k, v)
    with_patience(client.log_artifact, parent, str(path))
    return payload


def closing_report(out: Path) -> None:
    """The epsilon-vs-fidelity table and plot (orchestrator/report.py), also logged to the parent run."""
    try:
        from orchestrator.report import main as report_main

        print("\nreport (python -m orchestrator.report " + str(out) + ")", flush=True)
        report_main([str(out)])
    except Exception as exc:  # noqa: BLE001 - the study itself is done; the report can be rerun
        print(f"warning: the report could not be written ({type(exc).__name__}: {exc}); "
              f"rerun: python -m orchestrator.report {out}", flush=True)


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
    ok = [r for r in rows if r["ok"] and r["checkpoint"] and not r.get("audit")]
    if how == "each" or not ok:
        return ok
    sign = 1 if mode == "min" else -1
    return [min(ok, key=lambda r: sign * r["metric"])]


def _fmt(x, spec=".4g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_summary(cfg: SweepConfig, results: dict, uri: str, out: Path, books: dict | None = None) -> None:
    w = max([14] + [len(st.name) + 2 for st in cfg.stages])
    print("\nsummary")
    print(f"{'stage':<{w}}{'trials ok':>10}  {'best metric':<24}{'epsilon range':>18}")
    for stage in stage_order(cfg.stages):
        rows = results.get(stage.name)
        if rows is None:
            print(f"{stage.name:<{w}}{'skipped':>10}")
            continue
        ok = [r for r in rows if r["ok"]]
        best = _select(rows, "best", stage.search.mode)
        best_s = f"{stage.search.metric}={_fmt(best[0]['metric'])}" if best else "-"
        eps = [r["epsilon"] for r in ok if r["epsilon"] is not None]
        eps_s = f"{min(eps):.3g} .. {max(eps):.3g}" if eps else "non-DP"
        print(f"{stage.name:<{w}}{len(ok):>5}/{len(rows):<4}  {best_s:<24}{eps_s:>18}")
    if books:
        study = books["study"]
        tot = books.get("epsilon_total_max")
        print(f"\nprivacy ({books['accountant']}, delta {books['delta']:g}): "
              f"worst released model epsilon_total {_fmt(tot)}"
              + (f" (worst DP-trained lineage {_fmt(books['epsilon_total_max_dp'])})"
                 if tot == math.inf and books.get("epsilon_total_max_dp") is not None else "")
              + f"; all DP training in the study composed: {_fmt(study['epsilon_total'])}")
        replays = sorted({r["stage"] for rows in results.values() for r in rows if r.get("dp") and not r.get("dp_release", True)})
        if replays:
            print(f"  not a DP release: stage(s) {', '.join(replays)} ran with dp.reproducible (noise and batches "
                  "derive from the logged seed)")
        audited = sorted({r["stage"] for rows in results.values() for r in rows if r.get("audit")})
        if audited:
            print(f"  audited: stage(s) {', '.join(audited)} trained with canaries (audit/epsilon_lower); "
                  "never selected, not a released model")
        for name, t in books["tuning"].items():
            if t.get("private") and t.get("trials", 0) > 1:
                rs = t.get("epsilon_repeat_and_select")
                sel = t["selection"]
                print(f"  choosing the best of {name}'s {t['trials']} trials: naive {_fmt(t.get('epsilon_naive'))}"
                      + (f", repeat-and-select {_fmt(rs)}" if rs is not None else "")
                      + f"; selection on {sel['select_on']}: epsilon {_fmt(sel['epsilon'])} for the {sel['split']} split")
        print(f"  ledger: {out / 'privacy_ledger.json'} (also on the parent run)")
    print(f"\nMLflow experiment '{cfg.name}' in {redact(uri)}")
    if uri.startswith("sqlite:"):
        print(f"open it with: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    elif uri.startswith("http"):
        print(f"open it in a browser: {redact(uri)} (experiment '{cfg.name}')")
    print(f"results and checkpoints: {out}")


def spread_cpus_per_worker(c, concurrent: int, n_trials: int, nodes: list[dict] | None) -> float:
    """CPUs each worker of a stage's trials reserves: `cluster.cpus_per_worker`, or with
    `cluster.spread_cpus` that times the trial slots the stage leaves idle (a lone trial
    where two fit takes both slots' CPUs), as long as the widened workers still fit the
    nodes whole (a local Ray declares one CPU more than its cores, for the trial drivers)."""
    base = c.cpus_per_worker
    if not c.spread_cpus or n_trials < 1 or concurrent <= n_trials:
        return base
    if nodes is None:
        return base * (concurrent // n_trials)
    room = [n.get("CPU", 0) - (DRIVER_CPUS if c.address else 1) for n in nodes]
    for factor in range(concurrent // n_trials, 1, -1):
        if sum(int(r // (base * factor)) for r in room) >= n_trials * c.workers_per_trial:
            return base * factor
    return base


def stage_trials(stage, count: int) -> int:
    """Trials one Tuner of this stage runs: `count` (num_samples) times the grid."""
    if stage.search.method != "grid":
        return count
    return count * math.prod(len(p.values) if p.values is not None else 1 for p in stage.search.parameters.values())


def run_sweep(cfg: SweepConfig, plans: dict[str, StagePlan], args, *, use_gpu: bool, max_concurrent: int,
              nodes: list[dict] | None = None) -> int:
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
                 "gpus_per_worker": c.gpus_per_worker,
                 "storage_path": str(out / "ray_results"), "max_failures": c.max_failures,
                 "cache_dir": str(out / ".cache"),
                 # launch started this cluster on this machine (no `cluster.address`)
                 "local_cluster": not c.address}
    logger_args = {"uri": uri, "experiment_id": exp_id, "parent_run_id": parent}
    results: dict[str, list[dict]] = {}
    selected: dict[str, list[dict]] = {}
    failed = False
    books = None
    print("plan: " + " -> ".join(stage_plan_line(s, plans[s.name]) for s in stage_order(cfg.stages)), flush=True)
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
        init = selected[stage.init_from][0] if stage.init_from else None
        # `select` is this stage's choice among its upstream's trials: the best one, or each
        ups = [None]
        if stage.needs:
            ups = (_select(results[stage.needs], "each", "min") if stage.select == "each"
                   else selected[stage.needs])
        count = trial_count(stage, state, out, client, parent)
        n_trials = stage_trials(stage, count)
        # DP stages keep their CPUs: torch 2.13's channels-last GroupNorm backward segfaulted under
        # the book-keeping per-sample hooks with 2 threads in a Ray worker (design/FACTS.md)
        cpus = (c.cpus_per_worker if stage.dp.enabled
                else spread_cpus_per_worker(c, max_concurrent, n_trials, nodes))
        stage_meta = {**meta_base, "cpus_per_worker": cpus}
        if cpus != c.cpus_per_worker:
            print(f"[{stage.name}] {n_trials} trial(s) where {max_concurrent} fit: each worker "
                  f"takes {cpus:g} CPUs ({int(cpus)} torch threads; cluster.spread_cpus)", flush=True)
        rows = []
        for up in ups:
            name = f"{cfg.name}-{stage.name}"
            if stage.select == "each" and up is not None:
                name += f"-{up['trial_id']}"
            upstream = {"needs": up["checkpoint"] if up else None, "init_from": init["checkpoint"] if init else None,
                        "scale_data": public_scale_data(plans, stage)}
            got = run_stage(cfg, plans[stage.name], stage_meta, logger_args, name, args.resume,
                            max_concurrent, upstream, count, getattr(args, "verbose", False)) if count else []
            for r in got:
                r.update(stage=stage.name, key=f"{parent}/{stage.name}/{r['trial_id']}",
                         data=plans[stage.name].data.root, private=plans[stage.name].data.private,
                         needs_key=up["key"] if up else None, init_key=init["key"] if init else None)
            rows += got
        results[stage.name] = rows
        selected[stage.name] = _select(rows, "best", stage.search.mode)
        if len([r for r in rows if r["ok"]]) < len(rows):
            failed = True
        state["stages"][stage.name] = {"finished": True, "rows": rows, "selected": selected[stage.name]}
        _save_state(out, state)
        books = update_books(cfg, plans, results, state, client, exp_id, parent, out)
        if selected[stage.name]:
            with_patience(client.set_tag, parent, f"orchestrator.selected.{stage.name}",
                           ",".join(r["checkpoint"] for r in selected[stage.name])[:5000])

    state["status"] = "finished"
    _save_state(out, state)
    if books is None and results:   # every stage had finished before this (resumed) launch
        books = update_books(cfg, plans, results, state, client, exp_id, parent, out)
    with_patience(client.set_terminated, parent, status="FAILED" if failed else "FINISHED")
    print_summary(cfg, results, uri, out, books)
    closing_report(out)
    return 1 if failed else 0
