"""How one trial trains: the one training loop, run by every Ray Train worker.

Every model family goes through this loop; a family differs only in its adapter
(`models/`). DP or not differs only in the stepper (`trainers/privacy.py`).

    for each epoch:
        for each sampling event (a Poisson batch in DP mode, a shuffled batch otherwise):
            split the local batch into physical micro-batches
            per-sample loss -> backward -> (clip + accumulate) ... -> (noise) -> step
        validation loss on the validation split (all ranks)
        ray.train.report(metrics, checkpoint with model, optimizer and accountant state)
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import ray.train
import ray.train.torch

from models import GENERATOR_FAMILIES, build_adapter
from orchestrator.config import DataConfig, StageConfig
from trainers.checkpoints import CHECKPOINT_FILE, adapter_from_record, compression_record, load_state
from trainers.data import VolumeDataset, validate_dataset
from trainers.generators import freeze_all_but_attention, resolve_latent_scale, write_sample_grid
from trainers.trial_eval import evaluate_trial
from trainers.privacy import (PoissonSampler, make_dp_stepper, noisy_selection_mean, plan_privacy, ShuffleSampler,
                              Stepper)


class WeightEMA:
    """Exponential moving average of the weights (buffers copied), for sampling."""

    def __init__(self, net: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in net.state_dict().items()}

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}


REPLAY_KEY = "replay_history"


def _loggable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items()
            if k == "epoch" or (isinstance(v, (int, float)) and not isinstance(v, bool) and "/" in k)}


def _collate(dataset, indices, device):
    items = [dataset[int(i)] for i in indices]
    return {k: torch.stack([it[k] for it in items]).to(device) for k in ("image", "labels", "label_mask")}


def _all_sum(values: list[float], world_size: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def _evaluate(adapter, net, dataset, indices, device, batch_size, world_size, clip=None, raw=False):
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
            batch = _collate(dataset, indices[start:start + batch_size], device)
            loss, parts = adapter.per_sample_loss(net, batch)
            for k, v in {"loss": loss, **parts}.items():
                v = v.detach().double()
                sums[k] = sums.get(k, 0.0) + float((v if clip is None else v.clamp(0.0, clip)).sum())
            n += len(loss)
    net.train()
    keys = ["loss", *adapter.components]  # fixed order: every rank all-reduces the same list
    totals = _all_sum([sums.get(k, 0.0) for k in keys] + [n], world_size)
    if raw:
        return dict(zip(keys, totals[:-1])), totals[-1]
    count = max(totals[-1], 1.0)
    return {k: v / count for k, v in zip(keys, totals[:-1])}


def _selection_metrics(select: dict, adapter, net, stage, val_set, val_idx, device, pbs, rank, world) -> dict:
    """The metric that ranks this trial when `search.select_on` is not `private`, as
    `select/<metric>` (computed once, after the last epoch, from the final weights).

    public: the metric on a public dataset's validation split (val/...) or test split.
    dp: a Gaussian mechanism on the clipped per-sample validation losses (privacy.py)."""
    metric = select["metric"]
    if select["on"] == "dp":
        sums, count = _evaluate(adapter, net, val_set, val_idx, device, pbs, world, clip=select["clip"], raw=True)
        if rank != 0:
            return {}
        key = metric.removeprefix("val/")
        value = noisy_selection_mean(sums[key], count, clip=select["clip"], noise_multiplier=select["noise_multiplier"])
        return {f"select/{metric}": value, "select.noise_multiplier": select["noise_multiplier"],
                "select.clip": select["clip"], "select.n": count}
    data = DataConfig.model_validate(select["data"])
    index = validate_dataset(data.root, data.labels, tuple(data.shape), allow_pickle=data.allow_pickle,
                             cache_dir=select.get("cache_dir"))
    if metric.startswith("val/"):
        public_val = VolumeDataset(index.splits["validation"], len(data.labels), allow_pickle=data.allow_pickle)
        val = _evaluate(adapter, net, public_val, np.arange(rank, len(public_val), world), device, pbs, world)
        return {f"select/val/{k}": v for k, v in val.items()} if rank == 0 else {}
    if rank != 0:
        return {}
    public_test = VolumeDataset(index.splits["testing"], len(data.labels), allow_pickle=data.allow_pickle,
                                preload=False)
    return {f"select/{k}": v for k, v in evaluate_trial(adapter, stage, data, public_test, device, pbs).items()
            if k.startswith(("fidelity/", "control/"))}


def train_worker(config: dict) -> None:
    """Ray Train entry point. `config` = {"stage": stage dict, "meta": {...}} (see trial.py)."""
    meta = config["meta"]
    stage = StageConfig.model_validate({**config["stage"], "name": meta["stage"]})
    data_cfg = DataConfig.model_validate(meta["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    threads = max(1, int(meta.get("cpus_per_worker", 1)))
    torch.set_num_threads(threads)

    index = validate_dataset(data_cfg.root, data_cfg.labels, tuple(data_cfg.shape),
                             allow_pickle=data_cfg.allow_pickle, cache_dir=meta.get("cache_dir"))
    train_set = VolumeDataset(index.splits["training"], len(data_cfg.labels), allow_pickle=data_cfg.allow_pickle)
    val_set = VolumeDataset(index.splits["validation"], len(data_cfg.labels), allow_pickle=data_cfg.allow_pickle)
    test_set = VolumeDataset(index.splits["testing"], len(data_cfg.labels), allow_pickle=data_cfg.allow_pickle,
                             preload=False)
    n_train = len(train_set)

    # A latent diffusion stage trains on the frozen compression model its `needs` stage
    # selected; everything the released generator depends on goes into its checkpoint.
    compression, extra_state, params = None, {}, {}
    resuming = ray.train.get_checkpoint() is not None
    init_state = load_state(meta["init_from"], device) if meta.get("init_from") else None
    if meta.get("needs"):
        compression = adapter_from_record(load_state(meta["needs"], device), device)
        extra_state["compression"] = compression_record(compression)
        params["upstream.needs_checkpoint"] = meta["needs"]
    scale, source = resolve_latent_scale(stage, compression, meta, device, init_state)
    if stage.model.kind in GENERATOR_FAMILIES:
        extra_state.update(scale_factor=scale, scale_source=source)
        params.update({"latent.scale_factor": scale, "latent.scale_source": source})

    torch.manual_seed(stage.train.seed)  # identical initial weights on every rank
    adapter = build_adapter(stage.model, tuple(data_cfg.shape), len(data_cfg.labels),
                            compression=compression, scale_factor=scale)
    model = adapter.network.to(device)
    if init_state is not None and not resuming:
        model.load_state_dict(init_state["model"])
        params["upstream.init_from_checkpoint"] = meta["init_from"]
    if stage.train.finetune == "attention":
        trainable = freeze_all_but_attention(model)
        params["train.trainable_parameters"] = trainable
    if world > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    base_opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=stage.train.lr,
                                weight_decay=stage.train.weight_decay)

    facts = None
    if stage.dp.enabled:
        facts = plan_privacy(stage, n_train, meta["delta"], meta["accountant"])
        # DP noise and Poisson batches come from OS entropy; only dp.reproducible (not a DP
        # release) derives them from the logged train.seed.
        secret = None if not stage.dp.reproducible else stage.train.seed
        stepper = make_dp_stepper(stage.dp.grad_sample_mode, stage.model.kind, model, base_opt, world,
                                  noise_multiplier=facts.noise_multiplier, max_grad_norm=facts.max_grad_norm,
                                  sample_rate=facts.sample_rate, n_train=n_train, accountant=facts.accountant,
                                  noise_seed=secret)
        sampler = PoissonSampler(n_train, stage.train.batch_size, rank, world, secret)
    else:
        stepper = Stepper(model, base_opt, world)
        sampler = ShuffleSampler(n_train, stage.train.batch_size, rank, world, stage.train.seed)

    if hasattr(adapter, "noise_multiplicity"):
        adapter.noise_multiplicity = stage.dp.noise_multiplicity if stage.dp.enabled else 1
    # EMA of the weights is post-processing of DP-SGD's outputs: free in privacy terms.
    ema = WeightEMA(stepper.network, stage.train.ema_decay) if stage.train.ema_decay else None

    start_epoch = 0
    history: list[dict] = []   # every epoch's metrics, kept in the checkpoint
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        stepper.network.load_state_dict(state["model"])
        base_opt.load_state_dict(state["optimizer"])
        stepper.load_state_dict(state["accountant"])
        if hasattr(adapter, "load_aux_state"):
            adapter.load_aux_state(state.get("aux", {}))
        if ema is not None and state.get("ema_model"):
            ema.load_state_dict(state["ema_model"])
        start_epoch = int(state["epoch"])
        history = list(state.get("history") or [])
        if rank == 0:
            print(f"[{meta['stage']}] resumed from epoch {start_epoch}"
                  + (f", {stepper.steps} DP steps already accounted" if stepper.dp else ""), flush=True)
        if history:
            # The launch may have died after this checkpoint was saved but before its metrics
            # reached MLflow: the tracker logs whatever epochs of this history it lacks.
            ray.train.report({**history[-1], **(facts.as_result() if facts else {}), REPLAY_KEY: history},
                             checkpoint=None)

    if stepper.dp:
        # Noise added after the last checkpoint by a worker group that then died is still
        # counted (see DPStepper.attach_ledger); the ledger lives beside the run's checkpoints.
        ledger = Path(meta["storage_path"]) / ctx.get_experiment_name() / "noise_ledger.txt"
        recovered = stepper.count_ledger(ledger)
        if recovered and rank == 0:
            print(f"[{meta['stage']}] {recovered} noise additions after the last checkpoint were lost with "
                  f"the failed workers; they stay in the privacy account", flush=True)
        if rank == 0:
            stepper.attach_ledger(ledger)

    max_steps = stage.train.max_steps_per_epoch
    pbs = stage.train.physical_batch_size
    val_idx = np.arange(rank, len(val_set), world)
    for epoch in range(start_epoch, stage.train.epochs):
        t0 = time.perf_counter()
        if stepper.dp:
            stepper.seed_noise(epoch, rank)
        sums: dict[str, float] = {}
        seen = 0
        for step, local in enumerate(sampler.epoch(epoch)):
            if max_steps and step >= max_steps:
                break
            chunks = [local[i:i + pbs] for i in range(0, len(local), pbs)] or [local]
            for j, chunk in enumerate(chunks):
                if len(chunk) == 0:
                    stepper.empty_microbatch()
                else:
                    batch = _collate(train_set, chunk, device)
                    loss, parts = adapter.per_sample_loss(stepper.module, batch)
                    stepper.backward(loss, getattr(adapter, "rows_per_sample", 1))
                    for k, v in {"loss": loss, **parts}.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach().sum())
                    seen += len(chunk)
                stepper.microbatch_done(last=j == len(chunks) - 1)
            if hasattr(adapter, "after_step"):
                adapter.after_step(world)
            if ema is not None:
                ema.update(stepper.network)
        keys = ["loss", *adapter.components]
        totals = _all_sum([sums.get(k, 0.0) for k in keys] + [seen], world)
        train_metrics = {f"train/{k}": v / max(totals[-1], 1.0) for k, v in zip(keys, totals[:-1])}
        val = _evaluate(adapter, stepper.network, val_set, val_idx, device, pbs, world)
        elapsed = time.perf_counter() - t0
        metrics = {"epoch": epoch + 1, **train_metrics, **{f"val/{k}": v for k, v in val.items()},
                   "time/epoch_s": elapsed, "perf/samples_per_s": totals[-1] / max(elapsed, 1e-9)}
        metrics.update({f"param.{k}": v for k, v in params.items()})
        if facts is not None:
            metrics.update({"privacy/epsilon": stepper.epsilon(facts.delta), "privacy/steps": stepper.steps,
                            **facts.as_result()})
        if meta.get("select") and epoch + 1 == stage.train.epochs:
            metrics.update(_selection_metrics(meta["select"], adapter, stepper.network, stage, val_set, val_idx,
                                              device, pbs, rank, world))
        if rank == 0:
            eps = f" eps={metrics['privacy/epsilon']:.3f} steps={metrics['privacy/steps']}" if facts else ""
            print(f"[{meta['stage']}] epoch {epoch + 1}/{stage.train.epochs} "
                  f"train/loss={metrics['train/loss']:.5f} val/loss={metrics['val/loss']:.5f}{eps} "
                  f"({elapsed:.1f}s)", flush=True)
            history.append(_loggable(metrics))
            last = epoch + 1 == stage.train.epochs
            weights = stepper.network.state_dict()
            if last:   # the EMA weights are loaded below for evaluation; keep the trained ones
                weights = {k: v.detach().clone() for k, v in weights.items()}
            state = {"model": weights, "optimizer": base_opt.state_dict(),
                     "accountant": stepper.state_dict(), "epoch": epoch + 1,
                     "family": stage.model.kind, "model_config": stage.model.model_dump(),
                     "shape": list(data_cfg.shape), "labels": list(data_cfg.labels),
                     "metrics": history[-1], "history": history,
                     "aux": adapter.aux_state() if hasattr(adapter, "aux_state") else {},
                     "ema_model": ema.state_dict() if ema is not None else None, **extra_state}
            with tempfile.TemporaryDirectory() as tmp:
                if last:
                    if ema is not None:  # the last epoch: what sampling will use from now on
                        stepper.network.load_state_dict(ema.state_dict())
                    stepper.network.eval()
                    if stage.eval.enabled and len(test_set):
                        metrics.update(evaluate_trial(adapter, stage, data_cfg, test_set, device, pbs))
                        # the evaluation goes into the checkpoint too, so a replay (above) has it
                        history[-1] = state["metrics"] = _loggable(metrics)
                        print(f"[{meta['stage']}] evaluation on {int(metrics['eval/n_samples'])} test volumes: "
                              + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                         if k.startswith(("fidelity/", "control/r_mean", "control/ed_es")))
                              + f" ({metrics['time/eval_s']:.1f}s)", flush=True)
                    if hasattr(adapter, "sample") and stage.train.sample_grid:
                        write_sample_grid(adapter, test_set, stage.train.sample_grid, os.path.join(tmp, "samples.png"),
                                          show_real=not data_cfg.private)
                torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
