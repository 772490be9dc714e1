"""The end-of-trial bootstrap: one call per resample against one call for all of them.

    python -m benchmarks.eval_intervals [--quick] [--sizes N ...] [--json FILE]

A generator's evaluation (trainers/trial_eval.py) puts 95% bootstrap intervals on its
control and utility scores (Pearson r, MAE, ED/ES accuracy per label; BCa, 500 resamples,
plus BCa's n jackknife samples) and on its Frechet distances. For `n` test volumes with the
privacy_cost study's 5 measurable labels, this times, alternated in one process:

* control-score intervals scored one resample per call (what trainers/uncertainty.py did
  before, `vectorized=False`) and all resamples in one call (`control_scores` on index arrays
  of shape (B, n), `vectorized=True`): the same intervals (checked here to 1e-9);
* one FD resample (120 features) through the SVD of the n x n cross product of the centred
  rows and through the F x F product of their Cholesky factors (trainers/uncertainty.py's
  `frechet_from_rows` once volumes outnumber features): the same distance (checked to 1e-9).

Each side's time is its fastest of `repeats`; ratios are speed-ups.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from scipy import stats

from benchmarks import write_json
from trainers.evaluation import control_scores
from trainers.uncertainty import LEVEL, frechet_from_rows, scores_intervals

LABELS = ("LVEDV", "LVESV", "MYOEDTHICK", "MYOESTHICK", "ESED")
FEATURES = 120


def _scores_fixture(n: int, rng):
    phase = rng.integers(0, 2, n).astype(float)
    req = {k: rng.normal(100, 20, n) for k in LABELS[:-1]} | {"ESED": phase}
    meas = {k: v + rng.normal(0, 15, n) for k, v in req.items() if k != "ESED"}
    meas["ESED"] = np.clip(phase + rng.normal(0, 0.4, n), 0, 1)
    req["LVEDV"][phase == 1] = np.nan   # measured at one phase only, as on phantoms
    meas["LVESV"][phase == 0] = np.nan
    return lambda i: control_scores({k: v[i] for k, v in req.items()}, {k: v[i] for k, v in meas.items()})


def _one_call_per_resample(score, n: int, names, n_resamples: int) -> dict:
    """The intervals as computed before: scipy calls `score` once per resample."""
    stat = lambda i: np.array([score(np.asarray(i, dtype=np.int64)).get(k, np.nan) for k in names])  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap((np.arange(n),), stat, vectorized=False, n_resamples=n_resamples,
                              confidence_level=LEVEL, method="BCa", rng=np.random.default_rng(0))
    return {f"{k}_ci_low": float(lo) for k, lo in zip(names, res.confidence_interval.low)} | \
           {f"{k}_ci_high": float(hi) for k, hi in zip(names, res.confidence_interval.high)}


def _svd_fd(a, b) -> float:
    ca, cb = (a - a.mean(0)) / np.sqrt(len(a) - 1), (b - b.mean(0)) / np.sqrt(len(b) - 1)
    diff = a.mean(0) - b.mean(0)
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    return max(float(diff @ diff + (ca * ca).sum() + (cb * cb).sum() - 2 * cross), 0.0)


def _fastest(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def measure(n: int, repeats: int, n_resamples: int) -> dict:
    rng = np.random.default_rng(n)
    score = _scores_fixture(n, rng)
    names = [k for k in score(np.arange(n)) if k.endswith(("/r", "_accuracy", "r_mean"))]
    per, per_ci, batch, batch_ci = float("inf"), None, float("inf"), None
    for _ in range(repeats):   # alternated: load from elsewhere hits both alike
        t, per_ci = _fastest(lambda: _one_call_per_resample(score, n, names, n_resamples), 1)
        per = min(per, t)
        t, batch_ci = _fastest(lambda: scores_intervals(score, n, names, n_resamples=n_resamples), 1)
        batch = min(batch, t)
    worst = max(abs(per_ci[k] - batch_ci[k]) for k in per_ci if np.isfinite(per_ci[k]))
    if worst > 1e-9:
        raise AssertionError(f"intervals differ by {worst}")
    a, b = rng.normal(size=(n, FEATURES)), rng.normal(0.2, 1.3, size=(n, FEATURES))
    svd_s, svd_fd = _fastest(lambda: [_svd_fd(a, b) for _ in range(20)][0], repeats)
    fast_s, fast_fd = _fastest(lambda: [frechet_from_rows(a, b) for _ in range(20)][0], repeats)
    if abs(svd_fd - fast_fd) > 1e-9 * max(1.0, abs(svd_fd)):
        raise AssertionError(f"FD {svd_fd} vs {fast_fd}")
    return {"n": n, "n_resamples": n_resamples, "labels": len(LABELS),
            "control_per_resample_s": per, "control_batched_s": batch, "control_speedup": per / batch,
            "fd_svd_ms": svd_s / 20 * 1e3, "fd_fast_ms": fast_s / 20 * 1e3, "fd_speedup": svd_s / fast_s}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 repeat, 100 resamples")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 300], help="test volumes per evaluation")
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args(argv)
    repeats, n_resamples = (1, 100) if args.quick else (3, 500)
    rows = [measure(n, repeats, n_resamples) for n in args.sizes]
    print(f"| volumes | control intervals, one call per resample | one call for all | speed-up "
          f"| FD resample, n x n SVD | F x F (Cholesky) | speed-up |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['control_per_resample_s']:.2f} s | {r['control_batched_s']:.3f} s "
              f"| {r['control_speedup']:.0f}x | {r['fd_svd_ms']:.2f} ms | {r['fd_fast_ms']:.2f} ms "
              f"| {r['fd_speedup']:.2f}x |")
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
