"""Noise multiplicity: each sample's gradient is the mean over K timestep/noise draws,
clipped once; checked against a direct per-sample computation on the plain network."""
import copy

import pytest
import torch

from models.ldm import LDM
from tests.test_ldm import batch, cfg, warm_up
from trainers.loop import WeightEMA
from trainers.privacy import DPStepper

SHAPE = (5, 16, 16)


def spy_on_draws(adapter):
    """Record the (noise, timesteps) of every row the adapter's training loss draws."""
    seen = []
    real = adapter.train_scheduler.add_noise

    def add_noise(original_samples, noise, timesteps):
        seen.append((noise.detach().clone(), timesteps.detach().clone()))
        return real(original_samples, noise, timesteps)

    adapter.train_scheduler.add_noise = add_noise
    return seen, real


@pytest.mark.parametrize("mode", ["functorch", "hooks"])
def test_per_sample_gradient_is_mean_over_k_distinct_draws_clipped_once(mode):
    K, C, B = 3, 0.05, 3
    torch.manual_seed(0)
    adapter = LDM(cfg(label_dropout=0.0), SHAPE, 3)
    warm_up(adapter, SHAPE)
    plain = copy.deepcopy(adapter.network)
    data = batch(SHAPE, b=B)

    adapter.noise_multiplicity = K
    stepper = DPStepper(adapter.network, torch.optim.SGD(adapter.network.parameters(), lr=0.0), 1,
                        noise_multiplier=1.0, max_grad_norm=C, sample_rate=0.5, n_train=6, accountant="rdp",
                        grad_sample_mode=mode)
    seen, add_noise = spy_on_draws(adapter)
    torch.manual_seed(42)
    loss, _ = adapter.per_sample_loss(stepper.module, data)
    assert adapter.rows_per_sample == K and loss.shape == (B,)
    stepper.backward(loss, adapter.rows_per_sample)
    [(noise, t)] = seen
    assert noise.shape[0] == t.shape[0] == B * K    # sample i owns rows i*K .. i*K + K - 1

    # K distinct draws per sample: no two of a sample's rows share their noise, and the
    # timesteps are drawn per row, not once per sample
    for i in range(B):
        rows = noise[i * K:(i + 1) * K].flatten(1)
        for a in range(K):
            for b in range(a + 1, K):
                assert not torch.allclose(rows[a], rows[b]), f"sample {i}: draws {a} and {b} are copies"
    assert len(set(t.tolist())) > B, f"one timestep per sample, not per draw: {t.tolist()}"

    # The reference, computed independently: for each sample alone, each of its K draws
    # alone on the plain network, the loss averaged over the K draws, then its gradient.
    reference = []
    for i in range(B):
        plain.zero_grad()
        z, _ = adapter.to_diffusion(data["image"][i:i + 1])
        total = 0.0
        for k in range(K):
            eps, step = noise[i * K + k][None], t[i * K + k][None]
            pred = plain(add_noise(z, eps, step), step, data["labels"][i:i + 1],
                         data["label_mask"][i:i + 1], torch.zeros(1, dtype=torch.bool))
            total = total + (pred - eps).pow(2).mean()
        (total / K).backward()
        reference.append([p.grad.clone() for p in plain.parameters()])

    for p, *refs in zip(stepper.params, *reference):
        assert p.grad_sample.shape == (B, *p.shape)
        for i in range(B):
            torch.testing.assert_close(p.grad_sample[i], refs[i], rtol=1e-3, atol=1e-6)

    stepper.microbatch_done(last=False)  # clip + accumulate: one clip per sample, not per draw
    norms = [torch.sqrt(sum((g ** 2).sum() for g in ref)) for ref in reference]
    assert all(n > C for n in norms)
    for j, p in enumerate(stepper.params):
        want = sum(reference[i][j] * (C / (norms[i] + 1e-6)) for i in range(B))
        torch.testing.assert_close(p.summed_grad, want, rtol=1e-3, atol=1e-7)


def test_validation_uses_one_draw_and_k_is_per_sample():
    adapter = LDM(cfg(), SHAPE, 3)
    adapter.noise_multiplicity = 4
    adapter.network.eval()
    loss, _ = adapter.per_sample_loss(adapter.network, batch(SHAPE, b=2))
    assert adapter.rows_per_sample == 1 and loss.shape == (2,)
    adapter.network.train()
    loss, _ = adapter.per_sample_loss(adapter.network, batch(SHAPE, b=2))
    assert adapter.rows_per_sample == 4 and loss.shape == (2,)


def test_weight_ema_tracks_and_round_trips():
    net = torch.nn.Linear(2, 2)
    ema = WeightEMA(net, 0.5)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(2.0)
    ema.update(net)
    # the first update runs at the warm-up decay min(0.5, 1/10) = 0.1
    torch.testing.assert_close(ema.state_dict()["weight"], start + 1.8)
    other = WeightEMA(torch.nn.Linear(2, 2), 0.5)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.state_dict()["weight"], start + 1.8)


def test_weight_ema_warm_up_forgets_the_initial_weights():
    """decay 0.999 over 100 steps without a warm-up keeps 0.999^100 = 90% of the initial
    (random) weights; with it, the average is the trained weights."""
    net = torch.nn.Linear(2, 2)
    ema = WeightEMA(net, 0.999)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    for _ in range(100):
        ema.update(net)
    left = (net.weight - ema.state_dict()["weight"]).abs().max().item()  # 1.0 x the initial weights' share
    assert left < 1e-3, left
    assert ema.current_decay() == pytest.approx(101 / 110)
