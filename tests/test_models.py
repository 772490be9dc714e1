"""The beta-VAE family in DP mode, and its optional perceptual / adversarial terms."""
import pytest
import torch
from torch import nn

from models import build_adapter
from orchestrator.config import BetaVAEConfig
from orchestrator.sweep_file import ConfigError, parse_sweep
from trainers.privacy import DPStepper, Stepper

SHAPE = (5, 12, 14)


def batch(b=3):
    torch.manual_seed(1)
    return {"image": torch.rand(b, 1, *SHAPE), "labels": torch.zeros(b, 2), "label_mask": torch.ones(b, 2, dtype=torch.bool)}


def small(**kw):
    return BetaVAEConfig(channels=[4, 8], latent_channels=2, norm_num_groups=4, **kw)


@pytest.mark.parametrize("shape", [(13, 48, 48), (13, 33, 35), (5, 16, 16)])
def test_beta_vae_any_shape_in_is_shape_out(shape):
    a = build_adapter(small(), shape, 0)
    x = torch.rand(2, 1, *shape)
    recon, _, _ = a.network(x)
    assert recon.shape == x.shape
    loss, parts = a.per_sample_loss(a.network, {"image": x})
    assert loss.shape == (2,) and set(parts) == {"recon", "kl"}
    z = a.encode_latent(x)
    assert tuple(z.shape[1:]) == a.latent_shape and a.decode_latent(z).shape == x.shape


@pytest.mark.parametrize("mode", ["functorch", "hooks"])
def test_beta_vae_dp_step_gives_every_parameter_a_per_sample_gradient(mode):
    a = build_adapter(small(), SHAPE, 2)
    stepper = DPStepper(a.network, torch.optim.Adam(a.network.parameters(), lr=1e-3), 1, noise_multiplier=1.0,
                        max_grad_norm=1.0, sample_rate=0.5, n_train=6, accountant="rdp", grad_sample_mode=mode)
    before = {k: v.clone() for k, v in a.network.state_dict().items()}
    loss, _ = a.per_sample_loss(stepper.module, batch())
    stepper.backward(loss)
    params = [(n, p) for n, p in a.network.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if getattr(p, "grad_sample", None) is None or p.grad_sample.shape != (3, *p.shape)]
    assert not missing, missing
    stepper.microbatch_done(last=True)
    assert stepper.steps == 1
    after = a.network.state_dict()
    assert all(not torch.equal(before[n], after[n]) for n, _ in params)


def tiny_feature_net(path):
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1))
    torch.jit.script(net).save(str(path))


def test_perceptual_term_from_local_torchscript(tmp_path):
    tiny_feature_net(tmp_path / "features.pt")
    a = build_adapter(small(perceptual_weight=0.5, perceptual_network=str(tmp_path / "features.pt")), SHAPE, 0)
    loss, parts = a.per_sample_loss(a.network, batch())
    assert loss.shape == (3,) and (parts["perceptual"] > 0).all()
    stepper = DPStepper(a.network, torch.optim.Adam(a.network.parameters()), 1, noise_multiplier=1.0, max_grad_norm=1.0,
                        sample_rate=0.5, n_train=6, accountant="rdp", grad_sample_mode="functorch")
    loss, _ = a.per_sample_loss(stepper.module, batch())
    stepper.backward(loss)
    stepper.microbatch_done(last=True)  # the frozen feature net is fine under DP
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_adapter(small(perceptual_weight=0.5, perceptual_network=str(tmp_path / "nope.pt")), SHAPE, 0)


def test_adversarial_term_trains_its_discriminator_non_dp():
    a = build_adapter(small(adversarial_weight=0.1, discriminator_channels=4, discriminator_layers=1), SHAPE, 0)
    stepper = Stepper(a.network, torch.optim.Adam(a.network.parameters()), 1)
    d_before = {k: v.clone() for k, v in a.adversarial.discriminator.state_dict().items()}
    loss, parts = a.per_sample_loss(stepper.module, batch())
    assert "adversarial" in parts
    stepper.backward(loss)
    stepper.microbatch_done(last=True)
    a.after_step(1)
    changed = [k for k, v in a.adversarial.discriminator.state_dict().items() if not torch.equal(v, d_before[k])]
    assert changed
    restored = build_adapter(small(adversarial_weight=0.1, discriminator_channels=4, discriminator_layers=1), SHAPE, 0)
    restored.load_aux_state(a.aux_state())
    assert all(torch.equal(v, restored.adversarial.discriminator.state_dict()[k])
               for k, v in a.adversarial.discriminator.state_dict().items())


def _sweep(model, dp):
    return {"name": "x", "stages": [{"name": "ae", "model": model, "dp": dp}]}


def test_dp_refuses_adversarial_loss_and_ema_codebook():
    with pytest.raises(ConfigError, match="adversarial_weight: the discriminator would learn from the private images"):
        parse_sweep(_sweep({"kind": "beta_vae", "adversarial_weight": 0.1}, {"enabled": True, "noise_multiplier": 1}))
    with pytest.raises(ConfigError, match="codebook: `ema` updates the codebook from private data"):
        parse_sweep(_sweep({"kind": "vq_vae", "codebook": "ema"}, {"enabled": True, "noise_multiplier": 1}))
    with pytest.raises(ConfigError, match="perceptual_network"):
        parse_sweep(_sweep({"kind": "beta_vae", "perceptual_weight": 1.0}, {"enabled": False}))
    parse_sweep(_sweep({"kind": "beta_vae", "adversarial_weight": 0.1}, {"enabled": False}))  # fine without DP
