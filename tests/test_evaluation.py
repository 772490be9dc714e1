"""Evaluation metrics (trainers.evaluation) and feature networks (trainers.features)."""
import numpy as np
import pytest
import torch
from monai.metrics import MMDMetric, MultiScaleSSIMMetric
from scipy import ndimage
from torch import nn

from trainers.phantoms import LABELS, synthesize
from trainers import features
from trainers.data import read_sample
from trainers.evaluation import (control_scores, frechet_distance, frechet_distance_from_stats, generation_metrics,
                                 mmd, ms_ssim_diversity, ms_ssim_settings, reconstruction_metrics)
from trainers.features import load_feature_extractor, load_label_measurer


def phantoms(root, n, shape=(13, 48, 48), seed=0, variant="private"):
    """All samples of a fresh phantom set: volumes (n, 1, D, H, W) and labels (n, 6)."""
    synthesize(root, n, shape, seed, variant)
    paths = [p for split in ("training", "validation", "testing") for p in np.load(root / f"{split}.npy")]
    pairs = [read_sample(root / p) for p in paths]
    return torch.from_numpy(np.stack([a for a, _ in pairs]))[:, None], np.stack([b for _, b in pairs])


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return phantoms(tmp_path_factory.mktemp("real"), 48, seed=0)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    return phantoms(tmp_path_factory.mktemp("other"), 48, seed=1)


# --------------------------------------------------------------------------- Frechet distance
def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.2, 3.0, 5), rng.uniform(0.2, 3.0, 5)
    analytic = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(analytic, rel=1e-9)
    # From samples of two Gaussians with full covariances: the estimate converges to the stats value.
    a1, a2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    c1, c2 = a1 @ a1.T + np.eye(5), a2 @ a2.T + np.eye(5)
    x = rng.multivariate_normal(mu1, c1, 40_000)
    y = rng.multivariate_normal(mu2, c2, 40_000)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance_from_stats(mu1, c1, mu2, c2), rel=0.03)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # Fewer samples than features: singular covariances still give a finite, non-negative value.
    few = rng.normal(size=(6, 20))
    assert 0.0 <= frechet_distance(few, few + 1.0) < np.inf
    assert frechet_distance(few, few + 1.0) == pytest.approx(20.0, rel=1e-3)   # only the means differ
    assert np.isnan(frechet_distance(few[:1], few))


# --------------------------------------------------------------------------- MMD, MS-SSIM
def test_mmd_is_monai_mmd():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 1, 8, 16, 16, generator=g), torch.rand(6, 1, 8, 16, 16, generator=g) * 0.8
    expected = float(MMDMetric()(x.double(), y.double()))
    assert mmd(x, y) == pytest.approx(expected, rel=1e-9)
    assert mmd(x, y) == pytest.approx(float(MMDMetric()(x, y)), rel=1e-3)   # MONAI in float32
    assert mmd(x, y[:4]) == pytest.approx(float(MMDMetric()(x[:4].double(), y[:4].double())), rel=1e-9)
    assert mmd(x, y) > mmd(x, torch.rand(6, 1, 8, 16, 16, generator=g))   # darker set is further away
    assert np.isnan(mmd(x[:1], y[:1]))


def test_ms_ssim_diversity_is_monai_ms_ssim_on_neighbouring_pairs():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 1, 13, 32, 32, generator=g)
    gen = (base + 0.3 * torch.rand(5, 1, 13, 32, 32, generator=g)).clamp(0, 1)
    settings = ms_ssim_settings((13, 32, 32))
    assert settings["spatial_dims"] == 2 and settings["kernel_size"] == 7 and len(settings["weights"]) == 3
    metric = MultiScaleSSIMMetric(**settings, data_range=1.0)
    # One pair, one slice at a time: independent of how the library batches them.
    expected = np.mean([[float(metric(gen[i:i + 1, :, k], gen[i + 1:i + 2, :, k])) for k in range(13)]
                        for i in range(4)])
    assert ms_ssim_diversity(gen) == pytest.approx(expected, rel=1e-5)
    assert ms_ssim_diversity(gen[:1].repeat(3, 1, 1, 1, 1)) == pytest.approx(1.0, abs=1e-5)   # copies: no diversity
    assert ms_ssim_diversity(torch.rand(4, 1, 13, 32, 32, generator=g)) < ms_ssim_diversity(gen)
    assert np.isnan(ms_ssim_diversity(gen[:1]))
    for shape in [(8, 24, 24), (13, 40, 36), (13, 48, 48), (13, 96, 96), (4, 12, 12), (3, 8, 8)]:
        assert 0.0 < ms_ssim_diversity(torch.rand(3, 1, *shape, generator=g)) < 1.0, shape


# --------------------------------------------------------------------------- reconstruction
@pytest.mark.parametrize("shape", [(13, 48, 48), (8, 24, 24), (13, 40, 36), (3, 8, 8)])
def test_reconstruction_metrics_rank_reconstructions(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, *shape, generator=g)
    x = torch.from_numpy(ndimage.gaussian_filter(x.numpy(), (0, 0, 1, 1, 1)))   # some structure for SSIM
    perfect = reconstruction_metrics(x, x)
    assert set(perfect) == {"fidelity/mse", "fidelity/psnr", "fidelity/ssim"}
    assert perfect["fidelity/mse"] == 0.0 and perfect["fidelity/ssim"] == pytest.approx(1.0, abs=1e-4)
    slight = reconstruction_metrics(x, (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1))
    worse = reconstruction_metrics(x, (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1))
    assert 0 < slight["fidelity/mse"] < worse["fidelity/mse"]
    assert slight["fidelity/psnr"] > worse["fidelity/psnr"] > 0
    assert 1.0 > slight["fidelity/ssim"] > worse["fidelity/ssim"]


# --------------------------------------------------------------------------- controllability
def test_control_scores_on_phantoms(real):
    volumes, labels = real
    measurer = load_label_measurer(None, list(LABELS))
    assert measurer.labels == ["LVEDV", "LVESV", "MYOEDTHICK", "MYOESTHICK", "ESED"]   # LVEF needs both phases
    measured = measurer(volumes)
    requested = {n: labels[:, LABELS.index(n)] for n in LABELS}
    es = labels[:, LABELS.index("ESED")] == 1
    assert np.isnan(measured["LVEDV"][es]).all() and np.isfinite(measured["LVEDV"][~es]).all()
    assert np.isnan(measured["LVESV"][~es]).all() and np.isfinite(measured["ESED"]).all()
    good = control_scores(requested, measured)
    assert good["control/LVEDV/r"] > 0.9 and good["control/LVESV/r"] > 0.9
    assert good["control/ed_es_accuracy"] > 0.9 and good["control/r_mean"] > 0.8
    assert good["control/LVEDV/mae"] < 15   # mL
    assert "control/LVEF/r" not in good
    perm = np.random.default_rng(0).permutation(len(labels))
    shuffled = control_scores({n: v[perm] for n, v in requested.items()}, measured)
    assert abs(shuffled["control/LVEDV/r"]) < 0.4 and abs(shuffled["control/LVESV/r"]) < 0.4
    assert shuffled["control/LVEDV/mae"] > 2 * good["control/LVEDV/mae"]
    assert load_label_measurer(None, ["AGE", "LVEF"]) is None


def test_control_scores_edge_cases():
    s = control_scores({"A": np.array([1.0, 2.0, np.nan, 4.0]), "B": np.array([1.0, 2.0]), "ESED": np.array([0.0, 1.0, 1.0])},
                       {"A": np.array([2.0, 4.0, 5.0, 8.0]), "B": np.array([1.0, 2.0]), "ESED": np.array([0.2, 0.9, 0.4])})
    assert s["control/A/r"] == pytest.approx(1.0) and s["control/A/mae"] == pytest.approx(7 / 3)
    assert np.isnan(s["control/B/r"]) and s["control/B/mae"] == 0.0   # < 3 pairs: no correlation
    assert s["control/ed_es_accuracy"] == pytest.approx(2 / 3)
    assert s["control/r_mean"] == pytest.approx(np.mean([1.0, s["control/ESED/r"]]))


# --------------------------------------------------------------------------- built-in extractor
def test_shipped_extractor_separates_real_from_degraded_volumes(real, other):
    state = torch.load(features.ASSET, map_location="cpu", weights_only=True)   # plain tensors only
    assert features.ASSET.stat().st_size < 1024**2 and isinstance(state, dict)
    ext = load_feature_extractor(None)
    assert ext.name == "phantom3d"
    x, y = real[0], other[0]
    for shape in [(13, 32, 32), (13, 40, 36), (13, 96, 96), (8, 24, 24)]:
        f = ext(torch.rand(3, 1, *shape))
        assert f.shape == (3, 120) and f.dtype == np.float64 and np.isfinite(f).all()
    fx = ext(x)
    assert np.allclose(ext(x[:, 0].numpy()), fx, atol=1e-5)   # (B, D, H, W) arrays are accepted too
    fd_real = frechet_distance(fx, ext(y))
    blurred = torch.from_numpy(ndimage.gaussian_filter(y.numpy(), (0, 0, 0, 2, 2)))
    noisy = (y + 0.05 * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    fd_blur, fd_noisy = frechet_distance(fx, ext(blurred)), frechet_distance(fx, ext(noisy))
    fd_noise = frechet_distance(fx, ext(torch.rand_like(y)))
    # Blur and added noise move it too (the shallow-stage features), not only pure noise.
    assert fd_blur > 5 * fd_real and fd_noisy > 3 * fd_real and fd_noise > 20 * fd_real, (fd_real, fd_blur, fd_noisy, fd_noise)
    m = generation_metrics(x, y, ext)
    assert set(m) == {"fidelity/fd", "fidelity/mmd", "fidelity/ms_ssim_diversity"}
    assert m["fidelity/fd"] == pytest.approx(fd_real)
    assert 0 < m["fidelity/ms_ssim_diversity"] < 1


def test_extractor_training_cli_quick(tmp_path):
    out = tmp_path / "enc.pt"
    assert features.main(["--train", "--quick", "--out", str(out)]) == 0
    net = features.load_phantom_encoder(out)
    assert net.predict_labels(torch.rand(2, 1, 8, 24, 24)).shape == (2, len(LABELS))
    assert not torch.equal(net.label_std, torch.ones(len(LABELS)))   # standardisation is stored
    assert not torch.equal(net.feature_std, torch.ones_like(net.feature_std))
    assert features.main(["--train", "--quick", "--out", str(tmp_path / "again.pt")]) == 0
    first, again = (torch.load(p, weights_only=True) for p in (out, tmp_path / "again.pt"))
    assert all(torch.equal(first[k], again[k]) for k in first)   # seeded: the same weights every run


# --------------------------------------------------------------------------- TorchScript networks
class Slice2D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        assert x.shape[1] == 3
        return self.conv(x).mean(dim=(2, 3))


class Regressor(nn.Module):
    def forward(self, x):   # (B, 1, D, H, W) -> (B, 2): "LVEDV" = 100 * mean, "AGE" = max
        flat = x.flatten(1)
        return torch.stack([100 * flat.mean(1), flat.amax(1)], dim=1)


def test_torchscript_networks_load_in_every_mode(tmp_path):
    torch.manual_seed(0)
    net3d = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.AdaptiveAvgPool3d(1), nn.Flatten())
    torch.jit.script(net3d).save(str(tmp_path / "f3d.pt"))
    net2d = Slice2D()
    torch.jit.script(net2d).save(str(tmp_path / "f2d.pt"))
    torch.jit.script(Regressor()).save(str(tmp_path / "reg.pt"))
    x = torch.rand(3, 1, 13, 20, 20)

    vol = load_feature_extractor(str(tmp_path / "f3d.pt"), mode="volume")
    with torch.no_grad():
        assert np.allclose(vol(x), net3d(x).numpy(), atol=1e-6)

    sl = load_feature_extractor(str(tmp_path / "f2d.pt"), mode="slices", slices=[4, 6], size=32)
    with torch.no_grad():
        per_slice = [net2d(nn.functional.interpolate(x[:, :, k], size=(32, 32), mode="bilinear").repeat(1, 3, 1, 1))
                     for k in (4, 6)]
    assert sl(x).shape == (3, 4) and np.allclose(sl(x), ((per_slice[0] + per_slice[1]) / 2).numpy(), atol=1e-6)
    default = load_feature_extractor(str(tmp_path / "f2d.pt"), mode="slices", size=16)
    assert features.default_slices(13) == [3, 4, 5, 6, 7, 8, 9] and default(x).shape == (3, 4)
    with pytest.raises(ValueError, match="do not fit"):
        load_feature_extractor(str(tmp_path / "f2d.pt"), mode="slices", slices=[13])(x)

    measurer = load_label_measurer(str(tmp_path / "reg.pt"), ["LVEDV", "ESED"], outputs=["LVEDV", "AGE"])
    got = measurer(x)
    assert list(got) == ["LVEDV"] and np.allclose(got["LVEDV"], 100 * x.flatten(1).mean(1).numpy(), rtol=1e-5)
    assert load_label_measurer(str(tmp_path / "reg.pt"), ["ESED"], outputs=["LVEDV", "AGE"]) is None
    with pytest.raises(ValueError, match="outputs"):
        load_label_measurer(str(tmp_path / "reg.pt"), ["LVEDV"])
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_feature_extractor(str(tmp_path / "missing.pt"))
    torch.save({"w": torch.zeros(1)}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="TorchScript"):
        load_feature_extractor(str(tmp_path / "state.pt"))
