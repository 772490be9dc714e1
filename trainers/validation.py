"""Validation: the mean per-sample loss over a split, and the metric that ranks a trial
when `search.select_on` is `public` (computed on a public dataset) or `dp` (a Gaussian
mechanism on clipped per-sample validation losses, `trainers/privacy.py`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.config import DataConfig
from trainers.data import VolumeDataset, collate, validate_dataset
from trainers.privacy import noisy_selection_mean
from trainers.trial_eval import evaluate_trial


def all_sum(values: list[float], world_size: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def mean_losses(adapter, net, dataset, indices, device, batch_size, world_size, clip=None, raw=False):
    """Mean per-sample loss (and components) over this rank's shard, summed over ranks.
    `clip`: each per-sample value is clipped to [0, clip] first (the DP selection metric);
    `raw`: return (sums, count) instead of means."""
    net.eval()
    sums: dict[str, float] = {}
    n = 0
    # The same latent-sampling noise at every evaluation, so val/loss curves are comparable;
    # fork_rng leaves the training RNG stream untouched.
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        for start in range(0, len(indices), batch_size):
            batch = collate(dataset, indices[start:start + batch_size], device)
            loss, parts = adapter.per_sample_loss(net, batch)
            for k, v in {"loss": loss, **parts}.items():
                v = v.detach().double()
                sums[k] = sums.get(k, 0.0) + float((v if clip is None else v.clamp(0.0, clip)).sum())
            n += len(loss)
    net.train()
    keys = ["loss", *adapter.components]  # fixed order: every rank all-reduces the same list
    totals = all_sum([sums.get(k, 0.0) for k in keys] + [n], world_size)
    if raw:
        return dict(zip(keys, totals[:-1])), totals[-1]
    count = max(totals[-1], 1.0)
    return {k: v / count for k, v in zip(keys, totals[:-1])}


def selection_metrics(select: dict, adapter, net, stage, val_set, val_idx, device, pbs, rank, world) -> dict:
    """The metric that ranks this trial when `search.select_on` is not `private`, as
    `select/<metric>` (computed once, after the last epoch, from the final weights).

    public: the metric on a public dataset's validation split (val/...) or test split.
    dp: a Gaussian mechanism on the clipped per-sample validation losses (privacy.py)."""
    metric = select["metric"]
    if select["on"] == "dp":
        sums, count = mean_losses(adapter, net, val_set, val_idx, device, pbs, world, clip=select["clip"], raw=True)
        if rank != 0:
            return {}
        key = metric.removeprefix("val/")
        # With unit subject the sensitivity of the clipped sum is a whole subject's losses:
        # `group` = the most validation volumes one subject has, times the clip bound.
        group = int(select.get("group", 1))
        value = noisy_selection_mean(sums[key], count, clip=select["clip"] * group,
                                     noise_multiplier=select["noise_multiplier"])
        return {f"select/{metric}": value, "select.noise_multiplier": select["noise_multiplier"],
                "select.clip": select["clip"], "select.n": count, "select.group": group}
    data = DataConfig.model_validate(select["data"])
    index = validate_dataset(data.root, data.labels, tuple(data.shape), allow_pickle=data.allow_pickle,
                             cache_dir=select.get("cache_dir"))
    if metric.startswith("val/"):
        public_val = VolumeDataset(index.splits["validation"], len(data.labels), allow_pickle=data.allow_pickle)
        val = mean_losses(adapter, net, public_val, np.arange(rank, len(public_val), world), device, pbs, world)
        return {f"select/val/{k}": v for k, v in val.items()} if rank == 0 else {}
    if rank != 0:
        return {}
    public_test = VolumeDataset(index.splits["testing"], len(data.labels), allow_pickle=data.allow_pickle,
                                preload=False)
    return {f"select/{k}": v for k, v in evaluate_trial(adapter, stage, data, public_test, device, pbs).items()
            if k.startswith(("fidelity/", "control/"))}
