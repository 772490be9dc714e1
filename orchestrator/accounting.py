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

import copy
import itertools
import math
from typing import Optional

from orchestrator import ledger as L
from orchestrator.config import StageConfig, set_path

INF = float("inf")


def mechanism_of(row: dict) -> Optional[L.Mechanism]:
    if not row.get("dp") or row.get("sigma") is None:
        return None
    return L.Mechanism(sigma=float(row["sigma"]), sample_rate=float(row["q"]), steps=int(row["steps"]),
                       stage=row["stage"], trial=row["trial_id"], data=row["data"],
                       unit=row.get("unit") or "record", group_size=int(row.get("group_size") or 0))


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
    if leaks or unknown:   # never a finite number that might under-report, per volume or per patient
        book["epsilon_total"] = INF
        book["epsilon_total_subject"] = INF
        book["not_private"] = ([f"{m['stage']}/{m['trial_id']} trained on private data {m['data']} without DP"
                                for m in leaks]
                               + [f"{m['stage']}/{m['trial_id']} reported no privacy facts (failed before "
                                  "its first epoch?)" for m in unknown])
    return book["epsilon_total"], book


# The keys of a stage config that decide a DP trial's mechanism (sigma, q, steps); the rest
# (learning rate, latent size, ...) change the model, not what is released about a person.
PRIVACY_KEYS = ("dp.enabled", "dp.noise_multiplier", "dp.target_epsilon", "train.batch_size", "train.epochs",
                "train.max_steps_per_epoch")
EXACT_LIMIT = 512   # distinct privacy configurations priced one by one; beyond: an envelope


def _privacy_values(path: str, spec) -> list:
    """Every value of `path` a trial can draw, or for a continuous range the end where
    epsilon is largest (every accountant's RDP curve decreases pointwise in sigma, and a
    solved sigma decreases in the target epsilon, so that end is above every point)."""
    if spec.values is not None:
        return list(spec.values)
    if spec.distribution is None:
        return [spec.value]
    if spec.distribution == "int_uniform":
        return list(range(int(spec.min), int(spec.max) + 1))
    if path == "dp.noise_multiplier":
        return [spec.min]
    if path == "dp.target_epsilon":
        return [spec.max]
    raise ValueError(f"{path}: no bound for a continuous range of this key")


def privacy_candidates(stage: StageConfig, n_train: int, delta: float, accountant: str,
                       data: str, unit: str = "record") -> tuple[list[list[L.Mechanism]], Optional[str]]:
    """Mechanisms that bound every configuration a random trial of the stage can draw, and
    a note when that is not the exact set: all distinct (sigma, q, steps) when there are at
    most EXACT_LIMIT privacy-relevant combinations, else one envelope (smallest sigma,
    largest q, most steps), which is above every point because the subsampled Gaussian's
    RDP increases with q and steps and decreases with sigma. A target-epsilon search too
    large to enumerate has no such envelope: ([], reason)."""
    from trainers.privacy import plan_privacy, steps_per_epoch

    searched = {p: _privacy_values(p, spec) for p, spec in stage.search.parameters.items() if p in PRIVACY_KEYS}
    base = stage.model_dump(exclude={"search", "name", "needs", "select", "init_from", "data"})
    count = math.prod(len(v) for v in searched.values())
    if count <= EXACT_LIMIT:
        plans = {}
        for values in itertools.product(*searched.values()):
            trial = copy.deepcopy(base)
            for path, value in zip(searched, values):
                set_path(trial, path, value)
            variant = StageConfig.model_validate({**trial, "name": stage.name})
            if variant.dp.enabled:
                f = plan_privacy(variant, n_train, delta, accountant)
                plans[(f.noise_multiplier, f.sample_rate, f.steps_planned)] = f
        return [[L.Mechanism(s, q, n, stage.name, "candidate", data, unit)] for s, q, n in plans], None
    worst = lambda path, pick, default: pick(searched[path]) if path in searched else default  # noqa: E731
    if "dp.target_epsilon" in searched or stage.dp.noise_multiplier is None:
        return [], (f"{count} privacy-relevant combinations with a solved noise multiplier: too many to price "
                    f"one by one (limit {EXACT_LIMIT}) and no provable envelope; repeat-and-select not reported")
    sigma = worst("dp.noise_multiplier", min, stage.dp.noise_multiplier)
    b_max, b_min = worst("train.batch_size", max, stage.train.batch_size), worst("train.batch_size", min, stage.train.batch_size)
    epochs = worst("train.epochs", max, stage.train.epochs)
    caps = searched.get("train.max_steps_per_epoch", [stage.train.max_steps_per_epoch])
    per_epoch = steps_per_epoch(n_train, b_min)
    if None not in caps:
        per_epoch = min(per_epoch, max(caps))
    steps = per_epoch * epochs
    q = min(1.0, b_max / n_train)
    note = (f"{count} privacy-relevant combinations: bounded by the envelope sigma={sigma:g}, q={q:.4g}, "
            f"steps={steps} (above every combination, not tight)")
    return [[L.Mechanism(sigma, q, steps, stage.name, "envelope", data, unit)]], note


def stage_candidates(stage: StageConfig, n_train: int, delta: float, accountant: str, data: str,
                     rows: list[dict], unit: str = "record") -> tuple[list[list[L.Mechanism]], Optional[str]]:
    """`privacy_candidates` plus what the trials actually ran (a restarted trial may have
    taken more steps than planned)."""
    cands, note = privacy_candidates(stage, n_train, delta, accountant, data, unit)
    if not cands:
        return [], note
    return cands + [[m] for r in rows if (m := mechanism_of(r)) is not None], note


def selection_mechanisms(stage: StageConfig, data: str, rows: list[dict], unit: str = "record",
                         group_size: Optional[int] = None) -> list[L.Mechanism]:
    """`search.select_on: dp`: each trial released one Gaussian mechanism (q = 1, one step)
    on the people of the validation split (per subject with unit subject: the noise is
    scaled to a whole subject's clipped losses, trainers/validation.py)."""
    return [L.Mechanism(float(r.get("select_sigma") or stage.search.select_dp.noise_multiplier), 1.0, 1,
                        stage.name, r["trial_id"], data + "#validation", unit, group_size or 0) for r in rows]


def stage_selection(stage: StageConfig, plan, rows: list[dict], delta: float, accountant: str) -> dict:
    """What choosing among the stage's trials spent of the people whose data ranked them
    (the validation split for val/ metrics, the test split for evaluation metrics); the
    training split's cost of tuning is `epsilon_naive` / `epsilon_repeat_and_select`."""
    split = "validation" if stage.search.metric.startswith("val/") else "testing"
    out = {"select_on": stage.search.select_on, "metric": stage.search.metric, "split": split}
    chose = len(rows) > 1   # the best of them is what downstream stages and the report take
    if stage.search.select_on == "public":
        out.update(data=plan.select_data.root if plan.select_data else None, epsilon=0.0,
                   note="ranked on public data: nothing private spent")
    elif not plan.data.private or not chose:
        out.update(data=plan.data.root, epsilon=0.0,
                   note="public data" if not plan.data.private else "no choice among trials")
    elif stage.search.select_on == "dp":
        mechs = selection_mechanisms(stage, plan.data.root, rows, plan.unit, plan.val_group_size)
        book = L.ledger_for(mechs, delta, "rdp" if accountant == "gdp" else accountant)
        out.update(data=plan.data.root + "#validation", epsilon=book["epsilon_total"],
                   mechanisms=[m.to_dict() for m in mechs],
                   clip=stage.search.select_dp.clip, noise_multiplier=stage.search.select_dp.noise_multiplier,
                   note=f"Gaussian mechanism on clipped per-sample validation losses, once per trial, "
                        f"{len(mechs)} composed")
    else:
        out.update(data=f"{plan.data.root}#{split}", epsilon=INF,
                   note=f"ranked by {stage.search.metric} on the private {split} split, outside any mechanism: "
                        f"unbounded for the people of that split (use search.select_on: public or dp)")
    return out


def stage_tuning(stage: StageConfig, plan, rows: list[dict], delta: float, accountant: str,
                 num_samples: Optional[dict]) -> dict:
    """The cost of picking the best trial of this stage by a metric on its data."""
    out: dict = {"stage": stage.name, "data": plan.data.root, "private": plan.data.private,
                 "trials": len(rows), "method": stage.search.method, "metric": stage.search.metric,
                 "selection": stage_selection(stage, plan, rows, delta, accountant)}
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
    # Papernot-Steinke covers a random number of i.i.d. random draws only: never a grid
    # (K repeats of a fixed grid) or an adaptive search.
    if num_samples and stage.search.method == "random":
        out["num_samples"] = num_samples
        cands, note = stage_candidates(stage, plan.n_units, delta, accountant, plan.data.root, rows, plan.unit)
        if note:
            out["candidates_note"] = note
        if cands:
            out["epsilon_repeat_and_select"] = L.repeat_and_select_epsilon(
                cands, delta, mean=num_samples["mean"], shape=num_samples.get("shape"))
            out["repeat_and_select_accountant"] = "rdp (dp-accounting, Papernot-Steinke)"
            out["repeat_and_select_candidates"] = len(cands)
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
