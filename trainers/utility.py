"""Downstream utility: train on synthetic, test on real (as DPImageBench does for 2D images).

A small 3D regressor (`LabelNet`: three strided convolutions, global pooling, one linear
output per label) learns volume -> labels from the generated volumes and the labels they
were drawn with, and is scored on the real test volumes: `utility/<LABEL>/r`, `/mae`,
`utility/r_mean` and `utility/ed_es_accuracy` (ESED rounded to 0/1), the names of the
control scores (trainers.evaluation.control_scores). Beside it, the same network trained the
same way on as many REAL training volumes (`utility_real/...`): the reference a generator's
utility is read against. Equal counts, so the comparison is between data, not data sizes.

What it reuses: the volumes the evaluation already generated with the test volumes' labels,
so no second sampling pass; the regressor therefore sees the test split's label values
(never its images) paired with synthetic volumes. Targets are standardised with the
statistics of the labels each regressor trains on (evaluation only, nothing is released).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from trainers.evaluation import control_scores


class LabelNet(nn.Module):
    """Volume [B, 1, D, H, W] -> one value per label. In-plane strides first: the thin depth
    axis (13 slices) is halved once, at the end."""

    def __init__(self, n_labels: int, width: int = 8):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv3d(1, w, 3, stride=(1, 2, 2), padding=1), nn.GroupNorm(4, w), nn.SiLU(),
            nn.Conv3d(w, 2 * w, 3, stride=(1, 2, 2), padding=1), nn.GroupNorm(4, 2 * w), nn.SiLU(),
            nn.Conv3d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(4, 4 * w), nn.SiLU(),
        )
        self.head = nn.Linear(4 * w, n_labels)

    def forward(self, x):
        # Above 32 px in-plane, average 2 x 2 pixels first: a quarter of the convolution work
        # (measured on 2 shared cores: 0.2 s a step at 48 x 48 without it), and label-sized structures survive.
        if min(x.shape[-2:]) > 32:
            x = F.avg_pool3d(x, (1, 2, 2))
        return self.head(self.features(x).mean(dim=(2, 3, 4)))


def fit(images: torch.Tensor, labels: np.ndarray, *, steps: int, lr: float = 3e-3, batch: int = 16,
        seed: int = 0) -> tuple[LabelNet, np.ndarray, np.ndarray]:
    """A LabelNet fitted to (images [N, 1, D, H, W], labels [N, L] with NaN = unknown) by Adam on
    the masked MSE of standardised targets; returns (net, mean, std) of the targets."""
    with torch.enable_grad():  # the evaluation around it runs under no_grad
        return _fit(images, labels, steps=steps, lr=lr, batch=batch, seed=seed)


def _fit(images, labels, *, steps, lr, batch, seed):
    torch.manual_seed(seed)
    y = torch.as_tensor(labels, dtype=torch.float32)
    known = ~torch.isnan(y)
    mean = torch.nanmean(y, 0).nan_to_num(0.0)
    std = torch.sqrt(torch.nanmean((y - mean) ** 2, 0)).nan_to_num(1.0).clamp(min=1e-6)
    target = ((y - mean) / std).nan_to_num(0.0)
    net = LabelNet(y.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(images), (min(batch, len(images)),), generator=g)
        err = (net(images[i]) - target[i]) ** 2
        loss = (err * known[i]).sum() / known[i].sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval(), mean.numpy(), std.numpy()


@torch.no_grad()
def predict(model: tuple[LabelNet, np.ndarray, np.ndarray], images: torch.Tensor) -> np.ndarray:
    net, mean, std = model
    return torch.cat([net(images[i:i + 16]) for i in range(0, len(images), 16)]).numpy() * std + mean


def scores(prefix: str, names, truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """control_scores' numbers under `prefix/` (utility/..., utility_real/...)."""
    out = control_scores({n: truth[..., j] for j, n in enumerate(names)}, {n: pred[..., j] for j, n in enumerate(names)})
    return {prefix + k[len("control"):]: v for k, v in out.items()}


def utility_metrics(gen: torch.Tensor, gen_labels: np.ndarray, test: torch.Tensor, test_labels: np.ndarray,
                    names, *, real_train: torch.Tensor = None, real_train_labels: np.ndarray = None,
                    steps: int = 150, bootstrap: int = 0) -> dict[str, float]:
    """Train on `gen` (with the labels they were drawn with), test on the real `test`; with
    `real_train`, the same for as many real training volumes (`utility_real/...`)."""
    from trainers.uncertainty import scores_intervals

    t0 = time.perf_counter()
    out: dict[str, float] = {}
    runs = [("utility", gen, gen_labels)]
    if real_train is not None and len(real_train):
        n = min(len(gen), len(real_train))
        runs.append(("utility_real", real_train[:n], real_train_labels[:n]))
    for prefix, x, y in runs:
        pred = predict(fit(x.float(), y, steps=steps), test.float())
        got = scores(prefix, names, test_labels, pred)
        out.update(got)
        if bootstrap:
            on_rows = lambda i, p=pred, pre=prefix: scores(pre, names, test_labels[i], p[i])  # noqa: E731
            out.update(scores_intervals(on_rows, len(test), [k for k in got if k.endswith(("/r", "_accuracy", "r_mean"))],
                                        n_resamples=bootstrap))
    out["time/utility_s"] = time.perf_counter() - t0
    return out
