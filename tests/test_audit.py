"""The one-run privacy audit (trainers/audit.py): the bound, the canaries on real Opacus
DP-SGD, and proof that the audit has teeth (a broken noise scale is caught)."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from orchestrator.errors import ConfigError
from orchestrator.sweep_file import parse_sweep
from tests.helpers import stage, sweep_dict
from trainers.audit import GradientCanaries, InputCanaries, audit_bound, epsilon_lower, k_grid, p_value
from trainers.privacy import PoissonSampler, epsilon_of, make_dp_stepper

DELTA = 1e-5
N, BATCH = 64, 32          # q = 1/2: the canaries' signal grows with q * sqrt(steps) / sigma
CANARIES = 1000


# --- the bound ------------------------------------------------------------------------

@pytest.mark.parametrize("r", [100, 1000])
def test_perfect_guesses_match_the_closed_form(r):
    # r correct out of r, delta = 0: the bound solves p^r = significance, p = e^eps / (1 + e^eps).
    p = 0.05 ** (1 / r)
    assert epsilon_lower(r, r, r, 0.0, 0.05) == pytest.approx(math.log(p / (1 - p)), abs=1e-4)
    # FACTS.md: 100 perfect guesses give about 3.5, 1000 about 5.8; delta only lowers it
    assert epsilon_lower(r, r, r, DELTA, 0.05) <= epsilon_lower(r, r, r, 0.0, 0.05)


def test_p_value_is_the_binomial_tail_plus_the_delta_term():
    m, r, v, eps, delta = 500, 200, 150, 1.0, 1e-3
    q = 1 / (1 + math.exp(-eps))
    tail = sum(math.comb(r, w) * q ** w * (1 - q) ** (r - w) for w in range(v, r + 1))
    alpha = max(sum(scipy.stats.binom.pmf(v - j, r, q) for j in range(1, i + 1)) / i for i in range(1, v + 1))
    assert p_value(m, r, v, eps, 0.0) == pytest.approx(tail, rel=1e-9)
    assert p_value(m, r, v, eps, delta) == pytest.approx(tail + 2 * m * delta * alpha, rel=1e-9)
    eps_lo = epsilon_lower(m, r, v, delta, 0.05)
    assert p_value(m, r, v, eps_lo - 1e-3, delta) < 0.05 < p_value(m, r, v, eps_lo + 1e-3, delta)


def test_scores_unrelated_to_the_coins_rarely_give_a_positive_bound():
    rng = np.random.default_rng(0)
    positive = sum(audit_bound(rng.normal(size=200), rng.random(200) < 0.5, DELTA)["audit/epsilon_lower"] > 0
                   for _ in range(200))
    assert positive <= 10   # a 95% bound over the whole k grid: at most ~5% false alarms


def test_k_grid_stays_within_the_canaries():
    assert k_grid(1000)[-1] == 500 and k_grid(1000)[0] >= 1
    assert all(2 * k <= 101 for k in k_grid(101))


# --- the schema -----------------------------------------------------------------------

def _sweep(**audit_stage):
    return sweep_dict(stages=[stage(**audit_stage)])


def test_audit_key_defaults_to_gradient_canaries():
    cfg = parse_sweep(_sweep(audit={"canaries": 200}), source="s.yaml")
    assert cfg.stages[0].audit.kind == "gradient" and cfg.stages[0].audit.canaries == 200


@pytest.mark.parametrize("change,expected", [
    ({"audit": {"canaries": 200}, "dp": {"enabled": False}}, "expected dp.enabled: true"),
    ({"audit": {"canaries": 10}}, "stages[ae].audit.canaries"),
    ({"audit": {"canaries": 200, "kind": "blackbox"}}, "stages[ae].audit.kind"),
])
def test_bad_audit_is_one_line(change, expected):
    raw = _sweep(**change)
    if change.get("dp") == {"enabled": False}:
        raw["stages"][0]["dp"] = {"enabled": False}
    with pytest.raises(ConfigError) as err:
        parse_sweep(raw, source="s.yaml")
    assert "\n" not in str(err.value) and expected in str(err.value), str(err.value)


def test_a_stage_cannot_build_on_an_audited_stage():
    raw = sweep_dict(stages=[stage(audit={"canaries": 200}),
                             stage("ldm", model={"kind": "ldm", "channels": [8, 16]}, needs="ae")])
    with pytest.raises(ConfigError, match=r"stages\[ldm\]\.needs: stage 'ae' is audited"):
        parse_sweep(raw, source="s.yaml")


# --- canaries on real DP-SGD (Opacus), no Ray ---------------------------------------------

def scale_noise_down(stepper, factor: float) -> None:
    """TEST-ONLY FAULT: the optimizer adds noise at sigma / factor while the accountant keeps
    counting the configured sigma (`stepper.noise_multiplier`). No sweep key reaches this."""
    stepper.optimizer.noise_multiplier = stepper.noise_multiplier / factor


def train_audited(sigma: float, steps: int, *, seed: int = 0, fault: float = 1.0, canaries: int = CANARIES,
                  mode: str = "hooks", audit: bool = True, timing: dict | None = None, keep: bool = False,
                  sgd: float = 0.0):
    """`steps` DP-SGD steps of a small MLP on real Opacus, Poisson batches at q = 1/2;
    returns (claimed epsilon, audit result)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a tiny model: threads only contend on a shared machine
    try:
        out = _train_audited(sigma, steps, seed=seed, fault=fault, canaries=canaries, mode=mode, audit=audit,
                             timing=timing, sgd=sgd)
        return out if keep else out[:2]
    finally:
        torch.set_num_threads(threads)


def _train_audited(sigma, steps, *, seed, fault, canaries, mode, audit, timing, sgd):
    torch.manual_seed(seed)
    x = torch.randn(N, 32)
    y = (x[:, :4].sum(1, keepdim=True) > 0).float()
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=sgd) if sgd else torch.optim.Adam(model.parameters(), lr=1e-3)
    stepper = make_dp_stepper(mode, "beta_vae", model, opt, 1, noise_multiplier=sigma, max_grad_norm=1.0,
                              sample_rate=BATCH / N, n_train=N, accountant="rdp")
    if fault != 1.0:
        scale_noise_down(stepper, fault)
    canaries = (GradientCanaries(stepper.params, canaries, max_grad_norm=1.0, sample_rate=BATCH / N,
                                 expected_batch=BATCH).attach(opt) if audit else None)
    if timing is not None and canaries is not None:
        inner = canaries.step

        def timed():
            t = time.perf_counter()
            inner()
            timing["canaries_s"] = timing.get("canaries_s", 0.0) + time.perf_counter() - t
        canaries.step = timed
    t0 = time.perf_counter()
    poisson_steps(stepper, steps, lambda idx: ((stepper.module(x[idx]) - y[idx]) ** 2).sum(1))
    result = canaries.result(DELTA) if canaries else {}
    if timing is not None:
        timing["total_s"] = time.perf_counter() - t0
    assert stepper.steps == steps
    return stepper.epsilon(DELTA), result, canaries


def poisson_steps(stepper, steps: int, loss_of) -> None:
    """`steps` DP-SGD steps on Poisson batches of the N records (q = BATCH / N), as the loop
    takes them; `loss_of(indices)` is the per-sample loss of those records."""
    sampler, done = PoissonSampler(N, BATCH, 0, 1, None), 0
    while done < steps:
        for idx in sampler.epoch(done):
            if done == steps:
                break
            if len(idx) == 0:
                stepper.empty_microbatch()
            else:
                stepper.backward(loss_of(idx))
            stepper.microbatch_done(last=True)
            done += 1


@pytest.mark.parametrize("sigma,steps,seed", [(8.0, 100, 0), (8.0, 100, 1), (4.0, 100, 2), (2.5, 60, 3)])
def test_a_correct_dp_run_audits_below_its_claimed_epsilon(sigma, steps, seed):
    claimed, audit = train_audited(sigma, steps, seed=seed)
    assert 1 <= claimed <= 10
    assert audit["audit/canaries"] == CANARIES and audit["audit/steps"] == steps
    assert audit["audit/epsilon_lower"] <= claimed, (claimed, audit)


def test_noise_scaled_down_behind_the_accountants_back_is_caught():
    claimed, audit = train_audited(8.0, 100, fault=10.0)
    assert 1 <= claimed <= 10
    assert audit["audit/epsilon_lower"] > claimed, (claimed, audit)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_the_audit_has_power_with_every_stepper(mode):
    # sigma 0.3, 300 steps at q = 1/2: claimed epsilon in the hundreds; the canaries must show
    # it (the ceiling of 1000 canaries at 95% over the k grid is about 5.2).
    claimed, audit, canaries = train_audited(0.3, 300, mode=mode, keep=True)
    assert claimed > 100
    assert audit["audit/epsilon_lower"] > 3.0, audit
    assert audit["audit/correct"] >= 0.99 * audit["audit/guesses"]
    # a canary in the run adds C = 1 to the noisy sum in each step it joins (q = 1/2 of 300):
    # clipped to C, counted once, not scaled by anything else
    gap = canaries.scores[canaries.included].mean() - canaries.scores[~canaries.included].mean()
    assert gap == pytest.approx(0.5 * 300 * 1.0, rel=0.1)


def test_the_scores_are_what_the_model_received():
    # plain SGD: a weight's total change is -lr * (its summed noisy gradient) / (q n), so the
    # canaries' scores must equal what the optimizer applied to their coordinates
    _, _, canaries = train_audited(1.0, 50, keep=True, sgd=0.01)
    torch.manual_seed(0)
    torch.randn(N, 32)   # replay train_audited's draws (seed 0) for the same initial weights
    init = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    by_shape = {tuple(p.shape): p.detach() for p in init.parameters() if p.dim() >= 2}
    for p, local, ids in canaries.slots:
        moved = (by_shape[tuple(p.shape)].reshape(-1)[local] - p.detach().reshape(-1)[local]).double().numpy()
        assert np.allclose(moved, 0.01 * canaries.scores[ids.numpy()] / BATCH, rtol=1e-4, atol=1e-7)


def test_canaries_cost_little():
    timing: dict = {}
    train_audited(1.0, 200, timing=timing)
    # The audited run against the same run less what the canaries took: at most 1.3x.
    assert timing["total_s"] / (timing["total_s"] - timing["canaries_s"]) <= 1.3, timing


def test_coins_and_coordinates_are_secret_and_fresh():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    params = list(model.parameters())
    a, b = (GradientCanaries(params, CANARIES, max_grad_norm=1.0, sample_rate=0.5, expected_batch=32)
            for _ in range(2))
    assert not np.array_equal(a.included, b.included)
    assert abs(a.included.mean() - 0.5) < 4 * 0.5 / math.sqrt(CANARIES)   # fair coins
    coords = {(id(p), int(i)) for p, local, _ in a.slots for i in local}
    assert len(coords) == CANARIES                                          # distinct coordinates
    assert all(p.dim() >= 2 for p, _, _ in a.slots)                          # weights, not biases
    assert sorted(int(i) for _, _, ids in a.slots for i in ids) == list(range(CANARIES))


def test_gradient_canaries_restore_their_coins_coordinates_and_scores():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    make = lambda: GradientCanaries(list(model.parameters()), CANARIES, max_grad_norm=1.0,  # noqa: E731
                                    sample_rate=0.5, expected_batch=32)
    a, b = make(), make()
    a.scores, a.steps = np.random.default_rng(0).normal(size=CANARIES), 7
    b.load_state_dict(a.state_dict())
    assert np.array_equal(b.included, a.included) and np.array_equal(b.scores, a.scores) and b.steps == 7
    assert [(id(p), x.tolist(), i.tolist()) for p, x, i in b.slots] == [(id(p), x.tolist(), i.tolist())
                                                                     for p, x, i in a.slots]
    with pytest.raises(ValueError, match="a trial resumes with the audit it started with"):
        b.load_state_dict({**a.state_dict(), "canaries": 10})


def test_too_many_canaries_for_the_model_is_one_clear_error():
    with pytest.raises(ValueError, match="audit.canaries: 5000 canaries need 5000 distinct coordinates"):
        GradientCanaries(list(nn.Linear(8, 8).parameters()), 5000, max_grad_norm=1.0, sample_rate=0.5,
                         expected_batch=4)


def test_claimed_epsilon_in_the_tests_is_the_accountants():
    # the teeth above compare against the project's own accountant: keep them tied together
    claimed, _ = train_audited(8.0, 100, audit=False)
    assert claimed == pytest.approx(epsilon_of([(8.0, BATCH / N, 100)], DELTA, "rdp"))


# --- input canaries (black-box) on real DP-SGD (Opacus), no Ray ------------------------------

SHAPE = (1, 16, 16)
INPUT_CANARIES = 200


class LinearAutoencoder:
    """A test model family (the loop's adapter protocol: `network`, `per_sample_loss`): a
    linear autoencoder of 16 x 16 volumes from zero weights. It learns the span of what it is
    trained on, so an in-canary is reconstructed better than an out-canary, unless the noise
    hides it. `seen` keeps every batch it trained on (for the joining test)."""
    components = ()

    def __init__(self):
        self.network = nn.Sequential(nn.Flatten(), nn.Linear(256, 256))
        for p in self.network.parameters():
            nn.init.zeros_(p)
        self.seen = []

    def per_sample_loss(self, net, batch):
        x = batch["image"]
        if net.training:
            self.seen.append(x.detach().clone())
        return ((net(x).view_as(x) - x) ** 2).flatten(1).mean(1), {}


def train_input_audited(sigma: float, steps: int, *, seed: int = 0, fault: float = 1.0, mode: str = "hooks",
                        canaries: int = INPUT_CANARIES):
    """`steps` DP-SGD steps (plain SGD, lr 1) of LinearAutoencoder on N records of rank 4 with
    input canaries; returns (claimed epsilon, audit result, canaries, adapter)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        data = (torch.rand(N, 4) @ torch.rand(4, 256) / 4).view(N, 1, *SHAPE)
        adapter = LinearAutoencoder()
        opt = torch.optim.SGD(adapter.network.parameters(), lr=1.0)
        stepper = make_dp_stepper(mode, "beta_vae", adapter.network, opt, 1, noise_multiplier=sigma,
                                  max_grad_norm=1.0, sample_rate=BATCH / N, n_train=N, accountant="rdp")
        if fault != 1.0:
            scale_noise_down(stepper, fault)
        can = InputCanaries(canaries, SHAPE, 1, sample_rate=BATCH / N, physical_batch_size=64).attach(stepper, adapter)
        poisson_steps(stepper, steps, lambda idx: adapter.per_sample_loss(stepper.module, {"image": data[idx]})[0])
        assert stepper.steps == steps
        return stepper.epsilon(DELTA), can.result(DELTA), can, adapter
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("sigma,steps,seed", [(16.0, 100, 0), (8.0, 100, 1), (4.0, 100, 2), (2.5, 60, 3)])
def test_input_canaries_audit_a_correct_run_below_its_claim(sigma, steps, seed):
    claimed, audit, _, _ = train_input_audited(sigma, steps, seed=seed)
    assert 1 <= claimed <= 10
    assert audit["audit/canaries"] == INPUT_CANARIES and audit["audit/steps"] == steps
    assert audit["audit/epsilon_lower"] <= claimed, (claimed, audit)


@pytest.mark.parametrize("seed", [0, 1])
def test_input_canaries_catch_noise_scaled_down(seed):
    claimed, audit, _, _ = train_input_audited(16.0, 100, fault=10.0, seed=seed)
    assert 1 <= claimed <= 2
    assert audit["audit/epsilon_lower"] > claimed, (claimed, audit)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost", "bk"])
def test_input_canaries_have_power_with_every_stepper(mode):
    claimed, audit, can, _ = train_input_audited(0.3, 100, mode=mode)
    assert claimed > 100
    assert audit["audit/epsilon_lower"] > 2.0, audit            # the ceiling of 200 canaries is 3.7
    scores = can.scores()
    assert scores[can.included].min() > scores[~can.included].max()   # every in-canary fits better


def test_input_canaries_are_records_of_the_run():
    # Only included canaries are trained on, each joining a step with probability q, and a
    # canary is one record (one per-sample gradient: the stepper clips it like any other).
    _, _, can, adapter = train_input_audited(1.0, 100)
    volumes = can.batch(range(can.m))["image"]
    key = {volumes[i].numpy().tobytes(): i for i in range(can.m)}
    joined = np.zeros(can.m)
    for x in adapter.seen:
        for row in x:
            i = key.get(row.numpy().tobytes())
            if i is not None:
                joined[i] += 1
    assert joined[~can.included].sum() == 0
    per_step = joined[can.included].sum() / (100 * can.included.sum())
    assert per_step == pytest.approx(BATCH / N, abs=0.03)
    assert volumes.min() >= 0 and volumes.max() <= 1 and volumes.shape == (can.m, 1, *SHAPE)


def test_input_canaries_are_secret_and_fresh():
    a, b = (InputCanaries(INPUT_CANARIES, SHAPE, 1, sample_rate=0.5, physical_batch_size=8) for _ in range(2))
    assert not np.array_equal(a.included, b.included)
    assert not torch.equal(a.batch([0])["image"], b.batch([0])["image"])
    restored = InputCanaries(INPUT_CANARIES, SHAPE, 1, sample_rate=0.5, physical_batch_size=8)
    restored.load_state_dict(a.state_dict())
    assert np.array_equal(restored.included, a.included)
    assert torch.equal(restored.batch([3])["image"], a.batch([3])["image"])


def test_too_many_input_canaries_for_the_data_is_one_line(tmp_path, capsys):
    from orchestrator.launch import main
    from tests.helpers import write_sweep

    raw = sweep_dict(n=20, stages=[stage(audit={"canaries": 100, "kind": "input"})])   # 16 training volumes
    code = main([str(write_sweep(tmp_path, raw))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "stages[ae].audit.canaries: 100 input canaries for 16 training samples" in err
    assert "expected at most 8" in err


@pytest.mark.parametrize("kind", ["gradient", "input"])
def test_a_resumed_trial_continues_its_audit(monkeypatch, tmp_path, kind):
    from tests.helpers import TINY_AE, phantom_data, run_loop
    from trainers.checkpoints import CHECKPOINT_FILE

    data = phantom_data(tmp_path / "data", n=12, shape=(5, 16, 16))
    ae = {"name": "ae", "model": dict(TINY_AE), "eval": {"enabled": False}, "audit": {"canaries": 100, "kind": kind},
          "train": {"epochs": 2, "batch_size": 4, "physical_batch_size": 4, "seed": 0, "sample_grid": 0},
          "dp": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0}}
    whole = run_loop(monkeypatch, tmp_path / "whole", ae, data)
    (m1, ckpt1), (m2, ckpt2) = whole
    resumed = run_loop(monkeypatch, tmp_path / "resumed", ae, data, checkpoint=ckpt1)
    m_res, ckpt_res = resumed[-1]
    load = lambda c: torch.load(c / CHECKPOINT_FILE, weights_only=True)["audit"]  # noqa: E731
    first, again = load(ckpt1), load(ckpt_res)
    assert again["seed"] == first["seed"] and again["kind"] == kind      # the same canaries and coins
    assert first["steps"] == m1["privacy/steps"]
    assert m_res["audit/steps"] == again["steps"] == m_res["privacy/steps"] == m2["privacy/steps"]   # steps add up
    if kind == "gradient":   # scores carry on from the checkpoint: twice the steps, twice the noise's variance
        assert again["scores"].var() > 1.5 * first["scores"].var() > 0
    # nothing secret reaches the metrics (MLflow) or their names
    for metrics, _ in whole + resumed:
        assert not any(str(first["seed"]) in f"{k}={v}" for k, v in metrics.items())


# --- an audited trial is not a release ------------------------------------------------------

def test_an_audited_trial_is_never_selected():
    from orchestrator.sweep import _select

    rows = [{"ok": True, "checkpoint": "/a", "metric": 0.1, "audit": True},
            {"ok": True, "checkpoint": "/b", "metric": 0.5, "audit": False}]
    assert [r["checkpoint"] for r in _select(rows, "best", "min")] == ["/b"]
    assert [r["checkpoint"] for r in _select(rows, "each", "min")] == ["/b"]
    assert _select(rows[:1], "best", "min") == []


def test_the_report_shows_the_audit_beside_epsilon():
    from orchestrator.report import format_table

    row = {"stage": "ae", "model": "beta_vae", "dp": True, "private_data": True, "sigma": 1.0, "batch": 4,
           "latent": 3, "epsilon": 8.5, "epsilon_total": 8.5, "status": "FINISHED", "val/loss": 0.1,
           "audit/epsilon_lower": 1.25}
    head, line = format_table([row, {**row, "audit/epsilon_lower": None}], "val/loss")[:2]
    cols = head.split()
    assert cols[cols.index("epsilon") + 1] == "eps_audit"
    assert line.split()[cols.index("eps_audit")] == "1.25"


@pytest.mark.heavy
def test_an_audited_sweep_logs_the_audit_and_releases_nothing(tmp_path):
    import json

    from pathlib import Path

    from tests.helpers import client_for, launch, parent_run, trial_runs, write_sweep
    from trainers.checkpoints import CHECKPOINT_FILE

    # one stage per kind; 208 training volumes, so 100 input canaries are within half of them
    train = {"epochs": 1, "batch_size": 4, "seed": 0, "max_steps_per_epoch": 6}
    stages = [stage(train=train, audit={"canaries": 200}),
              stage("ai", train=train, audit={"canaries": 100, "kind": "input"})]
    proc = launch(tmp_path, write_sweep(tmp_path, sweep_dict("aud", n=260, stages=stages)), timeout=400)
    client = client_for(tmp_path / "runs/aud/mlflow.db")
    parent, runs = parent_run(client, "aud"), trial_runs(client, "aud")
    books = json.loads((tmp_path / "runs/aud/privacy_ledger.json").read_text())
    assert sorted(r.data.tags["orchestrator.stage"] for r in runs) == ["ae", "ai"]
    for run in runs:
        name = run.data.tags["orchestrator.stage"]
        kind, canaries = ("gradient", 200) if name == "ae" else ("input", 100)
        assert run.data.tags["orchestrator.audit"] == "true"
        m = run.data.metrics
        assert m["audit/canaries"] == canaries and 0 <= m["audit/correct"] <= m["audit/guesses"] <= canaries
        assert 0 <= m["audit/epsilon_lower"] <= m["privacy/epsilon"]
        assert m["audit/steps"] == m["privacy/steps"] == 6
        assert run.data.params["audit.canaries"] == str(canaries) and run.data.params["audit.kind"] == kind
        # never selected, and the secret seed reaches no param, metric or tag
        assert f"orchestrator.selected.{name}" not in parent.data.tags
        logged = " ".join(f"{k}={v}" for d in (run.data.params, run.data.metrics, run.data.tags) for k, v in d.items())
        ckpt = Path(run.data.tags["orchestrator.checkpoint"])
        secret = str(torch.load(ckpt / CHECKPOINT_FILE if ckpt.is_dir() else ckpt, weights_only=True)["audit"]["seed"])
        assert secret not in logged and secret not in proc.stdout + proc.stderr
    # not released models, and the report shows the audit beside epsilon
    assert all(t["audit"] is True and t["released"] is False for t in books["trials"].values())
    assert len(books["trials"]) == 2 and books["epsilon_total_max"] is None
    assert "eps_audit" in proc.stdout and "audited: stage(s) ae, ai" in proc.stdout


def _plain(params) -> list:
    """Copies as numpy: a torch tensor crosses a multiprocessing queue as a shared-memory handle that
    the receiver opens through the sender's resource sharer, which is gone once the sender exits."""
    return [p.detach().numpy().copy() for p in params]


def _rank(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    from trainers.privacy import DPStepper

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(N, 32)
    y = (x[:, :4].sum(1, keepdim=True) > 0).float()
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stepper = DPStepper(model, opt, world, noise_multiplier=0.3, max_grad_norm=1.0, sample_rate=BATCH / N,
                        n_train=N, accountant="rdp", grad_sample_mode="hooks")
    can = GradientCanaries(stepper.params, 500, max_grad_norm=1.0, sample_rate=BATCH / N, expected_batch=BATCH,
                           rank=rank, world_size=world).attach(opt)
    sampler = PoissonSampler(N, BATCH, rank, world, None)
    for idx in list(sampler.epoch(0)) * 50:   # 100 steps
        if len(idx) == 0:
            stepper.empty_microbatch()
        else:
            stepper.backward(((stepper.module(x[idx]) - y[idx]) ** 2).sum(1))
        stepper.microbatch_done(last=True)
    out.put((rank, can.included.copy(), can.scores.copy(), _plain(stepper.params),
             can.result(DELTA)))
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_add_each_canary_once_and_stay_in_step():
    import multiprocessing

    from tests.helpers import free_port

    ctx = multiprocessing.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, rest) for r, *rest in (out.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    (inc0, sc0, w0, res0), (inc1, sc1, w1, _) = got[0], got[1]
    assert np.array_equal(inc0, inc1) and np.allclose(sc0, sc1)        # one secret draw, shared
    assert all(np.array_equal(a, b) for a, b in zip(w0, w1))               # weights never diverge
    gap = sc0[inc0].mean() - sc0[~inc0].mean()
    assert gap == pytest.approx(0.5 * 100 * 1.0, rel=0.15)               # counted once, not per rank
    assert res0["audit/epsilon_lower"] > 2.0


TWO_RANK_CONFIGS = [("gradient", "bk"), ("gradient", "functorch"), ("input", "hooks"), ("input", "functorch"),
                    ("input", "bk")]


def _rank_configs(rank: int, world: int, port: int, out) -> None:
    """Each (kind, mode) of TWO_RANK_CONFIGS in turn: 100 steps at sigma 0.3 on 2 gloo ranks."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for kind, mode in TWO_RANK_CONFIGS:
        torch.manual_seed(0)
        if kind == "input":
            data = (torch.rand(N, 4) @ torch.rand(4, 256) / 4).view(N, 1, *SHAPE)
            adapter = LinearAutoencoder()
            model, loss_of = adapter.network, lambda m, idx: adapter.per_sample_loss(m, {"image": data[idx]})[0]
            opt = torch.optim.SGD(model.parameters(), lr=1.0)
        else:
            x = torch.randn(N, 32)
            y = (x[:, :4].sum(1, keepdim=True) > 0).float()
            model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
            loss_of = lambda m, idx: ((m(x[idx]) - y[idx]) ** 2).sum(1)  # noqa: E731
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        stepper = make_dp_stepper(mode, "beta_vae", model, opt, world, noise_multiplier=0.3, max_grad_norm=1.0,
                                  sample_rate=BATCH / N, n_train=N, accountant="rdp")
        if kind == "input":
            can = InputCanaries(INPUT_CANARIES, SHAPE, 1, sample_rate=BATCH / N, physical_batch_size=64, rank=rank,
                                world_size=world).attach(stepper, adapter)
        else:
            can = GradientCanaries(stepper.params, 500, max_grad_norm=1.0, sample_rate=BATCH / N,
                                   expected_batch=BATCH, rank=rank, world_size=world).attach(opt)
        records = 0
        for idx in list(PoissonSampler(N, BATCH, rank, world, None).epoch(0)) * 50:   # 100 steps
            if len(idx) == 0:
                stepper.empty_microbatch()
            else:
                stepper.backward(loss_of(stepper.module, idx))
            records += len(idx)
            stepper.microbatch_done(last=True)
        canary_rows = sum(len(x) for x in adapter.seen) - records if kind == "input" else 0
        out.put((rank, kind, mode, can.seed, can.included.copy(), _plain(stepper.params),
                 can.result(DELTA), stepper.steps, canary_rows))
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_with_every_kind_and_stepper():
    import multiprocessing

    from tests.helpers import free_port

    ctx = multiprocessing.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_configs, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(2 * len(TWO_RANK_CONFIGS)):
        rank, kind, mode, *rest = out.get(timeout=300)
        got[rank, kind, mode] = rest
    for p in procs:
        p.join(timeout=60)
    for kind, mode in TWO_RANK_CONFIGS:
        rank0, rank1 = got[0, kind, mode], got[1, kind, mode]
        (seed0, inc0, w0, res0, steps0, rows0), (seed1, inc1, w1, res1, steps1, rows1) = rank0, rank1
        assert seed0 == seed1 and np.array_equal(inc0, inc1), (kind, mode)          # one secret, shared
        assert steps0 == steps1 == 100 and res0["audit/steps"] == 100, (kind, mode)  # every event a step
        assert all(np.array_equal(a, b) for a, b in zip(w0, w1)), (kind, mode)          # weights never diverge
        assert res0["audit/epsilon_lower"] > 2.0, (kind, mode, res0)
        if kind == "input":   # rank 0 alone trains each canary (counted once) and scores them
            assert res1 == {} and rows1 == 0
            assert rows0 == pytest.approx(100 * BATCH / N * inc0.sum(), rel=0.1)


def audit_table(sigmas=(0.3, 0.5, 1.0, 2.0, 4.0), epochs: int = 150) -> None:
    """The README's claimed-vs-audited table: the real training loop (Ray stubbed, as
    tests/helpers.run_loop does), the tiny beta-VAE on 32 phantom training volumes, q = 1/2,
    2 steps per epoch. `python -m tests.test_audit` (a few minutes on 2 cores)."""
    import tempfile
    from pathlib import Path

    from tests.helpers import TINY_AE, phantom_data, run_loop

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        data = phantom_data(Path(tmp) / "data", n=40, shape=(5, 16, 16))
        print("| sigma | steps | claimed epsilon (rdp) | audit/epsilon_lower | guesses | correct |")
        print("|---:|---:|---:|---:|---:|---:|")
        for sigma in sigmas:
            ae = {"name": "ae", "model": dict(TINY_AE), "eval": {"enabled": False}, "audit": {"canaries": CANARIES},
                  "train": {"epochs": epochs, "batch_size": 16, "physical_batch_size": 16, "seed": 0, "sample_grid": 0},
                  "dp": {"enabled": True, "noise_multiplier": sigma, "max_grad_norm": 1.0}}
            m = run_loop(mp, Path(tmp) / f"s{sigma}", ae, data, delta=DELTA, accountant="rdp")[-1][0]
            print(f"| {sigma} | {m['privacy/steps']} | {m['privacy/epsilon']:.3g} | {m['audit/epsilon_lower']:.2f} "
                  f"| {m['audit/guesses']} | {m['audit/correct']} |", flush=True)


if __name__ == "__main__":
    audit_table()
