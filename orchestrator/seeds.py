"""One configuration, several seeds: the report's rows aggregated over `train.seed`.

A configuration is a stage's trained config (the `model.`, `train.`, `dp.`, `eval.`,
`audit.` params) without `train.seed`, together with the configuration of the model it was
built on (`upstream.*` checkpoints, matched to their trials): an LDM fine-tuned from seed 1's
pretraining and one from seed 2's are the same configuration. Per configuration and metric:
the mean over its trials and a 95% interval:

* two or more trials: Student's t interval of the mean over seeds (training randomness, and
  the draws of each trial's evaluation);
* one trial: its own bootstrap interval (`<metric>_ci_low` / `_ci_high`, evaluation
  randomness only), if it logged one.

`eval.n_samples` is part of the configuration, so scores are only ever averaged, and plotted
side by side by the report, at one sample count: the Frechet distance's small-sample bias is
large (two samples of 32 from one distribution: FD about 160 in 120 features), so FDs at
different counts are not comparable.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

from scipy import stats

CONFIG_PREFIXES = ("model.", "train.", "dp.", "eval.", "audit.")
SEED = "train.seed"
N_SAMPLES = "eval/n_samples"


def _own_key(row: dict) -> tuple:
    params = row.get("params") or {}
    return (row["stage"],) + tuple(sorted((k, v) for k, v in params.items()
                                          if k.startswith(CONFIG_PREFIXES) and k != SEED))


def configuration_keys(rows: list[dict]) -> dict[str, tuple]:
    """run_id -> configuration key (own config + the upstream trials' keys, recursively)."""
    by_ckpt = {str(Path(r["checkpoint"]).parent): r for r in rows if r.get("checkpoint")}
    keys: dict[str, tuple] = {}

    def key(r, depth=0):
        if r["run_id"] not in keys:
            ups = []
            for up in r.get("upstream") or []:
                parent = by_ckpt.get(str(Path(up.rstrip("/")).parent)) or by_ckpt.get(up.rstrip("/"))
                ups.append(key(parent, depth + 1) if parent is not None and depth < 8 else ("checkpoint", up))
            keys[r["run_id"]] = _own_key(r) + (tuple(ups),)
        return keys[r["run_id"]]

    for r in rows:
        key(r)
    return keys


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean; (v, nan, nan) for one value."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, math.nan, math.nan
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return m, m - half, m + half


def _num(v) -> Optional[float]:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def aggregate(rows: list[dict], metrics: list[str]) -> list[dict]:
    """One dict per configuration, in the rows' order: stage, model, family, dp, epsilon_total
    (the mean: equal over seeds unless sigma was solved differently), seeds (the values),
    n (trials), run_ids, and per metric `<m>` (mean), `<m>_low`, `<m>_high`, `<m>_n` (trials
    with a value) and `<m>_interval` ("seeds", "bootstrap" or "")."""
    keys = configuration_keys(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(keys[r["run_id"]], []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        eps = [r["epsilon_total"] for r in members if r.get("epsilon_total") is not None]
        g = {"stage": first["stage"], "model": first["model"], "family": first["family"], "dp": first["dp"],
             "private_data": first.get("private_data", True), "status": first.get("status", ""),
             "epsilon_total": (math.inf if any(e == math.inf for e in eps) else sum(eps) / len(eps)) if eps else None,
             "seeds": [(r.get("params") or {}).get(SEED) for r in members], "n": len(members),
             "run_ids": [r["run_id"] for r in members], "n_samples": _num(first.get(N_SAMPLES)),
             "run_name": first.get("run_name", "")}
        for m in metrics:
            vals = [v for v in (_num(r.get(m)) for r in members) if v is not None]
            if not vals:
                continue
            mean, lo, hi = mean_interval(vals)
            kind = "seeds" if len(vals) > 1 else ""
            if len(vals) == 1:
                one = next(r for r in members if _num(r.get(m)) is not None)
                lo, hi = _num(one.get(f"{m}_ci_low")), _num(one.get(f"{m}_ci_high"))
                kind = "bootstrap" if lo is not None and hi is not None else ""
                lo, hi = (lo, hi) if kind else (math.nan, math.nan)
            g.update({m: mean, f"{m}_low": lo, f"{m}_high": hi, f"{m}_n": len(vals), f"{m}_interval": kind})
        out.append(g)
    return out


def sample_count_note(rows: list[dict], metric: str) -> Optional[str]:
    """A warning when trials of one family scored `metric` on different numbers of volumes."""
    for fam in dict.fromkeys(r["family"] for r in rows):
        counts = sorted({_num(r.get(N_SAMPLES)) for r in rows
                         if r["family"] == fam and _num(r.get(metric)) is not None} - {None})
        if len(counts) > 1:
            return (f"note: {fam} trials scored {metric} on {', '.join(str(int(c)) for c in counts)} volumes; "
                    "scores at different sample counts are not comparable (compare within one eval.n_samples)")
    return None


def write_configurations_csv(groups: list[dict], metrics: list[str], path: Path) -> None:
    fields = ["stage", "model", "dp", "epsilon_total", "n", "seeds", "n_samples"]
    for m in metrics:
        fields += [m, f"{m}_low", f"{m}_high", f"{m}_interval"]
    fields += ["run_ids"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for g in groups:
            w.writerow([" ".join(map(str, g[k])) if isinstance(g.get(k), list) else
                        "" if g.get(k) is None else g[k] for k in fields])


def plot_configurations(groups: list[dict], metric: str, mode: str, path: Path, title: str) -> bool:
    """`metric` (mean over seeds, 95% error bars) against epsilon_total, one line per stage;
    False (nothing written) when no configuration has the metric."""
    from orchestrator.report import _x_layout

    pts = [g for g in groups if g.get(metric) is not None and g.get("epsilon_total") is not None
           and not math.isnan(g["epsilon_total"])]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lay = _x_layout([g["epsilon_total"] for g in pts])
    xpos = lambda e: lay["public"] if e <= 0 else lay["inf"] if e == math.inf else e  # noqa: E731
    fig, ax = plt.subplots(figsize=(8.5, 5))
    ax.set_xscale("log")
    for i, stage in enumerate(dict.fromkeys(g["stage"] for g in pts)):
        mine = sorted((g for g in pts if g["stage"] == stage), key=lambda g: xpos(g["epsilon_total"]))
        xs, ys = [xpos(g["epsilon_total"]) for g in mine], [g[metric] for g in mine]
        lo = [y - g[f"{metric}_low"] if not math.isnan(g[f"{metric}_low"]) else 0 for y, g in zip(ys, mine)]
        hi = [g[f"{metric}_high"] - y if not math.isnan(g[f"{metric}_high"]) else 0 for y, g in zip(ys, mine)]
        seeds = max(g[f"{metric}_n"] for g in mine)
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4, color=plt.get_cmap("tab10")(i % 10),
                    label=f"{stage} ({seeds} seed{'s' if seeds > 1 else ''})")
    ticks = sorted({xpos(g["epsilon_total"]) for g in pts})
    labels = ["public" if t == lay["public"] else "non-DP" if t == lay["inf"] else format(t, ".3g") for t in ticks]
    ax.set_xlim(*lay["xlim"])
    ax.set_xticks(ticks, labels)
    ax.minorticks_off()
    n = sorted({int(g["n_samples"]) for g in pts if g.get("n_samples")})
    ax.set_xlabel("epsilon_total (whole lineage on the private data)")
    ax.set_ylabel(f"{metric} ({'lower' if mode == 'min' else 'higher'} is better)")
    ax.set_title(title + (f"\nmean and 95% interval; scored on {', '.join(map(str, n))} test volumes" if n else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True
