"""`downsample: in_plane` (models/inplane.py): compression models keep depth (13 x 96 x 96 ->
13 x 24 x 24 at 4x, as the reference paper), the LDM's strided layers never mix slices, and
DP-SGD's per-sample gradients stay exact in every mode on the rewritten layers."""
import pytest
import torch
from torch import nn

from models import build_adapter
from models.ldm import FrozenCompression
from orchestrator.config import BetaVAEConfig, LDMConfig, VQVAEConfig
from orchestrator.sweep_file import ConfigError, parse_sweep
from tests import test_grad_modes as gm

torch.set_num_threads(1)

KL = dict(channels=[4, 8, 8], latent_channels=1, norm_num_groups=4)
VQ = dict(channels=[4, 8, 8], num_embeddings=16, embedding_dim=2)
UNET = dict(channels=[8, 16, 16], norm_num_groups=4, num_head_channels=4, label_embedding_dim=8,
            num_train_timesteps=50, num_inference_steps=2, label_dropout=0.0)


@pytest.mark.parametrize("cfg", [BetaVAEConfig, VQVAEConfig], ids=["beta_vae", "vq_vae"])
def test_compression_keeps_depth_in_plane_and_halves_it_otherwise(cfg):
    torch.manual_seed(0)
    kw = KL if cfg is BetaVAEConfig else VQ
    x = torch.rand(2, 1, 13, 32, 32)
    for downsample, depth in (("in_plane", 13), ("all", 4)):  # all: 13 padded to 16, then / 4
        a = build_adapter(cfg(downsample=downsample, **kw), (13, 32, 32), 0)
        z = a.encode_latent(x)
        assert tuple(z.shape[2:]) == (depth, 8, 8) == a.latent_shape[1:], downsample
        assert a.decode_latent(z).shape == x.shape
        loss, _ = a.per_sample_loss(a.network, {"image": x})
        assert loss.shape == (2,)


def test_reference_sizes_kl_latent_is_1x13x24x24():
    a = build_adapter(BetaVAEConfig(downsample="in_plane", **KL), (13, 96, 96), 0)
    assert a.latent_shape == (1, 13, 24, 24)
    assert tuple(a.encode_latent(torch.rand(1, 1, 13, 96, 96)).shape[1:]) == (1, 13, 24, 24)


def strided_layers(net):
    return [m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) and tuple(m.stride) != (1, 1, 1)]


def test_ldm_in_plane_runs_on_the_unpadded_13_slice_latent_and_samples():
    torch.manual_seed(0)
    comp = FrozenCompression.from_adapter(build_adapter(BetaVAEConfig(downsample="in_plane", **KL), (13, 32, 32), 0))
    ldm = build_adapter(LDMConfig(downsample="in_plane", **UNET), (13, 32, 32), 2, compression=comp)
    z, spatial = ldm.to_diffusion(torch.rand(2, 1, 13, 32, 32))
    assert tuple(z.shape[2:]) == spatial == (13, 8, 8)  # no depth padding: the UNet never halves it
    assert ldm.sample(torch.rand(2, 2) * 10).shape == (2, 1, 13, 32, 32)
    strided = strided_layers(ldm.network)
    assert len(strided) == 2 and all(m.stride == (1, 2, 2) and m.kernel_size[0] == 1 for m in strided)


@pytest.mark.parametrize("family", ["beta_vae", "vq_vae", "ldm"])
def test_every_strided_layer_keeps_slices_apart(family):
    """A change in slice 3 of a strided layer's input changes slice 3 of its output only."""
    cfg = {"beta_vae": BetaVAEConfig(downsample="in_plane", **KL), "vq_vae": VQVAEConfig(downsample="in_plane", **VQ),
           "ldm": LDMConfig(downsample="in_plane", **UNET)}[family]
    net = build_adapter(cfg, (13, 32, 32), 2).network
    layers = strided_layers(net)
    assert len(layers) == (4 if family == "vq_vae" else 2)  # VQ-VAE: 2 strided convs + 2 transposed
    ups = [m for m in net.modules() if isinstance(m, nn.Upsample)]
    assert all(m.scale_factor == (1.0, 2.0, 2.0) for m in ups) and len(ups) == (0 if family == "vq_vae" else 2)
    for m in layers + ups:
        x = torch.rand(1, getattr(m, "in_channels", 2), 7, 8, 8)
        y = x.clone()
        y[:, :, 3] += 1
        diff = (m(y) - m(x)).abs().amax(dim=(0, 1, 3, 4))
        assert diff.shape[0] == 7 and diff[3] > 0 and diff[torch.arange(7) != 3].max() == 0, m


@pytest.mark.parametrize("family", ["beta_vae", "vq_vae", "ldm"])
def test_dp_per_sample_gradients_are_exact_in_plane(family, monkeypatch):
    """The direct per-sample clipping check of tests/test_grad_modes.py on in-plane networks."""
    base = gm.FAMILIES[family]
    monkeypatch.setitem(gm.FAMILIES, family, base.model_copy(update={"downsample": "in_plane"}))
    net = build_adapter(gm.FAMILIES[family], gm.SHAPE, 2).network
    assert strided_layers(net) and all(m.stride == (1, 2, 2) for m in strided_layers(net))
    gm.check_all_modes(family, 1, list(gm.MODES))


def sweep(*stages):
    return {"name": "t", "data": {"root": "data/x", "labels": ["A"], "shape": [13, 16, 16]}, "stages": list(stages)}


def test_bad_downsample_is_one_line_naming_the_key():
    bad = sweep({"name": "ae", "model": {"kind": "vq_vae", "downsample": "depth"}})
    with pytest.raises(ConfigError) as e:
        parse_sweep(bad)
    msg = str(e.value)
    assert "\n" not in msg and "stages[ae].model.downsample" in msg and "in_plane" in msg, msg


def test_init_from_across_downsampling_modes_is_refused():
    ldm = {"kind": "ldm", "channels": [8, 16], "norm_num_groups": 4}
    bad = sweep({"name": "pre", "model": {**ldm, "downsample": "in_plane"}},
                {"name": "ft", "init_from": "pre", "model": ldm})
    with pytest.raises(ConfigError, match=r"stages\[ft\]\.init_from: .*downsample"):
        parse_sweep(bad)
    parse_sweep(sweep({"name": "pre", "model": ldm}, {"name": "ft", "init_from": "pre", "model": ldm}))


def test_paper_sweep_compresses_in_plane_as_the_reference():
    from orchestrator.sweep_file import load_sweep
    from tests.test_config import ROOT

    cfg = load_sweep(ROOT / "sweeps" / "paper.yaml")
    stages = {s.name: s for s in cfg.stages}
    kl = build_adapter(stages["beta_vae"].model, cfg.data.shape, len(cfg.data.labels))
    assert kl.latent_shape == (1, 13, 24, 24)
    assert all(s.model.downsample == "in_plane" for s in cfg.stages)
