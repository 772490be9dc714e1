"""The end-of-trial evaluation on the test split (rank 0, after the last epoch).

Compression models: reconstruction MSE / PSNR / SSIM of `eval.n_samples` test volumes.
Generators: as many volumes generated with those test volumes' labels, scored against
them (Frechet distance in the configured feature space, MMD, MS-SSIM diversity), and the
labels measured back on the generated volumes (controllability: Pearson r and MAE per
label, end-diastole/end-systole accuracy), and the downstream utility of the generated
volumes (trainers/utility.py: train on synthetic, test on real). Compression models also log
`fidelity/recon_fd`, the FD of the test volumes against their own reconstructions: the
floor for a generator decoding through them; a latent generator logs the same floors on its
own test volumes through its frozen compression model (`fidelity/recon_fd`, and
`control/recon_r_mean`, `control/recon_ed_es_accuracy`, `control/recon_<LABEL>/r`). With `eval.bootstrap`, 95% intervals
(`<metric>_ci_low` / `_ci_high`, trainers/uncertainty.py). Metric names: `fidelity/...`,
`control/...`, `utility/...`, `utility_real/...`, `time/eval_s`.

The test split may be private. These numbers are what the researcher reads, like
`val/loss`; choosing a trial by them is a release that the tuning cost in the privacy
ledger accounts for (orchestrator/ledger.py).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from models import GENERATOR_FAMILIES
from orchestrator.config import DataConfig, StageConfig
from trainers.evaluation import control_scores, frechet_distance, generation_metrics, reconstruction_metrics
from trainers.features import load_feature_extractor, load_label_measurer
from trainers.uncertainty import fd_interval, scores_intervals
from trainers.utility import utility_metrics

EVAL_SEED = 4321


def _test_batch(test_set, n: int):
    items = [test_set[i] for i in range(min(n, len(test_set)))]
    stack = lambda k: torch.stack([it[k] for it in items])  # noqa: E731
    return stack("image"), stack("labels"), stack("label_mask")


def _reconstruction_floor(model, real, device, chunk: int, extractor, bootstrap: int) -> tuple[torch.Tensor, dict]:
    """(decode(encode(real)) in [0, 1], {"fidelity/recon_fd" (+ interval)}): the floor a
    generator decoding through `model` (a compression adapter or a frozen copy) can reach,
    the FD of the test volumes against their own reconstructions at the same sample count."""
    recon = torch.cat([model.decode_latent(model.encode_latent(real[i:i + chunk].to(device))).cpu()
                       for i in range(0, len(real), chunk)]).clamp(0, 1)
    f_real, f_recon = extractor(real), extractor(recon)
    out = {"fidelity/recon_fd": frechet_distance(f_real, f_recon)}
    if bootstrap:
        out.update(fd_interval(f_real, f_recon, n_resamples=bootstrap, name="fidelity/recon_fd"))
    return recon, out


@torch.no_grad()
def evaluate_trial(adapter, stage: StageConfig, data: DataConfig, test_set, device, chunk: int,
                   train_set=None) -> dict:
    cfg = stage.eval
    t0 = time.perf_counter()
    real, labels, mask = _test_batch(test_set, cfg.n_samples)
    metrics: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EVAL_SEED)
        if stage.model.kind in GENERATOR_FAMILIES:
            gen = torch.Generator().manual_seed(EVAL_SEED)
            fakes = [adapter.sample(labels[i:i + chunk].to(device), mask[i:i + chunk].to(device), generator=gen,
                                    num_inference_steps=cfg.sampling_steps).cpu()
                     for i in range(0, len(real), chunk)]
            fake = torch.cat(fakes).clamp(0, 1)
            extractor = load_feature_extractor(cfg.feature_network, cfg.feature_mode, cfg.slices, device="cpu")
            metrics.update(generation_metrics(real, fake, extractor, bootstrap=cfg.bootstrap))
            compression = getattr(adapter, "compression", None)
            recon = None
            if compression is not None:
                # The floors on THESE test volumes: what decoding through the frozen compression
                # model allows (FD against their own reconstructions, controllability of them).
                recon, floor = _reconstruction_floor(compression, real, device, chunk, extractor, cfg.bootstrap)
                metrics.update(floor)
            measurer = load_label_measurer(cfg.label_network, list(data.labels), cfg.label_network_outputs)
            if measurer is not None:
                measured = measurer(fake)
                lab = labels.numpy().astype(np.float64)
                lab[~mask.numpy()] = np.nan
                requested = {name: lab[:, j] for j, name in enumerate(data.labels) if name in measured}
                scores = control_scores(requested, measured)
                metrics.update(scores)
                if recon is not None:
                    floor = control_scores(requested, measurer(recon))
                    metrics.update({k.replace("control/", "control/recon_", 1): v for k, v in floor.items()
                                    if k in ("control/r_mean", "control/ed_es_accuracy") or k.endswith("/r")})
                if cfg.bootstrap:
                    on_rows = lambda i: control_scores({k: v[i] for k, v in requested.items()},  # noqa: E731
                                                       {k: np.asarray(measured[k])[i] for k in requested})
                    metrics.update(scores_intervals(on_rows, len(fake), list(scores), n_resamples=cfg.bootstrap))
            if cfg.utility and data.labels:
                lab = labels.numpy().astype(np.float64)
                lab[~mask.numpy()] = np.nan
                ref, ref_lab = None, None
                if train_set is not None and len(train_set):
                    ref, ref_labels, ref_mask = _test_batch(train_set, len(fake))
                    ref_lab = ref_labels.numpy().astype(np.float64)
                    ref_lab[~ref_mask.numpy()] = np.nan
                metrics.update(utility_metrics(fake, lab, real, lab, list(data.labels), real_train=ref,
                                               real_train_labels=ref_lab, steps=cfg.utility_steps,
                                               bootstrap=cfg.bootstrap))
        else:
            extractor = load_feature_extractor(cfg.feature_network, cfg.feature_mode, cfg.slices, device="cpu")
            recon, floor = _reconstruction_floor(adapter, real, device, chunk, extractor, cfg.bootstrap)
            metrics.update(reconstruction_metrics(real, recon))
            metrics.update(floor)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["time/eval_s"] = time.perf_counter() - t0
    metrics["eval/n_samples"] = float(len(real))
    return metrics
