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


@pytest.mark.parametrize("mode", ["functorch", "hooks"])
def test_per_sample_gradient_is_mean_over_k_draws_clipped_once(mode):
    K, C = 3, 0.05
    torch.manual_seed(0)
    adapter = LDM(cfg(label_dropout=0.0), SHAPE, 3)
    warm_up(adapter, SHAPE)
    plain = copy.deepcopy(adapter.network)
    data = batch(SHAPE, b=3)

    # Direct computation: sample i's gradient of (1/K) sum_k loss(x_i, draw_ik), on the plain
    # network with the very same draws (same seed, same batch).
    adapter.noise_multiplicity = K
    reference = []
    for i in range(3):
        torch.manual_seed(42)
        plain.zero_grad()
        loss, _ = adapter.per_sample_loss(plain, data)
        assert adapter.rows_per_sample == K and loss.shape == (3,)
        loss[i].backward()
        reference.append([p.grad.clone() for p in plain.parameters()])

    stepper = DPStepper(adapter.network, torch.optim.SGD(adapter.network.parameters(), lr=0.0), 1,
                        noise_multiplier=1.0, max_grad_norm=C, sample_rate=0.5, n_train=6, accountant="rdp",
                        grad_sample_mode=mode)
    torch.manual_seed(42)
    loss, _ = adapter.per_sample_loss(stepper.module, data)
    stepper.backward(loss, adapter.rows_per_sample)
    for p, *refs in zip(stepper.params, *reference):
        assert p.grad_sample.shape == (3, *p.shape)
        for i in range(3):
            torch.testing.assert_close(p.grad_sample[i], refs[i], rtol=1e-3, atol=1e-6)

    stepper.microbatch_done(last=False)  # clip + accumulate: one clip per sample, not per draw
    norms = [torch.sqrt(sum((g ** 2).sum() for g in ref)) for ref in reference]
    assert all(n > C for n in norms)
    for j, p in enumerate(stepper.params):
        want = sum(reference[i][j] * (C / (norms[i] + 1e-6)) for i in range(3))
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
    torch.testing.assert_close(ema.state_dict()["weight"], start + 1.0)
    other = WeightEMA(torch.nn.Linear(2, 2), 0.5)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.state_dict()["weight"], start + 1.0)
