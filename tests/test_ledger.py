"""The privacy ledger and the cost of tuning (orchestrator/ledger.py), checked against
Google's dp-accounting as the independent reference."""
import json
import math

import numpy as np
import pytest
from scipy import stats

from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from orchestrator import ledger
from orchestrator.ledger import (Mechanism, compose_epsilon, compose_epsilon_details, draw_num_samples,
                                 ledger_for, naive_tuning_epsilon, repeat_and_select_epsilon,
                                 repeat_and_select_rdp, rdp_curve, tnb_gamma, tnb_pmf,
                                 tuning_dp_event_note, write_ledger_json)
from tests.helpers import composed_event, independent_composition

DELTA = 1e-5
TWO_STAGE = [(1.1, 0.02, 500), (0.9, 0.05, 300)]


def reference_epsilon(stages, accountant):
    return independent_composition(stages, DELTA, accountant, pld_interval=1e-3)


def mechs(stages, data="/data/a", stage="s"):
    return [Mechanism(s, q, n, stage=f"{stage}{i}", data=data) for i, (s, q, n) in enumerate(stages)]


def rs_reference(stages, mean, shape):
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.RepeatAndSelectDpEvent(composed_event(stages), mean, shape))
    return acc.get_epsilon(DELTA)


# --- mechanisms and composition ------------------------------------------------------------
def test_mechanism_round_trip_and_validation():
    m = Mechanism(1.1, 0.02, 500, stage="ae", trial="t1", data="/data/a")
    assert Mechanism.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    for bad in (dict(sigma=-1, sample_rate=0.1, steps=1), dict(sigma=1, sample_rate=1.5, steps=1),
                dict(sigma=1, sample_rate=0.1, steps=-1), dict(sigma=1, sample_rate=0.1, steps=1.5)):
        with pytest.raises(ValueError):
            Mechanism(**bad)
    with pytest.raises(ValueError):
        Mechanism.from_dict({**m.to_dict(), "epsilon": 3.0})


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_two_stage_composition_matches_dp_accounting(accountant):
    got = compose_epsilon(mechs(TWO_STAGE), DELTA, accountant)
    want = reference_epsilon(TWO_STAGE, accountant)
    assert got == pytest.approx(want, rel=0.01)
    # more than either stage alone
    for stage in TWO_STAGE:
        assert got > compose_epsilon(mechs([stage]), DELTA, accountant)


def test_gdp_composes_every_entry():
    from opacus.accountants import GaussianAccountant
    from opacus.accountants.analysis import gdp

    with pytest.warns(UserWarning):
        acc = GaussianAccountant()
    acc.history = [TWO_STAGE[0]]
    assert compose_epsilon(mechs([TWO_STAGE[0]]), DELTA, "gdp") == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    mu = math.sqrt(sum(gdp.compute_mu_poisson(steps=n, noise_multiplier=s, sample_rate=q) ** 2
                       for s, q, n in TWO_STAGE))
    both = compose_epsilon(mechs(TWO_STAGE), DELTA, "gdp")
    assert both == pytest.approx(gdp.eps_from_mu(mu=mu, delta=DELTA), rel=1e-9)
    assert both == pytest.approx(independent_composition(TWO_STAGE, DELTA, "gdp"), rel=1e-6)   # CLT by hand
    assert both > max(compose_epsilon(mechs([s]), DELTA, "gdp") for s in TWO_STAGE)


@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_public_or_empty_stage_adds_nothing(accountant):
    assert compose_epsilon([], DELTA, accountant) == 0.0
    dp = mechs([TWO_STAGE[0]])
    nothing = [Mechanism(1.0, 0.02, 0, stage="public"),        # no step
               Mechanism(1.0, 0.0, 100, stage="no data"),      # never samples a record
               Mechanism(math.inf, 0.1, 100, stage="all noise")]
    assert compose_epsilon(nothing, DELTA, accountant) == 0.0
    assert compose_epsilon(dp + nothing, DELTA, accountant) == compose_epsilon(dp, DELTA, accountant)
    # non-DP training on private data (sigma 0) is not private at all
    assert compose_epsilon(dp + [Mechanism(0.0, 0.1, 10)], DELTA, accountant) == math.inf


def test_composition_is_order_free_and_merges_identical_entries():
    a, b = TWO_STAGE
    split = mechs([a, b, (a[0], a[1], 250)])
    merged = mechs([(a[0], a[1], a[2] + 250), b])
    assert compose_epsilon(split, DELTA, "rdp") == pytest.approx(compose_epsilon(merged, DELTA, "rdp"), rel=1e-12)


def test_prv_numerical_limits(monkeypatch):
    ms = mechs(TWO_STAGE)
    exact, note = compose_epsilon_details(ms, DELTA, "prv")
    assert note is None
    # a grid too large for the budget: eps_error is raised, the result stays an upper bound
    monkeypatch.setattr(ledger, "PRV_MAX_POINTS", 50_000)
    coarse, note = compose_epsilon_details(ms, DELTA, "prv")
    assert "eps_error raised" in note
    assert exact <= coarse <= exact + 0.1
    assert coarse >= reference_epsilon(TWO_STAGE, "prv")
    # beyond what PRV can resolve, the RDP bound is reported
    monkeypatch.setattr(ledger, "PRV_MAX_EPS_ERROR", 0.02)
    fallback, note = compose_epsilon_details(ms, DELTA, "prv")
    assert "RDP" in note and fallback == compose_epsilon(ms, DELTA, "rdp")


# --- the ledger -------------------------------------------------------------------------------
def test_ledger_groups_by_dataset(tmp_path):
    a = mechs(TWO_STAGE, data="/data/a", stage="a")
    b = mechs([(1.5, 0.01, 400)], data="/data/b", stage="b")
    public = [Mechanism(1.0, 0.02, 0, stage="pretrain", data="/data/a")]
    out = ledger_for(a + b + public, DELTA, "rdp")
    assert set(out["datasets"]) == {"/data/a", "/data/b"}
    assert out["datasets"]["/data/a"]["epsilon"] == compose_epsilon(a, DELTA, "rdp")
    assert out["datasets"]["/data/b"]["epsilon"] == compose_epsilon(b, DELTA, "rdp")
    assert out["epsilon_total"] == max(d["epsilon"] for d in out["datasets"].values())
    assert out["epsilon_total"] < compose_epsilon(a + b, DELTA, "rdp")  # not composed across datasets
    assert len(out["datasets"]["/data/a"]["mechanisms"]) == 3
    assert out["accountant"] == "rdp" and out["delta"] == DELTA
    assert json.loads(json.dumps(out)) == out
    # a mechanism of unknown provenance is charged to every dataset
    unknown = [Mechanism(2.0, 0.01, 100)]
    both = ledger_for(a + b + unknown, DELTA, "rdp")["datasets"]
    assert both["/data/a"]["epsilon"] == compose_epsilon(a + unknown, DELTA, "rdp")
    assert both["/data/b"]["epsilon"] == compose_epsilon(b + unknown, DELTA, "rdp")
    assert ledger_for([], DELTA, "prv") == {"accountant": "prv", "delta": DELTA, "datasets": {}, "epsilon_total": 0.0,
                                            "epsilon_total_subject": 0.0}
    # round trip through the atomic writer
    p = write_ledger_json(tmp_path / "sub" / "ledger.json", out)
    assert json.loads(p.read_text()) == out


def test_write_ledger_json_is_atomic(tmp_path):
    path = tmp_path / "ledger.json"
    write_ledger_json(path, {"v": 1})
    write_ledger_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2}
    with pytest.raises(TypeError):
        write_ledger_json(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 2}          # the old file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]  # no temporary left behind


# --- tuning cost ------------------------------------------------------------------------------
@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_naive_tuning_is_composition_of_all_trials(accountant):
    trials = [mechs([(1.1, 0.02, 500)], stage="t1"), mechs([(0.9, 0.05, 300)], stage="t2")]
    assert naive_tuning_epsilon(trials, DELTA, accountant) == compose_epsilon(trials[0] + trials[1], DELTA, accountant)


ONE_RUN = [(1.0, 0.01, 1000)]


@pytest.mark.parametrize("mean,shape", [(10, None), (10, math.inf), (10, 1.0), (10, 0.5), (10, 0.0), (3.5, 2.0)])
def test_repeat_and_select_identical_candidates_is_dp_accounting(mean, shape):
    want = rs_reference(ONE_RUN, mean, math.inf if shape is None else shape)
    got = repeat_and_select_epsilon([mechs(ONE_RUN)] * 4, DELTA, mean, shape)
    assert got == pytest.approx(want, rel=1e-9)
    assert got > reference_epsilon(ONE_RUN, "rdp")  # one run
    if mean == 10:  # cheaper than composing 10 runs
        assert got < naive_tuning_epsilon([mechs(ONE_RUN, stage=f"t{i}") for i in range(10)], DELTA, "rdp")


def test_repeat_and_select_two_stage_candidate():
    got = repeat_and_select_epsilon([mechs(TWO_STAGE)], DELTA, 10, None)
    assert got == pytest.approx(rs_reference(TWO_STAGE, 10, math.inf), rel=1e-9)


@pytest.mark.parametrize("shape", [None, 1.0])
def test_repeat_and_select_dominated_candidates(shape):
    """Same q and steps, sigma 0.8 or 1.5: the sigma-0.8 curve dominates at every order, so
    the pointwise maximum is that curve and the mixed search costs exactly what a search
    over sigma 0.8 alone costs, and strictly more than one over sigma 1.5 alone."""
    lo, hi = [(0.8, 0.01, 1000)], [(1.5, 0.01, 1000)]
    assert np.all(rdp_curve(mechs(lo)) >= rdp_curve(mechs(hi)))
    mixed = repeat_and_select_epsilon([mechs(lo), mechs(hi)], DELTA, 10, shape)
    s = math.inf if shape is None else shape
    assert mixed == pytest.approx(rs_reference(lo, 10, s), rel=1e-9)
    assert mixed > rs_reference(hi, 10, s)


@pytest.mark.parametrize("shape", [None, 1.0])
def test_repeat_and_select_crossing_candidates(shape):
    """A search over sigma and batch size whose two RDP curves cross: the cost is more than
    that of a search over either configuration alone (the pointwise maximum is above each
    curve where the other one is smaller: here by more than 2%), at most that of a search
    whose one trial runs both configurations (its curve is their sum, >= their maximum),
    and elementwise the transformed curve sits between the same two."""
    c1, c2 = [(0.6, 0.002, 3000)], [(1.5, 0.05, 400)]
    r1, r2 = rdp_curve(mechs(c1)), rdp_curve(mechs(c2))
    assert np.any(r1 > r2) and np.any(r2 > r1)  # neither dominates
    s = math.inf if shape is None else shape
    mixed = repeat_and_select_epsilon([mechs(c1), mechs(c2)], DELTA, 10, shape)
    assert mixed > 1.02 * max(rs_reference(c1, 10, s), rs_reference(c2, 10, s))
    assert mixed <= rs_reference(c1 + c2, 10, s) + 1e-12
    curve = repeat_and_select_rdp([mechs(c1), mechs(c2)], 10, shape)
    for alone in (c1, c2):
        assert np.all(curve >= repeat_and_select_rdp([mechs(alone)], 10, shape) - 1e-12)
    assert np.all(curve <= repeat_and_select_rdp([mechs(c1 + c2)], 10, shape) + 1e-12)


def test_repeat_and_select_per_dataset_and_public():
    a = mechs(ONE_RUN, data="/data/a")
    b = mechs([(1.5, 0.01, 1000)], data="/data/b")
    assert repeat_and_select_epsilon([a + b], DELTA, 10, None) == pytest.approx(rs_reference(ONE_RUN, 10, math.inf))
    assert repeat_and_select_epsilon([[Mechanism(1.0, 0.1, 0)]], DELTA, 10, None) == 0.0


def test_repeat_and_select_negative_shape():
    """-1 < eta < 0 (outside dp-accounting, inside Theorem 2): continuous at eta = 0 with
    dp-accounting's logarithmic case and increasing in eta."""
    eps = {eta: repeat_and_select_epsilon([mechs(ONE_RUN)], DELTA, 10, eta) for eta in (-0.5, -1e-7, 0.0, 0.5)}
    assert eps[-1e-7] == pytest.approx(eps[0.0], rel=1e-6)
    assert eps[0.0] == pytest.approx(rs_reference(ONE_RUN, 10, 0.0), rel=1e-9)
    assert rs_reference(ONE_RUN, 1, math.inf) < eps[-0.5] < eps[0.0] < eps[0.5]


# --- the number of trials -------------------------------------------------------------------
ETAS = [3.0, 1.0, 0.5, 0.0, -0.5]


@pytest.mark.parametrize("eta", ETAS)
def test_tnb_gamma_and_pmf(eta):
    from dp_accounting.rdp.rdp_privacy_accountant import _gamma_truncated_negative_binomial

    g = tnb_gamma(10, eta)
    if eta >= 0:
        assert g == _gamma_truncated_negative_binomial(eta, 10)
    ks = np.arange(1, 20_000)
    p = np.array([tnb_pmf(k, g, eta) for k in ks])
    assert p.sum() == pytest.approx(1.0, abs=1e-9)
    assert (ks * p).sum() == pytest.approx(10.0, rel=1e-6)
    if eta == 1.0:  # geometric
        np.testing.assert_allclose(p[:50], g * (1 - g) ** (ks[:50] - 1), rtol=1e-12)
    if eta == 0.0:  # logarithmic
        np.testing.assert_allclose(p[:50], stats.logser.pmf(ks[:50], 1 - g), rtol=1e-10)
    if eta > 0:     # negative binomial conditioned on K >= 1
        nb = stats.nbinom.pmf(ks[:50], eta, g) / (1 - stats.nbinom.pmf(0, eta, g))
        np.testing.assert_allclose(p[:50], nb, rtol=1e-9)


def chi_square_p(draws, pmf, max_k):
    """Chi-square goodness of fit, bins k < max_k plus a pooled tail, expected >= 5 each."""
    n = len(draws)
    expected = [n * pmf(k) for k in range(max_k)]
    observed = [int(np.sum(draws == k)) for k in range(max_k)]
    tail_e, tail_o = n - sum(expected), int(np.sum(draws >= max_k))
    e_bins, o_bins, e_acc, o_acc = [], [], 0.0, 0
    for e, o in zip(expected + [tail_e], observed + [tail_o]):
        e_acc, o_acc = e_acc + e, o_acc + o
        if e_acc >= 5:
            e_bins.append(e_acc), o_bins.append(o_acc)
            e_acc, o_acc = 0.0, 0
    e_bins[-1] += e_acc
    o_bins[-1] += o_acc
    e = np.array(e_bins) * n / sum(e_bins)
    return stats.chisquare(o_bins, e).pvalue


N_DRAWS = 4000


def test_poisson_draws():
    rng = np.random.default_rng(1)
    x = np.array([draw_num_samples({"distribution": "poisson", "mean": 10}, rng) for _ in range(N_DRAWS)])
    assert abs(x.mean() - 10) < 4 * math.sqrt(10 / N_DRAWS)
    assert chi_square_p(x, lambda k: stats.poisson.pmf(k, 10), 25) > 1e-3
    small = np.array([draw_num_samples({"distribution": "poisson", "mean": 1}, rng) for _ in range(500)])
    assert (small == 0).any()  # zero trials is a legal outcome; the caller handles it


@pytest.mark.parametrize("eta", ETAS)
def test_truncated_negative_binomial_draws(eta):
    spec = {"distribution": "truncated_negative_binomial", "mean": 10, "shape": eta}
    rng = np.random.default_rng(2)
    x = np.array([draw_num_samples(spec, rng) for _ in range(N_DRAWS)])
    assert x.min() >= 1
    g = tnb_gamma(10, eta)
    ks = np.arange(1, 50_000)
    p = np.array([tnb_pmf(k, g, eta) for k in ks])
    sd = math.sqrt(max((ks ** 2 * p).sum() - 100, 0))
    assert abs(x.mean() - 10) < 4 * sd / math.sqrt(N_DRAWS)
    assert chi_square_p(x, lambda k: tnb_pmf(k, g, eta), 60) > 1e-3
    # the same stream gives the same draws
    again = np.random.default_rng(2)
    assert [draw_num_samples(spec, again) for _ in range(20)] == list(x[:20])


def test_bad_specs():
    rng = np.random.default_rng(0)
    for spec in ({"distribution": "uniform", "mean": 3},
                 {"distribution": "truncated_negative_binomial", "mean": 10, "shape": -1.0},
                 {"distribution": "truncated_negative_binomial", "mean": 0.5, "shape": 1.0},
                 {"distribution": "poisson", "mean": 0}):
        with pytest.raises(ValueError):
            draw_num_samples(spec, rng)


def test_tuning_notes():
    assert tuning_dp_event_note("random", False) is None
    for method, adaptive in (("grid", False), ("optuna", False), ("optuna", True), ("random", True)):
        note = tuning_dp_event_note(method, adaptive)
        assert isinstance(note, str) and "\n" not in note and "naive" in note
