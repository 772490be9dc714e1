"""The privacy ledger of a sweep and the privacy cost of tuning, as pure functions.

A DP-SGD trial is a `Mechanism`: the Poisson-subsampled Gaussian mechanism (noise multiplier
sigma, sample rate q) applied `steps` times to one private dataset (`data`, a resolved root
path). Everything here is a function of lists of mechanisms; nothing touches data.

* `compose_epsilon`: epsilon of a composition with the sweep's accountant (Opacus's
  "prv" | "rdp" | "gdp"). Stages that trained on public data, or took no step, add nothing.
* `ledger_for`: per private dataset, the composition of every mechanism that touched it
  (different datasets are different people: they are accounted separately), and the
  largest of those epsilons as `epsilon_total`.
* Tuning. Releasing the best of K trials by a metric computed on private data is a release
  of its own (Papernot & Steinke, "Hyperparameter tuning with Renyi differential privacy",
  ICLR 2022, arXiv:2110.03620).
  - `naive_tuning_epsilon`: every trial composed (always valid, whatever the search did).
  - `repeat_and_select_epsilon`: the theorem's bound, valid only when the number of trials
    K is random (Poisson or truncated negative binomial, drawn with `draw_num_samples`)
    and each trial's hyperparameters are drawn i.i.d. independently of the data. It is
    dp-accounting's RDP `RepeatAndSelectDpEvent` transform applied to the pointwise
    maximum of the candidate configurations' RDP curves.
  - `tuning_dp_event_note`: the warning to print when a search falls outside the theorem.

Conventions
-----------
* A mechanism with `steps == 0`, `sample_rate == 0` or `sigma == inf` releases nothing and
  adds nothing. A mechanism with `sigma == 0` (non-DP training on private data) makes the
  epsilon of its dataset infinite (`math.inf`, written to JSON as `Infinity`).
* A mechanism whose `data` is "" (unknown) is charged to every named dataset of the same
  ledger, since it could have touched any of them; with no named dataset it is reported
  under the key "".
"""
from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

ACCOUNTANTS = ("prv", "rdp", "gdp")
UNITS = ("record", "subject")

# dp-accounting's default RDP orders: used for every RDP curve in this module (the tuning
# bound), so that identical candidates reproduce RdpAccountant's RepeatAndSelect exactly.

RDP_ORDERS: tuple = tuple(float(a) for a in DEFAULT_RDP_ORDERS)

# PRV (Gopi et al. 2021) discretises the privacy loss on a grid whose size grows with
# sqrt(steps) * (epsilon bound) / eps_error. Above this many points (about 4M: ~10 s and a
# few hundred MB on one core) the absolute error eps_error is raised until the grid fits.
PRV_MAX_POINTS = 1 << 22
PRV_EPS_ERROR = 0.01          # Opacus's default, what trainers/privacy.py gets
PRV_MAX_EPS_ERROR = 1.0       # beyond this the RDP bound is as good; use it instead


# --------------------------------------------------------------------------------------
# Mechanisms
# --------------------------------------------------------------------------------------
@dataclass
class Mechanism:
    """`steps` Poisson-subsampled Gaussian steps (noise multiplier sigma, sample rate q) on
    the private dataset `data` (a resolved root path), by `trial` of `stage`."""

    sigma: float
    sample_rate: float
    steps: int
    stage: str = ""
    trial: str = ""
    data: str = ""
    unit: str = "record"     # what q is over: records (volumes) or subjects
    group_size: int = 0      # record unit: the most records one subject has in `data` (0: unknown)

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        self.group_size = int(self.group_size or 0)
        self.sigma, self.sample_rate = float(self.sigma), float(self.sample_rate)
        if self.steps != int(self.steps):
            raise ValueError(f"steps must be an integer, got {self.steps}")
        self.steps = int(self.steps)
        self.stage, self.trial, self.data = str(self.stage), str(self.trial), str(self.data)
        if math.isnan(self.sigma) or self.sigma < 0:
            raise ValueError(f"sigma must be >= 0 (0: no noise), got {self.sigma}")
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")

    @property
    def releases_nothing(self) -> bool:
        return self.steps == 0 or self.sample_rate == 0.0 or math.isinf(self.sigma)

    @property
    def non_private(self) -> bool:
        return not self.releases_nothing and self.sigma == 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Mechanism":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown Mechanism fields: {sorted(unknown)}")
        return cls(**d)


def _active(mechanisms: Iterable[Mechanism]) -> list[Mechanism]:
    return [m for m in mechanisms if not m.releases_nothing]


def _history(mechanisms: Iterable[Mechanism]) -> list[tuple[float, float, int]]:
    """Opacus history [(sigma, q, steps)], identical (sigma, q) merged (composition is
    commutative, and fewer entries make PRV faster)."""
    from trainers.privacy import merge_history

    return merge_history((m.sigma, m.sample_rate, m.steps) for m in _active(mechanisms))


# --------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------
def _rdp_opacus(history, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the smallest alpha"
        return float(acc.get_epsilon(delta=delta))


def _gdp(history, delta: float) -> float:
    """GDP composed by mu over the whole history (trainers/privacy.py: Opacus's
    GaussianAccountant reads only its last entry)."""
    from trainers.privacy import gdp_epsilon

    return gdp_epsilon(history, delta)


def _prv_grid_points(history, eps_error: float, delta_error: float) -> float:
    """Grid size Opacus's PRVAccountant would allocate (its _get_domain, without building it)."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    prvs = [PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history]
    counts = [n for _, _, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        L = compute_safe_domain_size(prvs=prvs, max_self_compositions=counts,
                                     eps_error=eps_error, delta_error=delta_error)
    mesh = eps_error / math.sqrt(sum(counts) * math.log(12 / delta_error) / 2)
    return 2 * L / mesh


def _prv(history, delta: float) -> tuple[float, Optional[str]]:
    return _prv_cached(tuple(history), float(delta), PRV_MAX_POINTS, PRV_MAX_EPS_ERROR)


@functools.lru_cache(maxsize=256)
def _prv_cached(history: tuple, delta: float, max_points: int, max_eps_error: float) -> tuple[float, Optional[str]]:
    """Opacus PRVAccountant.get_epsilon (the upper bound estimate + eps_error, as the
    trainer reports it), with its numerical limits handled:

    * eps_error 0.01 (Opacus's default) unless the discretisation grid would exceed
      PRV_MAX_POINTS (many steps and/or a large epsilon); then eps_error is raised until it
      fits (the result stays an upper bound, only less tight);
    * if that needs eps_error > PRV_MAX_EPS_ERROR, or PRV fails numerically ("Discrete mean
      differs", "Cannot compute epsilon", delta too small for the grid), the RDP bound is
      reported instead;
    * the result is min(PRV, RDP): both are upper bounds, so the smaller one holds.
    """
    from opacus.accountants import PRVAccountant

    rdp = _rdp_opacus(history, delta)
    delta_error = delta / 1000  # Opacus's default
    eps_error = PRV_EPS_ERROR
    for _ in range(4):
        points = _prv_grid_points(history, eps_error, delta_error)
        if points <= max_points:
            break
        eps_error *= 1.05 * points / max_points
    else:
        points = _prv_grid_points(history, eps_error, delta_error)
    if points > max_points or eps_error > max_eps_error:
        return rdp, (f"PRV would need eps_error {eps_error:.3g} to fit {max_points} grid points; "
                     "reported the RDP bound")
    acc = PRVAccountant()
    acc.history = list(history)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", UserWarning)  # overflow far in the tails: checked below
            warnings.simplefilter("ignore", RuntimeWarning)
            eps = float(acc.get_epsilon(delta=delta, eps_error=eps_error, delta_error=delta_error))
    except (RuntimeError, ValueError, MemoryError, FloatingPointError) as e:
        return rdp, f"PRV failed ({type(e).__name__}: {e}); reported the RDP bound"
    if not math.isfinite(eps) or eps > rdp:
        return rdp, ("the RDP bound was below PRV's upper bound; reported it" if math.isfinite(eps)
                     else "PRV returned a non-finite epsilon; reported the RDP bound")
    return eps, (None if eps_error == PRV_EPS_ERROR else f"PRV eps_error raised to {eps_error:.3g} for grid size")


def compose_epsilon_details(mechanisms: Sequence[Mechanism], delta: float,
                            accountant: str) -> tuple[float, Optional[str]]:
    """(epsilon, note): as `compose_epsilon`, with a note when the accountant needed a
    numerical fallback (None otherwise)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    active = _active(mechanisms)
    if not active:
        return 0.0, None
    if any(m.non_private for m in active):
        return math.inf, "a stage trained on this private data without noise (sigma 0)"
    history = _history(active)
    if accountant == "rdp":
        return _rdp_opacus(history, delta), None
    if accountant == "gdp":
        return _gdp(history, delta), "GDP (central limit theorem) is an approximation and can underestimate epsilon"
    return _prv(history, delta)


def compose_epsilon(mechanisms: Sequence[Mechanism], delta: float, accountant: str) -> float:
    """Epsilon at `delta` of all `mechanisms` composed, with Opacus's accountant
    `accountant` ("prv" | "rdp" | "gdp") holding them all in its history. 0.0 if none
    releases anything."""
    return compose_epsilon_details(mechanisms, delta, accountant)[0]


# --------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------
def _group_by_data(mechanisms: Sequence[Mechanism]) -> dict[str, list[Mechanism]]:
    named: dict[str, list[Mechanism]] = {}
    unknown = [m for m in mechanisms if not m.data]
    for m in mechanisms:
        if m.data:
            named.setdefault(m.data, []).append(m)
    if not named:
        return {"": unknown} if unknown else {}
    return {d: ms + unknown for d, ms in named.items()}


def group_compose_epsilon(mechanisms: Sequence[Mechanism], delta: float, accountant: str, group_size: int) -> float:
    """Record-level mechanisms composed, then group privacy for `group_size` records (one
    subject's volumes): trainers.privacy.group_epsilon says how."""
    from trainers.privacy import group_epsilon

    active = _active(mechanisms)
    if any(m.non_private for m in active):
        return math.inf
    return group_epsilon(_history(active), delta, group_size, accountant) if active else 0.0


def _dataset_entry(ms: list[Mechanism], delta: float, accountant: str) -> dict:
    """One dataset's epsilons: in the unit of its mechanisms (`epsilon`), and per subject
    (`epsilon_subject`, None when the data declares no subjects).

    All record-level: epsilon composes them; the subject's is that composition under group
    privacy for the most volumes one subject has. All subject-level: both are the
    composition. Mixed units compose at the subject level: the subject-level part at
    delta/2 plus the record-level part under group privacy at delta/2 (basic composition)."""
    active = _active(ms)
    records = [m for m in active if m.unit == "record"]
    subjects = [m for m in active if m.unit == "subject"]
    k = max((m.group_size for m in records), default=1)
    known = all(m.group_size >= 1 for m in records)
    if records and subjects:
        unit = "mixed"
        # a record-level part whose group size is unknown has no patient bound: never under-report
        part = group_compose_epsilon(records, delta / 2, accountant, k) if known else math.inf
        eps = subject = compose_epsilon(subjects, delta / 2, accountant) + part
        note = ("record- and subject-level training on one dataset: composed at the subject level (group privacy "
                "for the record-level part, basic composition at delta/2 each)")
    else:
        unit = "subject" if subjects else "record"
        eps, note = compose_epsilon_details(records or subjects, delta, accountant)
        if subjects:
            subject = eps
        elif known:
            subject = eps if k <= 1 else group_compose_epsilon(records, delta, accountant, k)
        else:
            subject = None
    entry = {"epsilon": float(eps), "epsilon_subject": None if subject is None else float(subject), "unit": unit,
             "mechanisms": [m.to_dict() for m in ms]}
    if records and known:
        entry["group_size"] = k
        entry["group_privacy"] = ("GDP: k mu" if accountant == "gdp" else
                                  "(k eps, k e^((k-1) eps) delta') on the RDP curve, delta' chosen so that it is <= delta")
    if note:
        entry["note"] = note
    return entry


def ledger_for(lineage: Sequence[Mechanism], delta: float, accountant: str) -> dict:
    """{"accountant", "delta", "datasets": {data: {"epsilon", "epsilon_subject", "unit",
    "mechanisms": [dicts] (, "note")}}, "epsilon_total": max over datasets (0.0 if none),
    "epsilon_total_subject": the same per subject (None when a dataset declares no
    subjects)}. JSON-serialisable (an infinite epsilon is float('inf'), `Infinity` in JSON)."""
    datasets = {data: _dataset_entry(ms, delta, accountant) for data, ms in _group_by_data(list(lineage)).items()}
    subject = [d["epsilon_subject"] for d in datasets.values()]
    return {"accountant": accountant, "delta": float(delta), "datasets": datasets,
            "epsilon_total": max((d["epsilon"] for d in datasets.values()), default=0.0),
            "epsilon_total_subject": None if None in subject else max(subject, default=0.0)}


def write_ledger_json(path, payload: dict) -> Path:
    """Write `payload` as JSON to `path` atomically: a temporary file in the same folder,
    flushed and fsynced, then os.replace (readers see the old file or the new, never half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


# --------------------------------------------------------------------------------------
# The cost of tuning
# --------------------------------------------------------------------------------------
def naive_tuning_epsilon(trials: Sequence[Sequence[Mechanism]], delta: float, accountant: str) -> float:
    """The naive bound for releasing the best of K trials: every trial's mechanisms
    composed (per private dataset; the largest). Valid for any search, adaptive included."""
    return ledger_for([m for t in trials for m in t], delta, accountant)["epsilon_total"]


def _dp_event(mechanisms: Sequence[Mechanism]):
    from dp_accounting import dp_event

    return dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(m.sample_rate, dp_event.GaussianDpEvent(m.sigma)), m.steps)
        for m in _active(mechanisms)])


def rdp_curve(mechanisms: Sequence[Mechanism], orders: Sequence[float] = RDP_ORDERS) -> np.ndarray:
    """RDP at `orders` of the composition of `mechanisms` (dp-accounting's RdpAccountant)."""
    active = _active(mechanisms)
    if any(m.non_private for m in active):
        return np.full(len(orders), np.inf)
    return _rdp_curve_cached(tuple((m.sigma, m.sample_rate, m.steps) for m in active),
                             tuple(float(a) for a in orders)).copy()


@functools.lru_cache(maxsize=1024)
def _rdp_curve_cached(entries: tuple, orders: tuple) -> np.ndarray:
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    acc = RdpAccountant(orders=list(orders))
    if entries:
        acc.compose(_dp_event([Mechanism(s, q, n) for s, q, n in entries]))
    return acc.rdp


def _shape(shape: Optional[float]) -> float:
    return math.inf if shape is None else float(shape)


def _tnb_mean(gamma: float, eta: float) -> float:
    """E[K] of the truncated negative binomial D_{eta,gamma} (Papernot & Steinke, Def. 1),
    any eta > -1 (dp-accounting's function, which is the same expression, accepts eta >= 0)."""
    if eta == 0:
        return (1 / gamma - 1) / math.log(1 / gamma)
    # eta * (1 - gamma) / (gamma * (1 - gamma**eta)), written with expm1 for accuracy
    return eta * (1 - gamma) / (gamma * -math.expm1(eta * math.log(gamma)))


def tnb_gamma(mean: float, shape: float, tolerance: float = 1e-9) -> float:
    """gamma of the truncated negative binomial with this mean and shape eta > -1, solved
    as dp-accounting does (bisection to relative `tolerance`, returning the lower end: the
    conservative side, a mean at least `mean`). For eta >= 0 it is dp-accounting's own
    `_gamma_truncated_negative_binomial`."""
    if not shape > -1 or math.isinf(shape):
        raise ValueError(f"shape must be in (-1, inf), got {shape}")
    if mean < 1:
        raise ValueError(f"mean must be at least 1, got {mean}")
    if shape >= 0:
        from dp_accounting.rdp.rdp_privacy_accountant import _gamma_truncated_negative_binomial

        return float(_gamma_truncated_negative_binomial(shape, mean, tolerance))
    if mean == 1:
        return 1.0
    lo, hi = 0.0, 1.0  # E[K] decreases from inf (gamma -> 0) to 1 (gamma -> 1)
    while hi > lo * (1 + tolerance):
        mid = (lo + hi) / 2
        if _tnb_mean(mid, shape) < mean:
            hi = mid
        else:
            lo = mid
    return lo


def _repeat_and_select_transform(rdp: np.ndarray, orders: np.ndarray, mean: float, shape: float) -> np.ndarray:
    from dp_accounting.rdp.rdp_privacy_accountant import _compute_rdp_repeat_and_select

    if shape >= 0:
        return np.asarray(_compute_rdp_repeat_and_select(orders, rdp, mean, shape), dtype=np.float64)
    # -1 < eta < 0: Theorem 2 of Papernot & Steinke holds for eta in (-1, inf); dp-accounting
    # only accepts eta >= 0. The same computation as its TNB branch, with our gamma.
    if not shape > -1:
        raise ValueError(f"shape must be > -1, got {shape}")
    if math.isnan(mean) or mean < 1:
        raise ValueError(f"Mean of number of repetitions must be >=1. Got {mean}.")
    gamma = tnb_gamma(mean, shape)
    out = np.full(len(orders), np.inf)
    c = (1 + shape) * np.min((1 - 1 / orders) * rdp - math.log(gamma) / orders)
    for i in range(len(orders)):
        if orders[i] > 1:
            out[i] = rdp[i] + math.log(mean) / (orders[i] - 1) + c
    return np.array([min(out[j] for j in range(len(orders)) if orders[i] <= orders[j])
                     for i in range(len(orders))])


def repeat_and_select_rdp(candidates: Sequence[Sequence[Mechanism]], mean: float, shape: Optional[float],
                          orders: Sequence[float] = RDP_ORDERS) -> np.ndarray:
    """RDP curve of "run K trials, release the best one" with K ~ Poisson(mean) (shape
    None or inf) or truncated negative binomial (mean, shape), each trial drawing one of
    the candidate configurations at random independently of the data. The inner curve is
    the pointwise maximum of the candidates' curves (a data-independent mixture of
    mechanisms has Renyi divergence at most the largest: quasi-convexity). Curves of
    several tuned stages add up (RDP composition); convert with `rdp_epsilon`."""
    if not candidates:
        raise ValueError("repeat_and_select needs at least one candidate configuration")
    orders = np.asarray(orders, dtype=np.float64)
    inner = np.max(np.stack([rdp_curve(c, orders) for c in candidates]), axis=0)
    return _repeat_and_select_transform(inner, orders, float(mean), _shape(shape))


def rdp_epsilon(rdp: Sequence[float], delta: float, orders: Sequence[float] = RDP_ORDERS) -> float:
    """Epsilon at `delta` from an RDP curve, with dp-accounting's RdpAccountant conversion."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    return float(compute_epsilon(list(orders), list(rdp), delta)[0])


def repeat_and_select_epsilon(candidates: Sequence[Sequence[Mechanism]], delta: float, mean: float,
                              shape: Optional[float]) -> float:
    """Epsilon at `delta` of releasing the best of K ~ Poisson(mean) (shape None/inf) or
    truncated negative binomial (mean, shape) trials, each a random draw among
    `candidates` (each candidate: the mechanisms one trial runs). Accounted per private
    dataset (the largest is returned) on dp-accounting's default RDP orders; with identical
    candidates it is RdpAccountant().compose(RepeatAndSelectDpEvent(event, mean, shape))."""
    datasets = _group_by_data(_active(m for c in candidates for m in c))
    if not datasets:
        return 0.0
    eps = []
    for data, touched in datasets.items():
        ids = {id(m) for m in touched}
        per_data = [[m for m in c if id(m) in ids] for c in candidates]
        eps.append(rdp_epsilon(repeat_and_select_rdp(per_data, mean, shape), delta))
    return max(eps)


def draw_num_samples(spec: dict, rng: np.random.Generator) -> int:
    """The random number of trials K for the repeat-and-select theorem.

    {"distribution": "poisson", "mean": M}: K ~ Poisson(M); K may be 0 (the theorem allows
    it: then nothing is released).
    {"distribution": "truncated_negative_binomial", "mean": M, "shape": eta}: K >= 1 with
    P(K=k) proportional to (1-gamma)^k * C(k+eta-1, k), eta > -1 (eta = 0: logarithmic,
    P ~ (1-gamma)^k / k; eta = 1: geometric), gamma solved from the mean as dp-accounting
    does (`tnb_gamma`). Drawn by inversion of the exact cdf."""
    dist = spec.get("distribution")
    mean = float(spec["mean"])
    if dist == "poisson":
        if not mean > 0:
            raise ValueError(f"poisson mean must be > 0, got {mean}")
        return int(rng.poisson(mean))
    if dist == "truncated_negative_binomial":
        if spec.get("shape") is None:
            raise ValueError("truncated_negative_binomial needs a finite `shape` (eta > -1)")
        eta = float(spec["shape"])
        gamma = tnb_gamma(mean, eta)
        if gamma >= 1.0:
            return 1
        u = rng.random()
        k, cdf = 1, 0.0
        p = tnb_pmf(1, gamma, eta)
        while True:
            cdf += p
            if cdf > u or (p == 0.0 and k > mean):
                return k
            p *= (1 - gamma) * (k + eta) / (k + 1)  # P(k+1) / P(k)
            k += 1
    raise ValueError(f"distribution must be 'poisson' or 'truncated_negative_binomial', got {dist!r}")


def tnb_pmf(k: int, gamma: float, eta: float) -> float:
    """P(K=k) of the truncated negative binomial D_{eta,gamma} (Papernot & Steinke, Def. 1)."""
    if k < 1:
        return 0.0
    lg = math.lgamma
    if eta == 0:
        return math.exp(k * math.log1p(-gamma) - math.log(k)) / math.log(1 / gamma)
    # C(k+eta-1, k) = Gamma(k+eta) / (Gamma(k+1) Gamma(eta)); its sign and that of the
    # normaliser gamma^-eta - 1 are both that of eta.
    log_comb = lg(k + eta) - lg(k + 1) - lg(eta + 1) + math.log(abs(eta))  # Gamma(eta) = Gamma(eta+1)/eta
    log_norm = math.log(abs(math.expm1(-eta * math.log(gamma))))
    return math.exp(k * math.log1p(-gamma) + log_comb - log_norm)


_NOTE_ADAPTIVE = ("adaptive search ({method}) chooses hyperparameters from earlier trials' private metrics: "
                  "outside the repeat-and-select theorem (it needs i.i.d. random draws); report the naive bound")
_NOTE_EARLY_STOP = ("early stopping / trial scheduling on private metrics: outside the repeat-and-select theorem; "
                    "report the naive bound")
_NOTE_GRID = ("grid search runs a fixed set of configurations, not i.i.d. random draws with a random number of "
              "trials: outside the repeat-and-select theorem; report the naive bound")


def tuning_dp_event_note(method: str, adaptive_or_early_stopping: bool) -> Optional[str]:
    """One line of warning when the search falls outside Papernot & Steinke's theorem (which
    needs K random and i.i.d. data-independent draws of the hyperparameters), else None.
    Only "random" without adaptivity or early stopping is inside (and then K must be drawn
    with `draw_num_samples`)."""
    m = (method or "").lower()
    if m not in ("random", "grid"):  # optuna, bayesopt, hyperopt, pbt, ...: adaptive
        return _NOTE_ADAPTIVE.format(method=method)
    if adaptive_or_early_stopping:
        return _NOTE_EARLY_STOP
    if m == "grid":
        return _NOTE_GRID
    return None
