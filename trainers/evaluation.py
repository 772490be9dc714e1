"""Evaluation metrics: pure functions of volumes (B, 1, D, H, W) in [0, 1].

Metric names are a contract (MLflow keys, the report): ``fidelity/mse``, ``fidelity/psnr``,
``fidelity/ssim`` (compression models), ``fidelity/fd``, ``fidelity/mmd``,
``fidelity/ms_ssim_diversity`` (generators) and ``control/<LABEL>/r``, ``control/<LABEL>/mae``,
``control/r_mean``, ``control/ed_es_accuracy`` (label-conditioned generators).

MONAI computes PSNR, SSIM, MMD and MS-SSIM. The Frechet distance is written here although
MONAI's FIDMetric computes the same formula: with fewer samples than features (32 volumes,
120 features) its sqrtm has an imaginary part large enough that FIDMetric raises
ValueError in about 1 case in 10 (measured), which would fail a trial at its very end; here
the real part is kept and the result clamped at 0. Control scores are written here too.
Feature networks and label measurers live in ``trainers.features``.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import MMDMetric, MultiScaleSSIMMetric, PSNRMetric, SSIMMetric
from scipy import linalg

from trainers.features import as_volumes, load_feature_extractor

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)   # Wang et al. 2003, 5 scales


def _odd_at_most(n: int, cap: int) -> int:
    k = min(int(n), cap)
    return max(1, k if k % 2 else k - 1)


def ssim_kernel(shape, cap: int = 7) -> tuple[int, ...]:
    """SSIM window per axis: ``cap`` (7), shrunk to the largest odd size that fits the axis
    (13 -> 7, 8 -> 7, 5 -> 5, 4 -> 3), so thin stacks still have a valid window."""
    return tuple(_odd_at_most(s, cap) for s in shape)


# --------------------------------------------------------------------------- reconstruction
@torch.no_grad()
def reconstruction_metrics(real, recon) -> dict[str, float]:
    """Batch means of MSE, PSNR (max 1; inf for a perfect reconstruction) and 3D SSIM."""
    x, y = as_volumes(real), as_volumes(recon)
    if x.shape != y.shape:
        raise ValueError(f"real {tuple(x.shape)} and recon {tuple(y.shape)} differ; expected the same shape")
    mse = ((x - y) ** 2).flatten(1).mean(1)
    psnr = PSNRMetric(max_val=1.0)(y, x)
    ssim = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=ssim_kernel(x.shape[2:]))(y, x)
    return {"fidelity/mse": float(mse.mean()), "fidelity/psnr": float(psnr.mean()),
            "fidelity/ssim": float(ssim.mean())}


# --------------------------------------------------------------------------- Frechet distance
def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    When S1 S2 is singular (fewer samples than features) sqrtm can return inf/NaN: then eps
    is added to both diagonals, as in the reference FID code (pytorch-fid). The imaginary part
    of the root is numerical noise and dropped; tiny negative totals are clamped to 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # sqrtm warns on singular products; handled below
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


def frechet_distance(f_real: np.ndarray, f_gen: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, F) and (M, F);
    NaN when either has fewer than 2 rows (no covariance)."""
    a, b = np.asarray(f_real, np.float64), np.asarray(f_gen, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features {a.shape} and {b.shape}; expected (N, F) and (M, F) with the same F")
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


# --------------------------------------------------------------------------- MMD, diversity
@torch.no_grad()
def mmd(real, gen) -> float:
    """MONAI's unbiased MMD (linear kernel on the flattened volumes) between two batches.

    MONAI requires equal batch sizes; with unequal ones the larger batch is truncated to the
    smaller (the first samples). NaN when either has fewer than 2 samples.
    """
    x, y = as_volumes(real), as_volumes(gen)
    if x.shape[2:] != y.shape[2:]:
        raise ValueError(f"real {tuple(x.shape)} and gen {tuple(y.shape)}; expected the same volume shape")
    n = min(len(x), len(y))
    if n < 2:
        return float("nan")
    # float64: the kernel sums are large (thousands of voxels) and cancel.
    return float(MMDMetric()(x[:n].double(), y[:n].double()))


def ms_ssim_settings(shape) -> dict:
    """MS-SSIM setup for volumes of ``shape`` (D, H, W): always 2D, slice by slice.

    Why 2D: a stack has 8-13 thick slices (8 mm vs 1.8-3.6 mm in-plane); 3D MS-SSIM would
    halve the depth at every scale (13 -> 6 -> 3) and fit no useful window, and one rule for
    every depth keeps values comparable across studies. In-plane, MONAI needs
    min(H, W) // (scales-1)^2 >= kernel; we take the most scales (<= 5) for which a kernel of
    at least 5 fits, the kernel as large as fits up to 7 (sigma 1.5), and the first
    ``scales`` standard weights renormalised to sum to 1. E.g. 24 -> 3 scales, kernel 5;
    32 -> 3, 7; 48 -> 4, 5; 96 -> 5, 5; 16 -> 2, 5. Below 10 px: one scale (plain SSIM).
    """
    m = int(min(shape[-2:]))
    for scales in (5, 4, 3, 2):
        # The coarsest scale is m // 2^(scales-1) px and must hold the kernel; MONAI's own
        # check divides by (scales-1)^2 instead (stricter at 4 scales), so satisfy both.
        fit = m // max(2 ** (scales - 1), (scales - 1) ** 2)
        k = _odd_at_most(fit, 7)
        if k >= 5 and fit >= k:
            break
    else:
        scales, k = 1, _odd_at_most(m, 7)
    w = np.asarray(MS_SSIM_WEIGHTS[:scales])
    return {"spatial_dims": 2, "kernel_size": k, "weights": tuple(float(v) for v in w / w.sum())}


@torch.no_grad()
def ms_ssim_diversity(gen) -> float:
    """Mean MS-SSIM between neighbouring generated samples (i, i+1), averaged over depth
    slices and pairs (see ``ms_ssim_settings``). Lower = more diverse. NaN for < 2 samples.
    Samples must be in independent (random) order, as drawn."""
    x = as_volumes(gen)
    if len(x) < 2:
        return float("nan")
    d, h, w = x.shape[2:]
    a = x[:-1].reshape(-1, 1, h, w)   # (pairs * D, 1, H, W): every slice of every pair
    b = x[1:].reshape(-1, 1, h, w)
    metric = MultiScaleSSIMMetric(data_range=1.0, **ms_ssim_settings((d, h, w)))
    return float(metric(a, b).mean())


# --------------------------------------------------------------------------- generators
def generation_metrics(real, gen, extractor=None, bootstrap: int = 0) -> dict[str, float]:
    """Frechet distance in the extractor's features (None: the built-in phantom3d), MMD and
    MS-SSIM diversity of ``gen`` against ``real`` test volumes; with ``bootstrap`` resamples,
    95% intervals of FD and MMD too (``fidelity/fd_ci_low`` ..., trainers/uncertainty.py)."""
    from trainers.uncertainty import fidelity_intervals

    extractor = extractor or default_extractor()
    f_real, f_gen = extractor(real), extractor(gen)
    out = {"fidelity/fd": frechet_distance(f_real, f_gen),
           "fidelity/mmd": mmd(real, gen),
           "fidelity/ms_ssim_diversity": ms_ssim_diversity(gen)}
    if bootstrap:
        out.update(fidelity_intervals(f_real, f_gen, real, gen, n_resamples=bootstrap))
    return out


_DEFAULT = []


def default_extractor():
    """The built-in phantom3d extractor, loaded once per process."""
    if not _DEFAULT:
        _DEFAULT.append(load_feature_extractor(None))
    return _DEFAULT[0]


# --------------------------------------------------------------------------- controllability
def control_scores(requested: dict, measured: dict) -> dict:
    """How well generated volumes follow the labels they were drawn with.

    For every label in both dicts (arrays of the same length): Pearson r and MAE over the
    pairs where both values are finite (r is NaN with < 3 pairs or zero variance),
    ``control/r_mean`` over the finite r, and ``control/ed_es_accuracy`` when ESED is in both
    (requested and measured phase rounded to 0/1).

    Arrays of shape (..., n) score every leading index at once (the bootstrap's resamples,
    trainers/uncertainty.py): each score is then an array of shape (...), not a float.
    """
    out: dict = {}
    rs = []
    for name in [n for n in requested if n in measured]:
        q = np.asarray(requested[name], np.float64)
        m = np.asarray(measured[name], np.float64)
        if q.ndim <= 1 or m.ndim <= 1:
            q, m = q.ravel(), m.ravel()
        if q.shape != m.shape:
            raise ValueError(f"{name}: {q.size} requested vs {m.size} measured values; expected one per volume")
        ok = np.isfinite(q) & np.isfinite(m)
        count = ok.sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            dq = np.where(ok, q - (np.where(ok, q, 0).sum(-1) / count)[..., None], 0)
            dm = np.where(ok, m - (np.where(ok, m, 0).sum(-1) / count)[..., None], 0)
            sqq, smm = (dq * dq).sum(-1), (dm * dm).sum(-1)
            r = np.where((count >= 3) & (sqq > 0) & (smm > 0),
                         np.clip((dq * dm).sum(-1) / np.sqrt(sqq * smm), -1, 1), np.nan)
            mae = np.where(count > 0, np.where(ok, np.abs(q - m), 0).sum(-1) / count, np.nan)
            if name == "ESED":
                hit = ok & (np.round(np.where(ok, q, 0)) == np.round(np.where(ok, m, 0)))
                accuracy = np.where(count > 0, hit.sum(-1) / count, np.nan)
        rs.append(r)
        out[f"control/{name}/r"] = _scalar(r)
        out[f"control/{name}/mae"] = _scalar(mae)
        if name == "ESED":
            out["control/ed_es_accuracy"] = _scalar(accuracy)
    if rs:
        stacked = np.stack(rs)
        finite = np.isfinite(stacked)
        n_finite = finite.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            r_mean = np.where(n_finite > 0, np.where(finite, stacked, 0).sum(0) / n_finite, np.nan)
    else:
        r_mean = np.nan
    out["control/r_mean"] = _scalar(r_mean)
    return out


def _scalar(x):
    """A 0-d result as a float (one set of scores), a batch of them as an array."""
    x = np.asarray(x, np.float64)
    return float(x) if x.ndim == 0 else x
