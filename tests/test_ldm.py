"""LDM adapter: shapes (image and latent space), DP-SGD step through Opacus, label
conditioning (known / unknown / NaN labels), DDIM exactness and the scale factor's origin."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models.beta_vae import BetaVAE
from models.ldm import LDM, FrozenCompression
from opacus.validators import ModuleValidator
from orchestrator.config import BetaVAEConfig, LDMConfig
from trainers.privacy import DPStepper

TINY = dict(channels=[8, 16], norm_num_groups=4, num_head_channels=4, label_embedding_dim=8,
            num_train_timesteps=50, num_inference_steps=3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cfg(**kw):
    return LDMConfig(**{**TINY, **kw})


def batch(shape, b=4):
    # Known and unknown labels, and one sample with no known label at all.
    labels = torch.tensor([[1.0, 50.0, 0.0], [2.0, 0.0, 3.0], [0.0, 0.0, 0.0], [4.0, -5.0, 60.0]])[:b]
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)[:b]
    return {"image": torch.rand(b, 1, *shape), "labels": labels, "label_mask": mask}


def compression(shape):
    torch.manual_seed(1)
    return FrozenCompression.from_adapter(BetaVAE(BetaVAEConfig(channels=[8, 16], norm_num_groups=4), shape, 3))


def warm_up(a, shape, steps=2):
    """A few plain Adam steps. MONAI zero-initialises the output projection of every
    cross-attention block (as in Rombach et al.), so at init the labels cannot reach the
    output; one step makes the context path live."""
    opt = torch.optim.Adam(a.network.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        a.per_sample_loss(a.network, batch(shape))[0].mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def check_sample(x, n, shape):
    assert x.shape == (n, 1, *shape)
    assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1


@pytest.mark.parametrize("shape,channels", [
    # The mid block always self-attends; 3 levels keep it at 4x9x9 tokens on (13, 33, 35)
    # (2 levels would be 7x17x18 = 2142 tokens, seconds per forward on one CPU thread).
    ((13, 33, 35), [8, 16, 16]),
    ((5, 16, 16), [8, 16]),
])
def test_image_space_shapes(shape, channels):
    torch.manual_seed(0)
    a = LDM(cfg(channels=channels, attention_levels=[False] * (len(channels) - 1) + [True]), shape, 3)
    loss, parts = a.per_sample_loss(a.network, batch(shape, 2))
    assert loss.shape == (2,) and torch.isfinite(loss).all() and parts == {}
    check_sample(a.sample(torch.tensor([[1.0, 2.0, 3.0]]), n=2, guidance_scale=2.0), 2, shape)


def test_latent_space_shapes():
    shape = (13, 32, 32)
    comp = compression(shape)
    assert comp.latent_shape == (3, 7, 16, 16)  # odd latent depth: padded to 8 for the UNet
    a = LDM(cfg(), shape, 3, compression=comp)
    # The frozen compression is not part of what Opacus wraps.
    assert not {id(p) for p in comp.parameters()} & {id(p) for p in a.network.parameters()}
    assert not any(p.requires_grad for p in comp.parameters())
    loss, _ = a.per_sample_loss(a.network, batch(shape, 3))
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    b = batch(shape, 2)
    check_sample(a.sample(b["labels"], b["label_mask"]), 2, shape)


@pytest.mark.parametrize("mode", ["functorch", "hooks"])
def test_dp_step(mode):
    shape = (5, 16, 16)
    comp = compression(shape)
    torch.manual_seed(0)
    a = LDM(cfg(label_dropout=0.5), shape, 3, compression=comp)
    warm_up(a, shape)
    assert ModuleValidator.validate(a.network, strict=False) == []
    frozen = [p.detach().clone() for p in comp.parameters()]
    before = [p.detach().clone() for p in a.network.parameters()]
    stepper = DPStepper(a.network, torch.optim.Adam(a.network.parameters()), 1, noise_multiplier=1.0,
                        max_grad_norm=1.0, sample_rate=0.5, n_train=8, accountant="rdp", grad_sample_mode=mode)
    b = batch(shape)
    loss, _ = a.per_sample_loss(stepper.module, b)
    assert loss.shape == (4,)
    stepper.backward(loss)
    named = dict(a.network.named_parameters())
    for name, p in named.items():
        assert p.grad_sample is not None and p.grad_sample.shape == (4, *p.shape), name
        # Per-sample gradients add up to the ordinary batch gradient.
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # Sample 2 has no known label: its label values never reached the value embedding.
    assert named["embedder.value_in.weight"].grad_sample[2].abs().max() == 0
    assert named["embedder.unknown.weight"].grad_sample[2].abs().max() > 0
    stepper.microbatch_done(last=True)
    assert stepper.steps == 1
    assert any(not torch.equal(p0, p) for p0, p in zip(before, a.network.parameters()))
    assert all(torch.equal(p0, p) for p0, p in zip(frozen, comp.parameters()))


@pytest.mark.parametrize("how", ["cross_attention", "embedding", "both"])
def test_conditioning_is_used(how):
    shape = (5, 16, 16)
    torch.manual_seed(0)
    a = LDM(cfg(label_conditioning=how), shape, 3)
    # the UNet has cross-attention exactly when asked; the embedding path is the label_time Linear
    assert a.network.unet.with_conditioning == (how != "embedding")
    assert (a.network.label_time is not None) == (how != "cross_attention")
    warm_up(a, shape)

    def draw(labels, mask=None, **kw):
        return a.sample(torch.tensor(labels), None if mask is None else torch.tensor(mask),
                        generator=torch.Generator().manual_seed(7), **kw)

    x1, x2 = draw([[1.0, 50.0, 0.0]]), draw([[4.0, 10.0, 1.0]])
    assert (x1 - x2).abs().max() > 0
    assert torch.equal(x1, draw([[1.0, 50.0, 0.0]]))
    # Unknown labels: their values are ignored, by mask or by NaN.
    u1 = draw([[1.0, 50.0, 0.0]], [[True, False, True]])
    assert torch.equal(u1, draw([[1.0, -999.0, 0.0]], [[True, False, True]]))
    assert torch.equal(u1, draw([[1.0, float("nan"), 0.0]]))
    assert (u1 - x1).abs().max() > 0
    check_sample(draw([[float("nan")] * 3], guidance_scale=3.0), 1, shape)


def test_no_labels():
    shape = (5, 16, 16)
    a = LDM(cfg(), shape, 0)
    b = {"image": torch.rand(2, 1, *shape), "labels": torch.zeros(2, 0), "label_mask": torch.zeros(2, 0, dtype=torch.bool)}
    assert a.per_sample_loss(a.network, b)[0].shape == (2,)
    check_sample(a.sample(None, n=2, guidance_scale=2.0), 2, shape)


class Oracle(nn.Module):
    """Predicts the exact noise that leads from z_t to a known x0."""

    def __init__(self, x0, acp):
        super().__init__()
        self.x0, self.acp = x0, acp

    def forward(self, z, t, labels, mask, drop):
        a = self.acp[t].view(-1, 1, 1, 1, 1)
        return (z - a.sqrt() * self.x0) / (1 - a).sqrt()


def test_ddim_is_exact_with_an_oracle():
    # DDIM with the true noise lands on x0 for any number of steps, also where the timesteps
    # are not evenly spaced by T // steps.
    shape = (4, 8, 8)
    a = LDM(cfg(scale_factor=0.7), shape, 3)
    target = torch.rand(1, 1, *shape)
    z0, _ = a.to_diffusion(target)
    oracle = Oracle(z0, a.train_scheduler.alphas_cumprod)
    for steps in (3, 7):
        x = a.sample(torch.zeros(1, 3), n=1, num_inference_steps=steps, net=oracle,
                     generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(x, target, rtol=0, atol=1e-4)


def test_scale_factor_origin():
    shape = (4, 8, 8)
    a = LDM(cfg(), shape, 3)
    assert (a.scale_factor, a.scale_factor_source) == (1.0, "default")
    a = LDM(cfg(scale_factor=0.25), shape, 3)
    assert (a.scale_factor, a.scale_factor_source) == (0.25, "config")
    x = torch.rand(1, 1, *shape)
    torch.testing.assert_close(a.to_diffusion(x)[0], (2 * x - 1) * 0.25)
    a = LDM(cfg(scale_factor=0.25), shape, 3, scale_factor=2.0)  # e.g. computed on public data
    assert (a.scale_factor, a.scale_factor_source) == (2.0, "given")


def test_label_embedding_path_reaches_every_level_and_is_fine_tuned():
    """`embedding`: the labels move the output through the timestep embedding alone (no
    cross-attention anywhere), and `train.finetune: attention` keeps that path trainable."""
    from trainers.generators import freeze_all_but_attention
    shape = (5, 16, 16)
    torch.manual_seed(0)
    a = LDM(cfg(label_conditioning="embedding"), shape, 3)
    warm_up(a, shape)
    assert not any("attn2" in n for n, _ in a.network.named_parameters())  # no cross-attention layers
    x, _ = a.to_diffusion(torch.rand(2, 1, *shape))  # padded to the UNet's stride
    t = torch.tensor([10, 10])
    mask, keep = torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        e1 = a.network(x, t, torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0]]), mask, keep)
        e2 = a.network(x, t, torch.tensor([[1.0, 2.0, 0.0], [9.0, 0.0, 1.0]]), mask, keep)
    assert torch.equal(e1[0], e2[0]) and (e1[1] - e2[1]).abs().max() > 0
    freeze_all_but_attention(a.network)
    assert all(p.requires_grad for p in a.network.label_time.parameters())
    assert all(p.requires_grad for p in a.network.embedder.parameters())


@pytest.mark.parametrize("schedule", ["scaled_linear_beta", "linear_beta"])
def test_preflight_warns_when_the_schedule_ends_far_from_noise(schedule, capsys):
    """200 steps at the 1000-step betas keep 41% of the signal at t = T (MONAI's own
    alphas_cumprod says the same); the launch says so in one line, and not at 5x the betas."""
    import math

    from monai.networks.schedulers import DDPMScheduler
    from orchestrator.config import StageConfig
    from orchestrator.preflight import terminal_signal, warn_on_noise_schedule

    for betas, warned in (({}, True), ({"beta_start": 0.0075, "beta_end": 0.0975}, False)):
        stage = StageConfig.model_validate({"name": "g", "model": {"kind": "ldm", "num_train_timesteps": 200,
                                                                   "beta_schedule": schedule, **betas}})
        m = stage.model
        monai = DDPMScheduler(num_train_timesteps=200, schedule=schedule, beta_start=m.beta_start, beta_end=m.beta_end)
        assert terminal_signal(m) == pytest.approx(math.sqrt(float(monai.alphas_cumprod[-1])), rel=1e-4)
        warn_on_noise_schedule(stage)
        out = capsys.readouterr().out
        assert ("warning: stages[g].model: the last of 200 DDPM steps" in out) == warned, out


def test_label_ranges_map_declared_labels_affinely_and_others_by_squash():
    """A declared range spreads a label over [-1, 1] (100 vs 200 mL: -0.6 vs 0.2, where the
    squash gives 4.6 vs 5.3); undeclared labels keep the squash; the map is fixed by the
    config, so a checkpoint rebuilt from its model_config embeds labels identically."""
    from models.ldm import squash
    a = LDM(cfg(label_ranges={"V": [50, 300], "E": [0, 1]}), (5, 16, 16), 3, label_names=["V", "T", "E"])
    x = torch.tensor([[100.0, 7.0, 0.0], [200.0, 12.0, 1.0]])
    v = a.network.embedder.value_map(x)
    assert torch.allclose(v[:, 0], torch.tensor([-0.6, 0.2]))
    assert torch.allclose(v[:, 1], squash(x[:, 1]))
    assert torch.allclose(v[:, 2], torch.tensor([-1.0, 1.0]))
    plain = LDM(cfg(), (5, 16, 16), 3)
    assert torch.allclose(plain.network.embedder.value_map(x), squash(x))
    # the ranges are no weights: a state_dict moves between the two unchanged
    assert set(a.network.state_dict()) == set(plain.network.state_dict())
    with pytest.raises(ValueError, match="needs the label names"):
        LDM(cfg(label_ranges={"V": [50, 300]}), (5, 16, 16), 3)


def test_label_ranges_reach_the_network_output():
    torch.manual_seed(0)
    shape = (4, 16, 16)  # a multiple of the UNet stride: the network is called unpadded below
    a = LDM(cfg(label_ranges={"A": [0, 100]}), shape, 3, label_names=["A", "B", "C"])
    warm_up(a, shape)
    b = LDM(cfg(), shape, 3)
    b.network.load_state_dict(a.network.state_dict())
    z = torch.randn(2, 1, *shape)
    t = torch.tensor([10, 10])
    labels, mask, keep = torch.tensor([[50.0, 1, 1]] * 2), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        out_a, out_b = a.network(z, t, labels, mask, keep), b.network(z, t, labels, mask, keep)
    assert not torch.allclose(out_a, out_b)  # same weights, different label map -> different output


def test_cached_latents_give_the_loss_the_encoder_would():
    """LatentCache (trainers/data.py) stores each volume's latent once; the training loss
    on a cached batch equals the loss that encodes the batch itself, draw for draw."""
    from trainers.data import LatentCache, collate

    shape = (5, 16, 16)
    torch.manual_seed(0)
    a = LDM(cfg(), shape, 3, compression=compression(shape))
    warm_up(a, shape)   # MONAI zero-initialises the output layer: at init the input does not matter
    raw = [{"image": im, "labels": lb, "label_mask": m}
           for im, lb, m in zip(*(batch(shape)[k] for k in ("image", "labels", "label_mask")))]
    cached = LatentCache(raw, a.encode, "cpu", batch_size=3)   # two chunks: 3 + 1
    assert cached.latents.shape == (4, *a.compression.latent_shape) and len(cached) == 4
    plain, with_latent = collate(raw, [3, 0, 2], "cpu"), collate(cached, [3, 0, 2], "cpu")
    assert "latent" not in plain and torch.equal(with_latent["image"], plain["image"])
    torch.manual_seed(5)
    expected, _ = a.per_sample_loss(a.network, plain)
    torch.manual_seed(5)
    got, _ = a.per_sample_loss(a.network, with_latent)
    torch.testing.assert_close(got, expected)
    # and the cache is what the loss uses: a wrong latent changes it
    with_latent["latent"] = with_latent["latent"] + 1.0
    torch.manual_seed(5)
    assert not torch.allclose(a.per_sample_loss(a.network, with_latent)[0], expected)
