"""The sweep's privacy books: what each released model cost, and what choosing it cost.

Built from the trials' own records (the privacy facts every DP trial reports: sigma, q,
steps) and the stage graph (which upstream checkpoint a trial used), after each stage:

- a trial's lineage: the trial, the compression model it was trained on (`needs`), the
  checkpoint it started from (`init_from`), and theirs; each lineage member that trained on
  private data is a DP-SGD mechanism on that dataset, or, without DP, no privacy at all
  (epsilon_total = inf). Public data costs nothing. `privacy/epsilon_total` is the lineage
  composed with the sweep's accountant (orchestrator/ledger.py), per private dataset, max.
- the cost of tuning: picking the best of a stage's K trials by a metric computed on
  private data is itself a release. Reported as the naive composition over all K trials
  and, when the number of trials was random, the Papernot-Steinke repeat-and-select bound.
- the study total: every DP mechanism of the launch on each private dataset, composed.

The ledger JSON (`privacy_ledger.json`, also an artifact of the parent run) lists every
mechanism with (sigma, q, steps), the accountant and delta, so anyone can recompute it.
"""
from __future__ import annotations

from typing import Optional

from orchestrator import ledger as L
from orchestrator.config import StageConfig, search_combinations

INF = float("inf")


def mechanism_of(row: dict) -> Optional[L.Mechanism]:
    if not row.get("dp") or row.get("sigma") is None:
        return None
    return L.Mechanism(sigma=float(row["sigma"]), sample_rate=float(row["q"]), steps=int(row["steps"]),
                       stage=row["stage"], trial=row["trial_id"], data=row["data"])


def lineage(row: dict, by_key: dict[str, dict]) -> list[dict]:
    """The trial and every upstream trial whose weights it carries (deduplicated)."""
    out, todo, seen = [], [row], set()
    while todo:
        r = todo.pop()
        if r["key"] in seen:
            continue
        seen.add(r["key"])
        out.append(r)
        todo += [by_key[k] for k in (r.get("needs_key"), r.get("init_key")) if k and k in by_key]
    return out


def lineage_total(row: dict, by_key: dict[str, dict], delta: float, accountant: str) -> tuple[float, dict]:
    members = lineage(row, by_key)
    leaks = [m for m in members if m.get("private") and not m.get("dp")]
    unknown = [m for m in members if m.get("private") and m.get("dp") and mechanism_of(m) is None]
    mechs = [mech for m in members if m.get("private") and (mech := mechanism_of(m)) is not None]
    book = L.ledger_for(mechs, delta, accountant)
    book["lineage"] = [m["key"] for m in members]
    if leaks or unknown:   # never a finite number that might under-report
        book["epsilon_total"] = INF
        book["not_private"] = ([f"{m['stage']}/{m['trial_id']} trained on private data {m['data']} without DP"
                                for m in leaks]
                               + [f"{m['stage']}/{m['trial_id']} reported no privacy facts (failed before "
                                  "its first epoch?)" for m in unknown])
    return book["epsilon_total"], book


def stage_candidates(stage: StageConfig, n_train: int, delta: float, accountant: str, data: str,
                     rows: list[dict]) -> list[list[L.Mechanism]]:
    """Every configuration a random trial of the stage could run (the searched values'
    candidates; the ends of a continuous range) plus what the trials actually ran (a
    restarted trial may have taken more steps than planned)."""
    from trainers.loop import plan_privacy

    out = []
    for _, trial in search_combinations(stage, limit=64):
        variant = StageConfig.model_validate({**trial, "name": stage.name})
        if variant.dp.enabled:
            f = plan_privacy(variant, n_train, delta, accountant)
            out.append([L.Mechanism(f.noise_multiplier, f.sample_rate, f.steps_planned, stage.name, "candidate", data)])
    out += [[m] for r in rows if (m := mechanism_of(r)) is not None]
    return out


def stage_tuning(stage: StageConfig, plan, rows: list[dict], delta: float, accountant: str,
                 num_samples: Optional[dict]) -> dict:
    """The cost of picking the best trial of this stage by a metric on its data."""
    out: dict = {"stage": stage.name, "data": plan.data.root, "private": plan.data.private,
                 "trials": len(rows), "method": stage.search.method, "metric": stage.search.metric}
    if not plan.data.private:
        out.update(note="public data: selection costs nothing", epsilon_naive=0.0)
        return out
    if any(not r.get("dp") for r in rows):
        out.update(note="trials trained on private data without DP: selection is not private", epsilon_naive=INF)
        return out
    if any(mechanism_of(r) is None for r in rows):
        out.update(note="a DP trial reported no privacy facts: selection cost unknown", epsilon_naive=INF)
        return out
    per_trial = [[m] for r in rows if (m := mechanism_of(r)) is not None]
    out["epsilon_naive"] = L.naive_tuning_epsilon(per_trial, delta, accountant) if per_trial else 0.0
    if num_samples:
        out["num_samples"] = num_samples
        cands = stage_candidates(stage, plan.n_train, delta, accountant, plan.data.root, rows)
        if cands:
            out["epsilon_repeat_and_select"] = L.repeat_and_select_epsilon(
                cands, delta, mean=num_samples["mean"], shape=num_samples.get("shape"))
            out["repeat_and_select_accountant"] = "rdp (dp-accounting, Papernot-Steinke)"
    note = L.tuning_dp_event_note(stage.search.method, adaptive_or_early_stopping=stage.search.method == "optuna")
    if num_samples is None and note is None and len(rows) > 1:
        note = "fixed number of trials: only the naive composition bounds the choice of the best"
    if note:
        out["outside_theorem"] = note
    return out


def study_totals(rows: list[dict], delta: float, accountant: str) -> dict:
    mechs = [m for r in rows if r.get("private") and (m := mechanism_of(r)) is not None]
    book = L.ledger_for(mechs, delta, accountant)
    if any(r.get("private") and not r.get("dp") for r in rows):
        book["non_dp_on_private_data"] = sorted({r["stage"] for r in rows if r.get("private") and not r.get("dp")})
    return book
