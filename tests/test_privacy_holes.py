"""The privacy review's holes (issue 10), each pinned by a test that failed on the code as
it was: secret noise and batches, every step in every accountant, a validated noise ledger,
repeat-and-select over everything a search can draw, duplicates refused, one identity per
dataset, and selection that is accounted or refused. The end-to-end half (identical launches,
pixels, the parent's totals, selection on public/DP metrics) is tests/test_privacy_release.py."""
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from orchestrator import accounting
from orchestrator import ledger as L
from orchestrator.config import StageConfig
from orchestrator.sweep_file import ConfigError, parse_sweep
from orchestrator.errors import DataError
from trainers.phantoms import synthesize
from tests.helpers import independent_composition, stage, sweep_dict
from trainers.data import validate_dataset
from trainers.privacy import DPStepper, PoissonSampler, epsilon_of


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 27, 1))


def dp_stepper(noise_seed=None, accountant="rdp", sigma=1.0, q=0.1, lr=0.1):
    model = tiny_model()
    return DPStepper(model, torch.optim.SGD(model.parameters(), lr=lr), 1, noise_multiplier=sigma,
                     max_grad_norm=1.0, sample_rate=q, n_train=40, accountant=accountant,
                     grad_sample_mode="functorch", noise_seed=noise_seed)


def one_step(stepper, seed_noise=True):
    if seed_noise:
        stepper.seed_noise(0, 0)
    torch.manual_seed(5)
    x, y = torch.randn(4, 1, 3, 3, 3), torch.randn(4)
    stepper.backward((stepper.module(x).squeeze(1) - y) ** 2)
    stepper.microbatch_done(last=True)
    return torch.cat([p.detach().flatten() for p in stepper.params])


# --- 1. noise and batches from OS entropy ------------------------------------------------
def test_dp_noise_is_secret_by_default_and_reproducible_only_on_request():
    a, b = one_step(dp_stepper()), one_step(dp_stepper())
    assert not torch.allclose(a, b), "two identical DP steps drew the same noise: it is derivable"
    assert torch.equal(one_step(dp_stepper(noise_seed=0)), one_step(dp_stepper(noise_seed=0)))
    assert dp_stepper().generator is not None   # never torch's global (seeded) generator
    assert "generator" not in str(dp_stepper().state_dict())   # nothing of it is checkpointed


def test_poisson_batches_are_secret_by_default():
    draw = lambda seed: [tuple(b) for b in PoissonSampler(200, 20, 0, 1, seed).epoch(0)]  # noqa: E731
    assert draw(None) != draw(None)
    assert draw(3) == draw(3)
    torch.manual_seed(0), np.random.seed(0)   # the global seeds the loop sets do not matter
    first = draw(None)
    torch.manual_seed(0), np.random.seed(0)
    assert draw(None) != first


# --- 2. every step counted, in every accountant; the ledger validated ----------------------
@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_restored_recovered_and_new_steps_all_count(tmp_path, accountant):
    sigma, q, delta = 1.0, 0.1, 1e-5
    s = dp_stepper(accountant=accountant, sigma=sigma, q=q)
    s.load_state_dict({"mechanism": accountant, "history": [[sigma, q, 100]]})   # from a checkpoint
    ledger = tmp_path / "noise_ledger.txt"
    ledger.write_text("".join(f"{sigma} {q} {n}\n" for n in range(1, 106)))      # 5 more before a crash
    assert s.count_ledger(ledger) == 5
    s.empty_microbatch()
    s.microbatch_done(last=True)                                                   # one new step
    assert s.steps == 106
    expected = independent_composition([(sigma, q, 106)], delta, accountant)
    assert s.epsilon(delta) == pytest.approx(expected, rel=0.02)
    assert s.epsilon(delta) > 1.05 * independent_composition([(sigma, q, 6)], delta, accountant)


def test_a_torn_ledger_line_is_one_step_at_the_runs_sigma_and_q(tmp_path):
    s = dp_stepper(sigma=1.3, q=0.05)
    ledger = tmp_path / "noise_ledger.txt"
    ledger.write_text("1.3 0.05 1\n1.3 0.05 2\n1.3 0.05 3\n1.0 0.")    # killed mid-write
    assert s.count_ledger(ledger) == 4
    assert s.history == [(1.3, 0.05, 4)]                                 # never q = 0
    for torn in ("garbage\n", "1.3 nan 4\n", "1.3 0.05 x\n", "0 0.05 4\n"):
        t = dp_stepper(sigma=1.3, q=0.05)
        ledger.write_text("1.3 0.05 1\n" + torn)
        assert t.count_ledger(ledger) == 2 and t.history == [(1.3, 0.05, 2)], torn
    u = dp_stepper(sigma=1.3, q=0.05)                  # a bad line followed by valid ones: the count holds
    ledger.write_text("1.3 0.05 1\n1.3 0.\n1.3 0.05 3\n")
    assert u.count_ledger(ledger) == 3


def test_epsilon_of_a_heterogeneous_history_composes_every_entry():
    history = [(1.0, 0.1, 50), (2.0, 0.05, 30), (1.0, 0.1, 20)]
    for acct in ("rdp", "gdp", "prv"):
        merged = [(1.0, 0.1, 70), (2.0, 0.05, 30)]
        assert epsilon_of(history, 1e-5, acct) == pytest.approx(independent_composition(merged, 1e-5, acct), rel=0.03)


# --- 3. repeat-and-select over everything the search can draw ------------------------------
def _rs_reference(mechanisms, delta, mean):
    """Full enumeration with dp-accounting: the RDP curve of each drawable configuration,
    their pointwise maximum, the Papernot-Steinke transform, the RDP -> (eps, delta) step."""
    from dp_accounting.rdp import rdp_privacy_accountant as R
    from tests.helpers import poisson_gaussian_event

    orders = np.array(R.DEFAULT_RDP_ORDERS, dtype=float)
    curves = []
    for s, q, n in mechanisms:
        acc = R.RdpAccountant(orders=list(orders))
        acc.compose(poisson_gaussian_event(s, q, n))
        curves.append(acc._rdp)
    inner = np.max(np.stack(curves), axis=0)
    rs = R._compute_rdp_repeat_and_select(orders, inner, mean, math.inf)
    return R.compute_epsilon(orders, rs, delta)[0]


def random_stage(parameters, **train):
    return StageConfig.model_validate(stage(train={"epochs": 5, **train}, search={
        "method": "random", "num_samples": {"distribution": "poisson", "mean": 10}, "parameters": parameters}))


def test_repeat_and_select_prices_every_integer_of_a_batch_range():
    n, delta = 100, 1e-5
    st = random_stage({"train.batch_size": {"distribution": "int_uniform", "min": 26, "max": 34}},
                      batch_size=30, physical_batch_size=1)
    cands, note = accounting.privacy_candidates(st, n, delta, "rdp", "d")
    assert note is None
    drawable = {(1.0, b / n, math.ceil(n / b) * 5) for b in range(26, 35)}
    assert {(m[0].sigma, m[0].sample_rate, m[0].steps) for m in cands} == drawable
    # the peak is inside the range: batch 33 (4 steps an epoch at q 0.33) beats both ends
    eps = {b: independent_composition([(1.0, b / n, math.ceil(n / b) * 5)], delta) for b in range(26, 35)}
    assert eps[33] > max(eps[26], eps[34])
    ours = L.repeat_and_select_epsilon(cands, delta, mean=10, shape=None)
    assert ours == pytest.approx(_rs_reference(sorted(drawable), delta, 10), rel=1e-6)
    ends = L.repeat_and_select_epsilon([[L.Mechanism(1.0, b / n, math.ceil(n / b) * 5, data="d")] for b in (26, 34)],
                                       delta, mean=10, shape=None)
    assert ours > ends * 1.05   # what the old code (the two ends) reported


def test_continuous_ranges_take_their_worst_end_and_large_spaces_an_envelope():
    n, delta = 100, 1e-5
    st = random_stage({"dp.noise_multiplier": {"distribution": "uniform", "min": 0.9, "max": 3.0}},
                      batch_size=10, physical_batch_size=1)
    cands, _ = accounting.privacy_candidates(st, n, delta, "rdp", "d")
    assert [(m[0].sigma) for m in cands] == [0.9]
    big = random_stage({"train.batch_size": {"distribution": "int_uniform", "min": 5, "max": 60},
                        "train.epochs": {"distribution": "int_uniform", "min": 1, "max": 20},
                        "dp.noise_multiplier": {"values": [1.0, 1.5]}}, batch_size=10, physical_batch_size=1)
    cands, note = accounting.privacy_candidates(big, n, delta, "rdp", "d")
    assert len(cands) == 1 and "envelope" in note and "2240" in note
    env = L.repeat_and_select_epsilon(cands, delta, mean=10, shape=None)
    every = [(s, b / n, math.ceil(n / b) * e) for s in (1.0, 1.5) for b in range(5, 61) for e in range(1, 21)]
    picks = [every[i] for i in np.random.default_rng(0).choice(len(every), 40, replace=False)]
    picks += [(1.0, b / n, math.ceil(n / b) * 20) for b in (5, 34, 51, 60)]   # the most steps at each q
    assert env >= _rs_reference(picks, delta, 10)
    solved = random_stage({"train.batch_size": {"distribution": "int_uniform", "min": 2, "max": 60},
                           "train.epochs": {"distribution": "int_uniform", "min": 1, "max": 20}},
                          batch_size=10, physical_batch_size=1)
    solved.dp.noise_multiplier, solved.dp.target_epsilon = None, 3.0
    cands, note = accounting.privacy_candidates(solved, n, delta, "rdp", "d")
    assert cands == [] and "too many" in note


def _rows(sigma, q, steps, k):
    return [{"dp": True, "sigma": sigma, "q": q, "steps": steps, "stage": "ae", "trial_id": f"t{i}", "data": "d",
             "private": True, "select_sigma": None} for i in range(k)]


class _Plan:
    def __init__(self, st, n, private=True):
        from orchestrator.config import DataConfig

        self.stage, self.n_train, self.select_data = st, n, None
        self.unit, self.n_units, self.val_group_size = "record", n, None
        self.data = DataConfig(root="d", private=private)


@pytest.mark.parametrize("method", ["grid", "optuna"])
def test_repeat_and_select_only_for_random_search(method):
    st = StageConfig.model_validate(stage(search={"method": method, "num_samples": 3}))
    t = accounting.stage_tuning(st, _Plan(st, 40), _rows(1.0, 0.1, 10, 3), 1e-5, "rdp",
                                {"distribution": "poisson", "mean": 3})
    assert "epsilon_repeat_and_select" not in t and t["epsilon_naive"] > 0 and t["outside_theorem"]


# --- 5. a record twice in one split ---------------------------------------------------------
def test_duplicates_inside_a_split_are_refused(tmp_path):
    root = tmp_path / "d"
    synthesize(root, n=20, shape=(5, 16, 16), seed=0, labels=("LVEDV",))
    train = list(np.load(root / "training.npy"))
    np.save(root / "training.npy", np.array(train + [train[0]]))
    with pytest.raises(DataError, match=r"\(same file\) within the training split"):
        validate_dataset(root, ["LVEDV"], (5, 16, 16))
    copy = root / "copy_of_first.npz"
    copy.write_bytes((root / train[0]).read_bytes() if not os.path.isabs(train[0]) else open(train[0], "rb").read())
    np.save(root / "training.npy", np.array(train + [str(copy)]))
    with pytest.raises(DataError, match=r"copy_of_first.npz duplicates .* \(identical image\) within the training"):
        validate_dataset(root, ["LVEDV"], (5, 16, 16))


# --- 6. a dataset is its real folder, private or public for the whole study ------------------
def test_one_folder_is_one_dataset_with_one_privacy_setting(tmp_path):
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "alias")
    raw = sweep_dict(stages=[stage("a"), stage("b", data={"root": str(tmp_path / "alias/../alias")})],
                     data={"root": str(tmp_path / "data")})
    cfg = parse_sweep(raw, base_dir=tmp_path)
    a, b = (cfg.resolve(cfg.stage_data(s).root) for s in cfg.stages)
    assert a == b
    raw["stages"][1]["data"]["private"] = False
    with pytest.raises(ConfigError, match=r"stages\[b\]\.data\.private: .* is public here but private in stages\[a\]"):
        parse_sweep(raw, base_dir=tmp_path)


# --- 8. selection: accounted, public, or said to be unbounded -------------------------------
@pytest.mark.parametrize("search,message", [
    ({"select_on": "public"}, "select_data: select_on public needs a public dataset"),
    ({"select_on": "public", "select_data": {"root": "pub"}}, r"select_data.private: .* expected `private: false`"),
    ({"select_on": "dp"}, "select_dp: select_on dp needs"),
    ({"select_on": "dp", "select_dp": {"clip": 1, "noise_multiplier": 2}, "metric": "fidelity/fd"},
     "expected a val/ metric"),
    ({"select_dp": {"clip": 1, "noise_multiplier": 2}}, "select_dp: only used with select_on: dp"),
])
def test_selection_settings_are_checked(tmp_path, search, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep(sweep_dict(stages=[stage(search=search)]), base_dir=tmp_path)


def test_selection_cost_in_the_books():
    st = StageConfig.model_validate(stage(search={"method": "grid", "num_samples": 3}))
    rows = _rows(1.0, 0.1, 10, 3)
    private = accounting.stage_selection(st, _Plan(st, 40), rows, 1e-5, "rdp")
    assert private["epsilon"] == math.inf and "unbounded for the people of that split" in private["note"]
    assert accounting.stage_selection(st, _Plan(st, 40), rows[:1], 1e-5, "rdp")["epsilon"] == 0.0   # no choice
    noisy = StageConfig.model_validate(stage(search={"method": "grid", "num_samples": 3, "select_on": "dp",
                                                     "select_dp": {"clip": 1.0, "noise_multiplier": 4.0}}))
    sel = accounting.stage_selection(noisy, _Plan(noisy, 40), rows, 1e-5, "rdp")
    assert len(sel["mechanisms"]) == 3 and sel["data"] == "d#validation"
    assert sel["epsilon"] == pytest.approx(independent_composition([(4.0, 1.0, 3)], 1e-5, "rdp"), rel=1e-3)
    public = StageConfig.model_validate(stage(search={"select_on": "public", "select_data": {"private": False,
                                                                                          "root": "pub"}}))
    assert accounting.stage_selection(public, _Plan(public, 40), rows, 1e-5, "rdp")["epsilon"] == 0.0


# --- 2, through the training loop: a fault, the ledger, a resume, for every accountant -----
@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_a_resumed_trial_keeps_checkpointed_recovered_and_new_steps(monkeypatch, tmp_path, accountant):
    """Epoch 1 is checkpointed; the worker group then adds 3 noise steps and dies mid-write
    (a torn ledger line); the restarted trial restores the checkpoint, recovers the 4 steps
    from the ledger and trains epoch 2. Every step stays in epsilon, in every accountant."""
    from tests.helpers import phantom_data, run_loop

    torch.set_num_threads(1)
    data = phantom_data(tmp_path / "data", n=12)
    ae = {k: v for k, v in stage(train={"epochs": 1, "batch_size": 4, "physical_batch_size": 4},
                                 eval={"enabled": False}).items()}
    meta = {"accountant": accountant, "delta": 1e-3}
    first = run_loop(monkeypatch, tmp_path / "a", ae, data, **meta)
    (metrics, ckpt), = first
    sigma, q, steps1 = metrics["privacy.noise_multiplier"], metrics["privacy.sample_rate"], metrics["privacy/steps"]
    ledger = tmp_path / "a" / "storage" / "in-process" / "noise_ledger.txt"
    assert len(ledger.read_text().splitlines()) == steps1
    with open(ledger, "a") as f:
        f.write("".join(f"{sigma} {q} {steps1 + i}\n" for i in (1, 2, 3)) + f"{sigma} 0.")
    ae["train"]["epochs"] = 2
    resumed = run_loop(monkeypatch, tmp_path / "a", ae, data, checkpoint=ckpt, **meta)
    last = resumed[-1][0]
    assert last["epoch"] == 2
    assert last["privacy/steps"] == 2 * steps1 + 4
    assert last["privacy/epsilon"] == pytest.approx(
        independent_composition([(sigma, q, 2 * steps1 + 4)], 1e-3, accountant), rel=0.03)
