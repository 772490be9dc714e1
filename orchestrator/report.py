"""What privacy costs in image quality and control: epsilon vs fidelity, from MLflow alone.

    python -m orchestrator.report OUTPUT_DIR_OR_EXPERIMENT [--tracking-uri URI] [--parent RUN_ID]
        [--metric NAME] [--mode min|max] [--one-front] [--out DIR] [--no-log]

OUTPUT_DIR is a launch's output folder (its `launch.json` names the tracking URI and the
parent run); otherwise the argument is an MLflow experiment name in `--tracking-uri`
(default: $MLFLOW_TRACKING_URI), and the most recent parent run (tag
orchestrator.role=sweep) is reported unless `--parent` names one.

Prints one row per trial (child run of the parent), marks the epsilon-fidelity Pareto front
(`*`), and writes `epsilon_vs_<metric>.png` and `trials.csv` to `--out` (default
`OUTPUT_DIR/report`, or `./report` for an experiment name); both are logged to the parent
run under `report/` unless `--no-log`.

Epsilon: a DP trial's own epsilon is `privacy/epsilon`; the x axis is `epsilon_total`, the
whole lineage's epsilon on the same private data (`privacy/epsilon_total`, else the trial's
own epsilon). A non-DP trial on private data has epsilon = inf ("non-DP"); a non-DP trial on
public data costs nothing (0, "public"). Where the data declares subjects, `eps_patient` is the
epsilon per patient (`privacy/epsilon_total_subject`): the same as epsilon with
`privacy.unit: subject`, a group-privacy bound over a patient's volumes with unit record.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import socket
import sys
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import urlparse

from orchestrator.errors import UserError

# The MLflow contract (ARCHITECTURE.md). Kept here rather than imported from
# orchestrator.tracking, which imports Ray: a report needs only MLflow.
ROLE, STAGE, MODEL, DP = "orchestrator.role", "orchestrator.stage", "orchestrator.model", "orchestrator.dp"
DP_RELEASE = "orchestrator.dp_release"   # "false": dp.reproducible, noise derivable from the seed
NOT_A_RELEASE = "not a DP release"
AUDIT = "orchestrator.audit"             # "true": trained with canaries, never selected or released
AUDIT_EPS = "audit/epsilon_lower"        # the audit's lower bound, shown beside the claimed epsilon
PRIVATE_DATA, CHECKPOINT, PARENT = "orchestrator.private_data", "orchestrator.checkpoint", "mlflow.parentRunId"
EPS, EPS_TOTAL = "privacy/epsilon", "privacy/epsilon_total"
EPS_SUBJECT, EPS_TOTAL_SUBJECT = "privacy/epsilon_subject", "privacy/epsilon_total_subject"
R_MEAN, ED_ES = "control/r_mean", "control/ed_es_accuracy"
STATE_FILE = "launch.json"

GENERATORS = {"ldm"}
COMPRESSION = {"beta_vae", "vq_vae"}
LATENT_PARAM = {"beta_vae": "model.latent_channels", "vq_vae": "model.embedding_dim"}

HIGHER_IS_BETTER = {"fidelity/psnr", "fidelity/ssim", R_MEAN, ED_ES}
LOWER_IS_BETTER = {"fidelity/fd", "fidelity/mmd", "fidelity/ms_ssim_diversity", "fidelity/mse", "val/loss",
                   "train/loss"}
DEFAULT_METRICS = ("fidelity/fd", "fidelity/mse", "val/loss")

# SQL stores cannot hold inf: MLflow writes +-inf as +-max float, and reads that back.
_INF_STORED = 1.7e308


# ---------------------------------------------------------------------------------------
# Reading runs

def _number(value) -> Optional[float]:
    """A param or metric as a float: None if absent or not a number; the +-max float that
    SQL stores write for +-inf is read as inf again."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if v >= _INF_STORED:
        return math.inf
    if v <= -_INF_STORED:
        return -math.inf
    return v


def _flag(value) -> Optional[bool]:
    if value is None:
        return None
    s = str(value).strip().lower()
    return True if s in ("true", "1", "yes") else False if s in ("false", "0", "no") else None


def family_of(model: str) -> str:
    """Runs whose fidelity is comparable: generators among themselves, compression models
    among themselves (any other model kind is a family of its own)."""
    return "generator" if model in GENERATORS else "compression" if model in COMPRESSION else model or "-"


def _search_all(client, experiment_ids: list, filter_string: str, order_by=None) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return runs


def _row(run) -> dict:
    tags, params, info = run.data.tags, run.data.params, run.info
    metrics = {k: _number(v) for k, v in run.data.metrics.items()}
    model = tags.get(MODEL) or params.get("model.kind") or "-"
    dp = _flag(tags.get(DP))
    if dp is None:
        dp = _flag(params.get("dp.enabled"))
    if dp is None:
        dp = metrics.get(EPS) is not None
    private = _flag(tags.get(PRIVATE_DATA))
    if private is None:
        private = _flag(params.get("data.private"))
    if private is None:
        private = True  # unknown: assume the worst, private data
    sigma = _number(params.get("privacy.noise_multiplier")) if dp else None
    if dp and sigma is None:
        sigma = _number(params.get("dp.noise_multiplier"))
    batch = params.get("train.batch_size")
    latent = params.get(LATENT_PARAM[model]) if model in LATENT_PARAM else None
    if dp:
        eps = metrics.get(EPS)
    else:
        eps = math.inf if private else 0.0
    total = metrics.get(EPS_TOTAL)
    source = "metric"
    if not dp and private:
        total, source = math.inf, "non-DP"  # nothing can make a non-private run private again
    elif total is None:
        total = eps if private else 0.0
        source = "own" if total is not None else "-"
    row = {
        "run_id": info.run_id, "run_name": info.run_name or "", "stage": tags.get(STAGE, "-"), "model": model,
        "family": family_of(model), "dp": dp, "private_data": private, "sigma": sigma,
        "sample_rate": _number(params.get("privacy.sample_rate")), "batch": batch, "latent": latent,
        "epsilon": eps, "epsilon_total": total, "epsilon_total_source": source, "status": info.status,
        "dp_release": dp and tags.get(DP_RELEASE) != "false",
        "audit": tags.get(AUDIT) == "true", "unit": params.get("privacy.unit", "record"),
        # the patient's epsilon (whole lineage when the ledger logged it): subjects declared only
        "epsilon_patient": metrics.get(EPS_TOTAL_SUBJECT, metrics.get(EPS_SUBJECT)),
        "start_time": info.start_time or 0, "checkpoint": tags.get(CHECKPOINT),
        "upstream": [params[k] for k in ("upstream.needs", "upstream.init_from") if params.get(k)],
        "params": dict(params),  # for grouping trials by configuration over seeds (orchestrator/seeds.py)
    }
    row.update(metrics)  # metric names contain "/", so they never collide with the fields above
    return row


def _same_checkpoint(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or Path(a).parent == Path(b).parent  # checkpoints of one trial share its folder


def _propagate_lineage(rows: list[dict]) -> None:
    """Where a trial logged no `privacy/epsilon_total`, it falls back to its own epsilon; but
    if a model it was built on (`upstream.needs`, `upstream.init_from`, matched to a trial's
    `orchestrator.checkpoint`) sits at epsilon = inf, so does it: never under-report."""
    for _ in range(len(rows)):  # lineages are short; iterate to a fixed point
        changed = False
        for row in rows:
            if row["epsilon_total_source"] in ("metric", "non-DP") or row["epsilon_total"] == math.inf:
                continue
            for up in row["upstream"]:
                parent = next((r for r in rows if r["checkpoint"] and _same_checkpoint(up, r["checkpoint"])), None)
                if parent is not None and parent["epsilon_total"] == math.inf:
                    row["epsilon_total"], row["epsilon_total_source"] = math.inf, "upstream non-DP"
                    changed = True
                    break
        if not changed:
            return


def _eps_sort_key(value: Optional[float]) -> tuple:
    return (1, 0.0) if value is None or math.isnan(value) else (0, value)


def collect_trials(client, experiment_id: str, parent_run_id: str) -> list[dict]:
    """The trials (child runs, tag orchestrator.role=trial) of one parent run, as dicts:
    run_id, run_name, stage, model, family, dp, private_data, sigma, sample_rate, batch,
    latent, epsilon, epsilon_total, epsilon_total_source, status, start_time, plus every
    metric's latest value under its own name ("fidelity/fd", ...). Sorted by stage (in the
    order the stages started), then epsilon_total (public 0 first, inf last, unknown after)."""
    runs = _search_all(client, [experiment_id], f"tags.`{PARENT}` = '{parent_run_id}'")
    rows = [_row(r) for r in runs if r.data.tags.get(ROLE, "trial") == "trial"]
    _propagate_lineage(rows)
    first = {}
    for r in rows:
        first[r["stage"]] = min(first.get(r["stage"], r["start_time"]), r["start_time"])
    rows.sort(key=lambda r: (first[r["stage"]], r["stage"], _eps_sort_key(r["epsilon_total"]), r["start_time"]))
    return rows


# ---------------------------------------------------------------------------------------
# Metric directions and the Pareto front

def metric_mode(metric: str, override: Optional[str] = None) -> tuple[str, bool]:
    """("min" | "max", known): the metric's better direction; unknown names are "min"."""
    if override:
        return override, True
    if metric in HIGHER_IS_BETTER or re.fullmatch(r"control/[^/]+/r", metric):
        return "max", True
    if metric in LOWER_IS_BETTER or re.fullmatch(r"control/[^/]+/mae", metric):
        return "min", True
    return "min", False


def _value(row: dict, key: str) -> Optional[float]:
    v = row.get(key)
    if v is None and isinstance(row.get("metrics"), dict):
        v = row["metrics"].get(key)
    v = _number(v)
    return None if v is None or math.isnan(v) else v


def pareto_front(rows: Iterable[dict], x_key: str, y_key: str, mode: str = "min") -> set:
    """Run ids of the rows no other row dominates: another row dominates one if its x (the
    privacy cost, lower is better) is <= and its y is better-or-equal (`mode`: "min" lower is
    better, "max" higher), one of the two strictly. Rows without x or y are left out. Ties
    (same x and y) are all on the front; inf x is allowed (inf <= inf), so a point at
    x = inf is on the front only if its y is strictly better than every finite-x point's."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
    sign = 1.0 if mode == "min" else -1.0
    pts = []
    for r in rows:
        x, y = _value(r, x_key), _value(r, y_key)
        if x is not None and y is not None:
            pts.append((r["run_id"], x, sign * y))
    front = set()
    for i, (rid, x, y) in enumerate(pts):
        dominated = any(j != i and xo <= x and yo <= y and (xo < x or yo < y)
                        for j, (_, xo, yo) in enumerate(pts))
        if not dominated:
            front.add(rid)
    return front


def front_by_family(rows: list[dict], metric: str, mode: str, one_front: bool = False) -> set:
    if one_front:
        return pareto_front(rows, "epsilon_total", metric, mode)
    front = set()
    for fam in dict.fromkeys(r["family"] for r in rows):
        front |= pareto_front([r for r in rows if r["family"] == fam], "epsilon_total", metric, mode)
    return front


def default_metric(rows: list[dict]) -> Optional[str]:
    for m in DEFAULT_METRICS:
        if any(_value(r, m) is not None for r in rows):
            return m
    return None


# ---------------------------------------------------------------------------------------
# Formatting

def fmt_num(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return format(x, f".{digits}g")


def fmt_epsilon(row: dict) -> str:
    if not row["dp"]:
        return "inf (non-DP)" if row["private_data"] else "0 (public)"
    if not row.get("dp_release", True):
        return f"{fmt_num(row['epsilon'])} ({NOT_A_RELEASE})"
    return fmt_num(row["epsilon"])


def short_metric(metric: str) -> str:
    return metric[len("fidelity/"):] if metric.startswith("fidelity/") else metric


def table_columns(rows: list[dict], metric: str) -> list[tuple]:
    """(header, align, row -> text) for the printed table."""
    cols = [("stage", "<", lambda r: r["stage"]), ("model", "<", lambda r: r["model"]),
            ("DP", "<", lambda r: "yes" if r["dp"] else "no"), ("sigma", ">", lambda r: fmt_num(r["sigma"])),
            ("batch", ">", lambda r: r["batch"] or "-"), ("latent", ">", lambda r: r["latent"] or "-"),
            ("epsilon", ">", fmt_epsilon)]
    if any(r.get(AUDIT_EPS) is not None for r in rows):   # audited trials: the measured lower bound beside it
        cols.append(("eps_audit", ">", lambda r: fmt_num(r.get(AUDIT_EPS))))
    cols += [("eps_total", ">", lambda r: fmt_num(r["epsilon_total"]))]
    if any(r.get("epsilon_patient") is not None for r in rows):   # per patient: declared subjects
        cols.append(("eps_patient", ">", lambda r: fmt_num(r.get("epsilon_patient")) if r["dp"] else
                     fmt_num(r["epsilon_total"])))
    cols += [
            (short_metric(metric)[:16], ">", lambda r: fmt_num(_value(r, metric)))]
    for key, head in ((R_MEAN, "r_mean"), (ED_ES, "ed_es_acc")):
        if key != metric and any(_value(r, key) is not None for r in rows):
            cols.append((head, ">", lambda r, k=key: fmt_num(_value(r, k))))
    cols += [("status", "<", lambda r: r["status"]), ("front", "<", lambda r: "*" if r.get("front") else "")]
    return cols


def format_table(rows: list[dict], metric: str, width: int = 100) -> list[str]:
    cols = table_columns(rows, metric)
    cells = [[str(fn(r)) for _, _, fn in cols] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _, _) in enumerate(cols)]
    over = sum(widths) + len(widths) - 1 - width
    if over > 0:  # long stage names give way first, down to 8 characters
        widths[0] = max(8, widths[0] - over)

    def line(texts):
        out = []
        for (h, align, _), w, t in zip(cols, widths, texts):
            t = t if len(t) <= w else t[:w - 1] + "~"
            out.append(f"{t:{align}{w}}")
        return " ".join(out).rstrip()

    return [line([h for h, _, _ in cols])] + [line(c) for c in cells]


# ---------------------------------------------------------------------------------------
# Writing: CSV and plot

def write_csv(rows: list[dict], metric: str, path: Path) -> None:
    fields = ["run_id", "run_name", "stage", "model", "family", "dp", "dp_release", "private_data", "sigma", "sample_rate",
              "batch", "latent", "epsilon", AUDIT_EPS, "epsilon_total", "epsilon_total_source", "unit",
              "epsilon_patient", metric]
    fields += [k for k in (R_MEAN, ED_ES) if k != metric and any(_value(r, k) is not None for r in rows)]
    fields += ["status", "front"]

    def cell(r, k):
        v = bool(r.get("front")) if k == "front" else r.get(k)
        if isinstance(v, bool):
            return str(v).lower()
        return "" if v is None else repr(v) if isinstance(v, float) else v

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in rows:
            w.writerow([cell(r, k) for k in fields])


MARKERS = {"beta_vae": "o", "vq_vae": "s", "ldm": "^"}


def _x_layout(values: list[float]) -> dict:
    """Positions on a log axis: finite epsilons where they are, public (0) at the left edge,
    non-DP (inf) at the right edge, each beyond a dashed separator."""
    finite = [v for v in values if 0 < v < math.inf]
    lo, hi = (math.log10(min(finite)), math.log10(max(finite))) if finite else (0.0, 1.0)
    w = max(hi - lo, 1.0)
    return {"lo": lo, "hi": hi, "w": w, "public": 10 ** (lo - 0.3 * w), "inf": 10 ** (hi + 0.3 * w),
            "sep_lo": 10 ** (lo - 0.15 * w), "sep_hi": 10 ** (hi + 0.15 * w),
            "xlim": (10 ** (lo - 0.4 * w), 10 ** (hi + 0.4 * w))}


def plot(rows: list[dict], metric: str, mode: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    pts = [r for r in rows if _value(r, metric) is not None and r["epsilon_total"] is not None
           and not math.isnan(r["epsilon_total"])]
    lay = _x_layout([r["epsilon_total"] for r in pts])

    def xpos(e):
        return lay["public"] if e <= 0 else lay["inf"] if e == math.inf else e

    stages = list(dict.fromkeys(r["stage"] for r in rows))
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(stages)}
    fig, ax = plt.subplots(figsize=(8.5, 5))
    ax.set_xscale("log")
    for r in pts:
        c, m = colors[r["stage"]], MARKERS.get(r["model"], "D")
        running = r["status"] == "RUNNING"
        ax.scatter([xpos(r["epsilon_total"])], [_value(r, metric)], marker=m, s=55, zorder=3,
                   facecolors="none" if running else [c], edgecolors=[c], linewidths=1.5)
        if r.get("front"):
            ax.scatter([xpos(r["epsilon_total"])], [_value(r, metric)], marker="o", s=170, zorder=2,
                       facecolors="none", edgecolors="black", linewidths=0.8)
    for fam in dict.fromkeys(r["family"] for r in pts):
        fr = sorted((xpos(r["epsilon_total"]), _value(r, metric)) for r in pts if r["family"] == fam and r.get("front"))
        if fr:
            fr.sort(key=lambda p: (p[0], p[1] if mode == "min" else -p[1]))
            ax.step([p[0] for p in fr], [p[1] for p in fr], where="post", color="black", lw=1, alpha=0.6, zorder=1)

    has_pub = any(r["epsilon_total"] <= 0 for r in pts)
    has_inf = any(r["epsilon_total"] == math.inf for r in pts)
    ticks, labels = [], []
    if has_pub:
        ticks.append(lay["public"]), labels.append("public")
        ax.axvline(lay["sep_lo"], color="grey", ls=":", lw=0.8)
    finite = [r["epsilon_total"] for r in pts if 0 < r["epsilon_total"] < math.inf]
    if finite:
        ks = range(math.floor(lay["lo"] - 0.15 * lay["w"]), math.ceil(lay["hi"] + 0.15 * lay["w"]) + 1)
        inside = [10.0 ** k for k in ks if lay["sep_lo"] < 10.0 ** k < lay["sep_hi"]]
        if len(inside) < 2:  # a narrow range: 1-2-5 ticks
            inside = [m * 10.0 ** k for k in ks for m in (1, 2, 5) if lay["sep_lo"] < m * 10.0 ** k < lay["sep_hi"]]
        for v in inside:
            ticks.append(v), labels.append(format(v, ".3g"))
    if has_inf:
        ticks.append(lay["inf"]), labels.append("non-DP")
        ax.axvline(lay["sep_hi"], color="grey", ls=":", lw=0.8)
    ax.set_xlim(*lay["xlim"])
    ax.set_xticks(ticks, labels)
    ax.xaxis.set_minor_locator(NullLocator())
    if not pts:
        ax.text(0.5, 0.5, f"no trial has {metric} yet", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel("epsilon_total (whole lineage on the private data)")
    ax.set_ylabel(f"{metric} ({'lower' if mode == 'min' else 'higher'} is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    shown = pts or rows  # the legend names what is plotted
    handles = [Line2D([], [], ls="", marker="o", color=colors[s], label=f"stage {s}")
               for s in dict.fromkeys(r["stage"] for r in shown)]
    handles += [Line2D([], [], ls="", marker=MARKERS.get(m, "D"), color="grey", label=m)
                for m in dict.fromkeys(r["model"] for r in shown)]
    handles.append(Line2D([], [], color="black", alpha=0.6, label="Pareto front"))
    if any(r["status"] == "RUNNING" for r in pts):
        handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", color="grey", label="running"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_name(metric: str) -> str:
    return "epsilon_vs_" + re.sub(r"[^A-Za-z0-9_.-]", "_", metric.replace("/", "_")) + ".png"


def write_report(rows: list[dict], out_dir, *, metric: str, mode: str, experiment_name: str = "",
                 client=None, parent_run_id: Optional[str] = None) -> dict:
    """Write `trials.csv` and the plot `epsilon_vs_<metric>.png` for `rows` (from
    `collect_trials`, with `front` set) into `out_dir`; with `client` and `parent_run_id`,
    also log both to the parent run under `report/`. Returns {"csv": Path, "png": Path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "trials.csv", "png": out / plot_name(metric)}
    write_csv(rows, metric, paths["csv"])
    title = f"{experiment_name}: {metric} vs epsilon_total" if experiment_name else f"{metric} vs epsilon_total"
    plot(rows, metric, mode, paths["png"], title)
    paths.update(write_seed_aggregates(rows, out, metric=metric, mode=mode, experiment_name=experiment_name))
    if client is not None and parent_run_id:
        for p in paths.values():
            client.log_artifact(parent_run_id, str(p), artifact_path="report")
    return paths


UTILITY = "utility/r_mean"


def aggregated_metrics(rows: list[dict], metric: str) -> list[str]:
    """The metrics averaged over seeds: the report's metric, control and utility scores."""
    extra = [R_MEAN, ED_ES, UTILITY, "utility/ed_es_accuracy", "utility_real/r_mean"]
    return [m for m in dict.fromkeys([metric] + extra) if any(_value(r, m) is not None for r in rows)]


def print_configurations(rows: list[dict], metric: str) -> None:
    """Each configuration over its seeds, when some configuration ran with several seeds."""
    from orchestrator import seeds

    note = seeds.sample_count_note(rows, metric)
    if note:
        print(note, file=sys.stderr)
    groups = seeds.aggregate(rows, aggregated_metrics(rows, metric))
    if not any(g["n"] > 1 for g in groups):
        return
    print(f"\nover seeds: mean [95% interval: t over seeds; a single seed's own bootstrap interval]; "
          f"scores compared at equal sample counts only (eval/n_samples)")
    cells = lambda g, m: (f"{fmt_num(g[m])} [{fmt_num(g[m + '_low'])}, {fmt_num(g[m + '_high'])}]"  # noqa: E731
                          if g.get(m) is not None else "-")
    ms = aggregated_metrics(rows, metric)
    head = ["stage", "model", "eps_total", "seeds", "n"] + [short_metric(m) for m in ms]
    body = [[g["stage"], g["model"], fmt_num(g["epsilon_total"]), str(g["n"]),
             fmt_num(g["n_samples"])] + [cells(g, m) for m in ms] for g in groups]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    for r in [head] + body:
        print(" ".join(f"{c:<{w}}" for c, w in zip(r, widths)).rstrip())


def write_seed_aggregates(rows: list[dict], out: Path, *, metric: str, mode: str, experiment_name: str = "") -> dict:
    """`configurations.csv` (each configuration's mean and 95% interval over its seeds) and the
    plots with error bars: `<metric>` and, where trials logged it, utility against epsilon."""
    from orchestrator import seeds

    metrics = aggregated_metrics(rows, metric)
    groups = seeds.aggregate(rows, metrics)
    if not groups or not metrics:
        return {}
    paths = {"configurations": out / "configurations.csv"}
    seeds.write_configurations_csv(groups, metrics, paths["configurations"])
    name = experiment_name + ": " if experiment_name else ""
    for key, m, mo in (("png_configurations", metric, mode), ("png_utility", UTILITY, "max")):
        target = out / plot_name(m).replace(".png", "_by_configuration.png")
        if m in metrics and seeds.plot_configurations(groups, m, mo, target, f"{name}{m} vs epsilon_total"):
            paths[key] = target
    return paths


# ---------------------------------------------------------------------------------------
# Resolving the input

def check_uri(uri: str) -> None:
    """Fail fast, and without side effects, on a tracking URI that cannot work: a SQLite
    file or local store that does not exist (MLflow would create an empty one), or a server
    nothing answers at (MLflow would retry for minutes)."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "sqlite":
        db = uri.split("://", 1)[1].split("?", 1)[0]
        db = db[1:] if db.startswith("/") else db  # sqlite:///rel or sqlite:////abs
        if db and db != ":memory:" and not Path(db).is_file():
            raise UserError(f"tracking store {db} does not exist (tracking URI {uri})")
    elif scheme in ("http", "https"):
        host = parsed.hostname
        if not host:
            raise UserError(f"tracking URI {uri} names no host")
        try:
            port = parsed.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise UserError(f"tracking URI {uri} has an invalid port")
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as exc:
            raise UserError(f"cannot reach the tracking server {uri}: {exc.strerror or exc}")
    elif scheme == "file" or len(scheme) < 2:  # a local path (len 1: a Windows drive)
        local = parsed.path if scheme == "file" else uri
        if not Path(local).exists():
            raise UserError(f"tracking store {local} does not exist")


def _client(uri: str):
    check_uri(uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _mlflow_errors():
    from mlflow.exceptions import MlflowException

    return (MlflowException, OSError, ConnectionError)


def resolve(target: str, tracking_uri: Optional[str], parent: Optional[str]) -> dict:
    """{client, uri, experiment_id, experiment_name, parent_run_id, parent_status, out_default}."""
    path = Path(target)
    if path.is_file() and path.name == STATE_FILE:
        path = path.parent
    if path.is_dir():
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise UserError(f"{path}: no {STATE_FILE}; expected the output folder of a launch "
                            "(or give an experiment name with --tracking-uri)")
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{state_file}: not readable JSON ({exc})")
        if not isinstance(state, dict):
            raise UserError(f"{state_file}: expected a JSON object")
        uri = tracking_uri or state.get("tracking_uri")
        parent = parent or state.get("parent_run_id")
        if not uri or not parent:
            raise UserError(f"{state_file}: needs 'tracking_uri' and 'parent_run_id'")
        client = _client(uri)
        try:
            run = client.get_run(parent)
        except _mlflow_errors():
            raise UserError(f"parent run {parent} (from {state_file}) not found in {uri}")
        exp = client.get_experiment(run.info.experiment_id)
        return {"client": client, "uri": uri, "experiment_id": exp.experiment_id, "experiment_name": exp.name,
                "parent_run_id": parent, "parent_status": run.info.status, "out_default": path / "report"}
    if path.exists():
        raise UserError(f"{target}: expected a launch's output folder or an MLflow experiment name")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UserError(f"no folder {target!r}; for an experiment name give --tracking-uri or set MLFLOW_TRACKING_URI")
    client = _client(uri)
    exp = client.get_experiment_by_name(target)
    if exp is None:
        raise UserError(f"no folder and no MLflow experiment named {target!r} in {uri}")
    if parent:
        try:
            run = client.get_run(parent)
        except _mlflow_errors():
            raise UserError(f"--parent: no run {parent} in {uri}")
        if run.info.experiment_id != exp.experiment_id:
            raise UserError(f"--parent: run {parent} is not in experiment {target!r}")
    else:
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE}` = 'sweep'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if not found:
            raise UserError(f"experiment {target!r} has no sweep run (tag {ROLE}=sweep) in {uri}")
        run = found[0]
    return {"client": client, "uri": uri, "experiment_id": exp.experiment_id, "experiment_name": exp.name,
            "parent_run_id": run.info.run_id, "parent_status": run.info.status, "out_default": Path("report")}


# ---------------------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.report",
                                description="Epsilon vs fidelity for the trials of one launch, from MLflow.")
    p.add_argument("target", metavar="OUTPUT_DIR_OR_EXPERIMENT",
                   help="a launch's output folder (holding launch.json), or an MLflow experiment name")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: launch.json's, else $MLFLOW_TRACKING_URI)")
    p.add_argument("--parent", help="parent run id (default: launch.json's, else the experiment's latest sweep run)")
    p.add_argument("--metric", help="fidelity metric (default: fidelity/fd if any trial has it, else "
                                    "fidelity/mse, else val/loss)")
    p.add_argument("--mode", choices=("min", "max"), help="the metric's better direction (default: known for "
                                                          "the contract's metrics, else min)")
    p.add_argument("--one-front", action="store_true",
                   help="one Pareto front across model families (default: generators and compression models apart)")
    p.add_argument("--out", help="folder for the plot and trials.csv (default: OUTPUT_DIR/report or ./report)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        src = resolve(args.target, args.tracking_uri, args.parent)
        client = src["client"]
        try:
            rows = collect_trials(client, src["experiment_id"], src["parent_run_id"])
        except _mlflow_errors() as exc:
            raise UserError(f"reading runs from {src['uri']} failed: {exc}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code

    metric = args.metric or default_metric(rows) or "val/loss"
    mode, known = metric_mode(metric, args.mode)
    front = front_by_family(rows, metric, mode, args.one_front)
    for r in rows:
        r["front"] = r["run_id"] in front

    running = sum(r["status"] == "RUNNING" for r in rows)
    print(f"experiment '{src['experiment_name']}', parent run {src['parent_run_id']} ({src['parent_status']}): "
          f"{len(rows)} trials" + (f", {running} running" if running else ""))
    direction = "lower" if mode == "min" else "higher"
    note = "" if known else f"; direction unknown, assumed (--mode {'max' if mode == 'min' else 'min'} to flip)"
    scope = "one front over all trials" if args.one_front else "front per family (generator | compression)"
    print(f"metric {metric} ({direction} is better{note}); {scope}; x = eps_total")
    if not rows:
        print("no trials yet")
    else:
        print()
        print("\n".join(format_table(rows, metric)))
        print()
    with_metric = [r for r in rows if _value(r, metric) is not None]
    if rows and not with_metric:
        present = sorted({k for r in rows for k in r if "/" in k and _value(r, k) is not None})
        print(f"note: no trial has {metric} (yet); metrics present: {', '.join(present) or 'none'}", file=sys.stderr)
    if rows:
        print(f"front (*): {len(front)} of {len(with_metric)} trials with {metric}; "
              f"{len(rows) - len(with_metric)} without it are listed, not plotted")
        print_configurations(rows, metric)

    out = Path(args.out) if args.out else src["out_default"]
    try:
        paths = write_report(rows, out, metric=metric, mode=mode, experiment_name=src["experiment_name"])
    except OSError as exc:
        print(f"error: cannot write the report to {out}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {paths['png']} and {paths['csv']} (with run ids)"
          + "".join(f", {p}" for k, p in paths.items() if k not in ("png", "csv")))
    if not args.no_log:
        try:
            for p in paths.values():
                client.log_artifact(src["parent_run_id"], str(p), artifact_path="report")
        except Exception as exc:  # noqa: BLE001 - the report is on disk; say why logging failed, in one line
            msg = " ".join(str(exc).split())[:300]
            print(f"error: could not log the report to parent run {src['parent_run_id']}: {msg} "
                  "(the files are written; --no-log skips logging)", file=sys.stderr)
            return 1
        print(f"logged to parent run {src['parent_run_id']} under report/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
