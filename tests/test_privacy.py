"""DP-SGD step correctness and accounting, on the real Opacus stepper the loop uses."""
import math

import numpy as np
import pytest
import torch

from tests.helpers import independent_epsilon, tiny_model
from trainers.privacy import DPStepper, PoissonSampler, ShuffleSampler, solve_noise_multiplier


def per_sample_loss(net, x, y):
    return (net(x).squeeze(1) - y) ** 2


@pytest.mark.parametrize("mode", ["functorch", "hooks"])
def test_each_sample_contributes_its_clipped_gradient(mode):
    C = 0.05
    model = tiny_model()
    reference = tiny_model()
    stepper = DPStepper(model, torch.optim.SGD(model.parameters(), lr=0.0), 1, noise_multiplier=1.0,
                        max_grad_norm=C, sample_rate=0.1, n_train=60, accountant="rdp", grad_sample_mode=mode)
    x, y = torch.randn(6, 1, 3, 4, 4), torch.randn(6) * 10
    stepper.backward(per_sample_loss(stepper.module, x, y))
    stepper.microbatch_done(last=False)  # clip + accumulate only: p.summed_grad holds the clipped sum
    summed = [p.summed_grad.clone() for p in stepper.params]

    expected = [torch.zeros_like(p) for p in reference.parameters()]
    for i in range(len(x)):
        reference.zero_grad()
        per_sample_loss(reference, x[i:i + 1], y[i:i + 1]).sum().backward()
        g = [p.grad.clone() for p in reference.parameters()]
        norm = torch.sqrt(sum((t ** 2).sum() for t in g))
        assert norm > C  # the test only means something if clipping bites
        clipped = [t * min(1.0, C / (norm.item() + 1e-6)) for t in g]
        assert torch.sqrt(sum((t ** 2).sum() for t in clipped)) <= C * (1 + 1e-5)
        expected = [e + t for e, t in zip(expected, clipped)]
    for got, want in zip(summed, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_noise_has_std_sigma_times_c_and_empty_batches_are_steps():
    sigma, C, n_train, q = 1.7, 0.3, 100, 0.05
    model = tiny_model()
    stepper = DPStepper(model, torch.optim.SGD(model.parameters(), lr=0.0), 1, noise_multiplier=sigma,
                        max_grad_norm=C, sample_rate=q, n_train=n_train, accountant="rdp",
                        grad_sample_mode="functorch", noise_seed=0)
    stepper.seed_noise(0, 0)
    draws = []
    for _ in range(20):
        stepper.empty_microbatch()  # no data at all: the update is pure noise / (q * n_train)
        for p in stepper.params:
            p.grad_sample = torch.zeros((0, *p.shape))
        stepper.optimizer.signal_skip_step(do_skip=False)
        stepper.optimizer.pre_step()
        draws.append(torch.cat([p.grad.flatten() for p in stepper.params]) * (q * n_train))
        stepper.optimizer.zero_grad(set_to_none=True)
    noise = torch.cat(draws)
    assert noise.numel() > 2000
    assert abs(noise.mean().item()) < 0.05 * sigma * C
    assert noise.std().item() == pytest.approx(sigma * C, rel=0.03)
    assert stepper.steps == 20  # every empty sampling event was counted


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_matches_dp_accounting(accountant):
    sigma, q, steps, delta = 1.1, 0.02, 300, 1e-5
    model = tiny_model()
    stepper = DPStepper(model, torch.optim.SGD(model.parameters(), lr=0.0), 1, noise_multiplier=sigma,
                        max_grad_norm=1.0, sample_rate=q, n_train=50, accountant=accountant,
                        grad_sample_mode="functorch")
    for _ in range(steps):
        stepper.empty_microbatch()
        stepper.microbatch_done(last=True)
    assert stepper.steps == steps
    assert stepper.epsilon(delta) == pytest.approx(independent_epsilon(sigma, q, steps, delta, accountant), rel=0.01)


def test_accountant_state_round_trips():
    model = tiny_model()
    kw = dict(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, n_train=10, accountant="prv",
              grad_sample_mode="functorch")
    a = DPStepper(model, torch.optim.SGD(model.parameters(), lr=0.0), 1, **kw)
    for _ in range(7):
        a.empty_microbatch()
        a.microbatch_done(last=True)
    state = a.state_dict()
    torch.save(state, "/tmp/_acc.pt")
    b = DPStepper(tiny_model(), torch.optim.SGD(model.parameters(), lr=0.0), 1, **kw)
    b.load_state_dict(torch.load("/tmp/_acc.pt", weights_only=True))
    assert b.steps == 7 and b.epsilon(1e-5) == pytest.approx(a.epsilon(1e-5))


def test_solved_sigma_reaches_target_epsilon():
    sigma = solve_noise_multiplier(target_epsilon=3.0, delta=1e-5, sample_rate=0.05, steps=200, accountant="rdp")
    assert independent_epsilon(sigma, 0.05, 200, 1e-5, "rdp") == pytest.approx(3.0, rel=0.01)
    with pytest.raises(ValueError):
        solve_noise_multiplier(target_epsilon=1e-9, delta=1e-5, sample_rate=0.5, steps=1000, accountant="rdp")


def test_poisson_sampler_is_per_record_and_every_event_is_a_step():
    n, batch, world = 64, 2, 2
    samplers = [PoissonSampler(n, batch, r, world, seed=3) for r in range(world)]
    per_rank = [list(s.epoch(0)) for s in samplers]
    assert [len(x) for x in per_rank] == [32, 32]  # 1/q events on every rank, empty or not
    assert any(len(b) == 0 for b in per_rank[0])
    sizes = [sum(len(a) + len(b) for a, b in zip(*(s.epoch(e) for s in samplers))) for e in range(200)]
    assert np.mean(sizes) / 32 == pytest.approx(batch, rel=0.05)  # expected global batch = q * n
    shards = [set(s.shard) for s in samplers]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == n


def inclusions(n, batch, world, seeds, epochs):
    """included[e, s, i]: record i was in the global batch of step s of epoch e."""
    samplers = [PoissonSampler(n, batch, r, world, seed=seed) for r, seed in zip(range(world), seeds)]
    steps = samplers[0].steps
    out = np.zeros((epochs, steps, n), dtype=bool)
    for e in range(epochs):
        for s, local in enumerate(zip(*(sampler.epoch(e) for sampler in samplers))):
            for idx in local:
                out[e, s, idx] = True
    return out.reshape(epochs * steps, n)


def test_poisson_inclusion_is_q_per_record_and_independent_across_records_ranks_and_steps():
    """What the accountant assumes: each record joins each step with probability q,
    independently of every other record (on its own rank or another) and of other steps."""
    n, batch, world, epochs = 16, 4, 2, 400
    q = batch / n
    inc = inclusions(n, batch, world, seeds=(7, 7), epochs=epochs)
    trials = inc.shape[0]                                  # 1600 sampling events
    sd = np.sqrt(q * (1 - q) / trials)
    freq = inc.mean(0)
    assert np.all(np.abs(freq - q) < 5 * sd), freq         # every record, about q
    assert abs(freq.mean() - q) < 5 * sd / np.sqrt(n)
    # pairs of records: inclusion uncorrelated, whether on the same rank (0, 2) or on
    # different ranks at the same position of their shards (0, 1), or anywhere else
    corr = np.corrcoef(inc.T.astype(float))
    off = corr[~np.eye(n, dtype=bool)]
    bound = 5 / np.sqrt(trials)
    assert np.all(np.abs(off) < bound), np.abs(off).max()
    for i in range(0, n, 2):   # rank 0's k-th record and rank 1's k-th record: joint rate q^2
        both = np.mean(inc[:, i] & inc[:, i + 1])
        assert abs(both - q * q) < 5 * np.sqrt(q * q * (1 - q * q) / trials)
    # consecutive steps: a record's inclusion does not predict its next one
    lag = [np.corrcoef(inc[:-1, i], inc[1:, i])[0, 1] for i in range(n)]
    assert np.all(np.abs(lag) < bound), lag
    # the global batch size is Binomial(n, q): mean q n, variance n q (1 - q)
    sizes = inc.sum(1)
    assert sizes.mean() == pytest.approx(n * q, abs=5 * np.sqrt(n * q * (1 - q) / trials))
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.15)


def test_poisson_batches_are_secret_by_default_and_reproducible_only_with_a_seed():
    """seed=None (the DP default) draws from OS entropy: two samplers built alike, as two
    restarts of the same trial would be, never agree; an int seed reproduces the batches."""
    def epoch0(seed, rank=0):
        return [b.tolist() for b in PoissonSampler(256, 64, rank, 2, seed=seed).epoch(0)]

    assert epoch0(5) == epoch0(5)
    assert epoch0(5, rank=0) != epoch0(5, rank=1)
    assert epoch0(None) != epoch0(None)
    assert epoch0(None) != epoch0(0)
    sampler = PoissonSampler(256, 64, 0, 2, seed=None)
    assert [b.tolist() for b in sampler.epoch(0)] != [b.tolist() for b in sampler.epoch(0)]


def test_shuffle_sampler_covers_the_data_once_per_epoch():
    parts = [list(ShuffleSampler(10, 4, r, 2, seed=0).epoch(1)) for r in range(2)]
    seen = sorted(int(i) for rank in parts for b in rank for i in b)
    assert seen == list(range(10)) and len(parts[0]) == len(parts[1]) == math.ceil(10 / 4)
