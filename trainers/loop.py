"""How one trial trains: the one training loop, run by every Ray Train worker.

Every model family goes through this loop; a family differs only in its adapter
(`models/`). DP or not differs only in the stepper (`trainers/privacy.py`).

    setup -> restore -> keep_noise_ledger, then for each epoch:
        train_epoch: for each sampling event (a Poisson batch in DP mode, a shuffled
            batch otherwise), split the local batch into physical micro-batches;
            per-sample loss -> backward -> (clip + accumulate) ... -> (noise) -> step
        validate: validation loss (all ranks), epsilon so far, the selection metric
        report: ray.train.report(metrics, checkpoint with model, optimizer, noise history);
            after the last epoch `finish` evaluates and draws the sample grid first
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

import ray.train
import ray.train.torch

from models import GENERATOR_FAMILIES, build_adapter
from orchestrator.config import DataConfig, StageConfig
from trainers.checkpoints import CHECKPOINT_FILE, WeightEMA, adapter_from_record, compression_record, load_state
from trainers.data import LatentCache, VolumeDataset, collate, validate_dataset
from trainers.generators import freeze_all_but_attention, resolve_latent_scale, write_sample_grid
from trainers.trial_eval import evaluate_trial
from trainers.privacy import (PoissonSampler, PrivacyFacts, ShuffleSampler, Stepper, make_dp_stepper, microbatches,
                              plan_privacy, unit_ids)
from trainers.validation import all_sum, mean_losses, selection_metrics


REPLAY_KEY = "replay_history"


def _loggable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items()
            if k == "epoch" or (isinstance(v, (int, float)) and not isinstance(v, bool) and "/" in k)}


@dataclass
class Trial:
    """What one worker holds for one trial; built by `setup`, advanced by the phases below."""
    meta: dict
    stage: StageConfig
    data: DataConfig
    rank: int
    world: int
    device: torch.device
    train_set: VolumeDataset
    val_set: VolumeDataset
    test_set: VolumeDataset
    adapter: object
    optimizer: torch.optim.Optimizer      # the plain optimizer under the (DP) stepper
    stepper: Stepper
    sampler: object
    facts: Optional[PrivacyFacts]         # sigma, q, planned steps (DP only)
    ema: Optional[WeightEMA]
    schedule: Optional[torch.optim.lr_scheduler.LRScheduler] = None   # train.lr_schedule
    canaries: Optional[object] = None     # trainers/audit.py, with `audit` on the stage
    extra_state: dict = field(default_factory=dict)   # what the released model depends on
    params: dict = field(default_factory=dict)        # facts known only here, logged as params
    history: list = field(default_factory=list)       # every epoch's metrics, kept in the checkpoint
    start_epoch: int = 0
    recovered_steps: int = 0                          # noise additions recovered from the ledger

    @property
    def name(self) -> str:
        return self.meta["stage"]

    def say(self, text: str) -> None:
        """A line in this worker's log (Ray's log files; the console with --verbose)."""
        if self.rank == 0:
            print(f"[{self.name}] {text}", flush=True)


def train_worker(config: dict) -> None:
    """Ray Train entry point. `config` = {"stage": stage dict, "meta": {...}} (see trial.py).

    The phases, top to bottom: build the trial (data, upstream models, network, DP or not),
    restore it from a checkpoint, keep the noise ledger, then per epoch: train, validate,
    report (with a checkpoint; after the last epoch also the evaluation and sample grid)."""
    trial = setup(config)
    restore(trial)
    keep_noise_ledger(trial)
    for epoch in range(trial.start_epoch, trial.stage.train.epochs):
        t0 = time.perf_counter()
        metrics = train_epoch(trial, epoch)
        metrics.update(validate(trial, epoch))
        elapsed = time.perf_counter() - t0
        metrics.update({"time/epoch_s": elapsed, "perf/samples_per_s": metrics.pop("seen") / max(elapsed, 1e-9)})
        report(trial, epoch, metrics)


def setup(config: dict) -> Trial:
    """Data, the upstream models a generator depends on, the network, and the stepper:
    DP-SGD (Poisson batches, clipping, noise, accounting) or plain SGD."""
    meta = config["meta"]
    stage = StageConfig.model_validate({**config["stage"], "name": meta["stage"]})
    data = DataConfig.model_validate(meta["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(meta.get("cpus_per_worker", 1))))

    index = validate_dataset(data.root, data.labels, tuple(data.shape), allow_pickle=data.allow_pickle,
                             cache_dir=meta.get("cache_dir"), subject_pattern=data.subject_pattern)
    split = lambda name, **kw: VolumeDataset(index.splits[name], len(data.labels),  # noqa: E731
                                             allow_pickle=data.allow_pickle, **kw)
    train_set, val_set, test_set = split("training"), split("validation"), split("testing", preload=False)
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
    adapter = build_adapter(stage.model, tuple(data.shape), len(data.labels), compression=compression,
                            scale_factor=scale, label_names=list(data.labels))
    model = adapter.network.to(device)
    if stage.train.memory_format == "channels_last_3d":
        model.to(memory_format=torch.channels_last_3d)   # 5-D weights only; conv outputs follow
    if compression is not None and hasattr(adapter, "encode"):
        # The frozen encoder runs once per training and validation volume, not once per epoch.
        train_set, val_set = (LatentCache(s, adapter.encode, device, stage.train.physical_batch_size)
                              for s in (train_set, val_set))
    if init_state is not None and not resuming:
        model.load_state_dict(init_state["model"])
        params["upstream.init_from_checkpoint"] = meta["init_from"]
    if stage.train.finetune == "attention":
        params["train.trainable_parameters"] = freeze_all_but_attention(model)
    if world > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=stage.train.lr,
                                 weight_decay=stage.train.weight_decay)

    facts, n_units = None, n_train
    if stage.dp.enabled:
        # The unit of privacy: a record, or a subject with all of its training volumes.
        unit = meta.get("unit", "record")
        units = index.units("training") if unit == "subject" else None
        n_units = len(units) if units is not None else n_train
        facts = plan_privacy(stage, n_units, meta["delta"], meta["accountant"], unit=unit,
                             group_size=index.group_size("training"))
        # DP noise and Poisson batches come from OS entropy; only dp.reproducible (not a DP
        # release) derives them from the logged train.seed.
        secret = None if not stage.dp.reproducible else stage.train.seed
        stepper = make_dp_stepper(stage.dp.grad_sample_mode, stage.model.kind, model, optimizer, world,
                                  noise_multiplier=facts.noise_multiplier, max_grad_norm=facts.max_grad_norm,
                                  sample_rate=facts.sample_rate, n_train=n_units, accountant=facts.accountant,
                                  noise_seed=secret)
        sampler = PoissonSampler(n_train, stage.train.batch_size, rank, world, secret, units=units)
    else:
        stepper = Stepper(model, optimizer, world)
        sampler = ShuffleSampler(n_train, stage.train.batch_size, rank, world, stage.train.seed)
    if hasattr(adapter, "noise_multiplicity"):
        adapter.noise_multiplicity = stage.dp.noise_multiplicity if stage.dp.enabled else 1
    # EMA of the weights is post-processing of DP-SGD's outputs: free in privacy terms.
    ema = WeightEMA(stepper.network, stage.train.ema_decay) if stage.train.ema_decay else None
    return Trial(meta=meta, stage=stage, data=data, rank=rank, world=world, device=device, train_set=train_set,
                 val_set=val_set, test_set=test_set, adapter=adapter, optimizer=optimizer, stepper=stepper,
                 sampler=sampler, facts=facts, ema=ema, extra_state=extra_state, params=params,
                 schedule=lr_schedule(stage, optimizer, sampler.steps),
                 canaries=add_canaries(stage, stepper, optimizer, facts, n_units, rank, world,
                                       adapter=adapter, data=data, device=device))


def add_canaries(stage: StageConfig, stepper, optimizer, facts, n_units: int, rank: int, world: int, *,
                 adapter, data: DataConfig, device):
    """`audit`: canaries ride on every DP step from the first to the last (trainers/audit.py):
    gradient canaries on the plain optimizer's step, input canaries as extra micro-batches
    before each step's final microbatch_done. Their secret state is in the checkpoint, so a
    restarted trial continues the same audit."""
    if stage.audit is None:
        return None
    from trainers.audit import GradientCanaries, InputCanaries

    if stage.audit.kind == "input":
        return InputCanaries(stage.audit.canaries, tuple(data.shape), len(data.labels), sample_rate=facts.sample_rate,
                             physical_batch_size=stage.train.physical_batch_size, rank=rank,
                             world_size=world).attach(stepper, adapter, device)
    return GradientCanaries(stepper.params, stage.audit.canaries, max_grad_norm=facts.max_grad_norm,
                            sample_rate=facts.sample_rate, expected_batch=facts.sample_rate * n_units,
                            rank=rank, world_size=world).attach(optimizer)


def restore(trial: Trial) -> None:
    """A restarted or resumed trial continues from its last checkpoint: weights, optimizer,
    noise history (its epsilon never resets), EMA and the metric history."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=trial.device, weights_only=True)
    trial.stepper.network.load_state_dict(state["model"])
    trial.optimizer.load_state_dict(state["optimizer"])
    trial.stepper.load_state_dict(state["accountant"])
    if hasattr(trial.adapter, "load_aux_state"):
        trial.adapter.load_aux_state(state.get("aux", {}))
    if trial.ema is not None and state.get("ema_model"):
        trial.ema.load_state_dict(state["ema_model"])
        # checkpoints from before the warm-up was counted: past it
        trial.ema.updates = int(state.get("ema_updates", 10 ** 9))
    if trial.schedule is not None and state.get("lr_schedule"):
        trial.schedule.load_state_dict(state["lr_schedule"])
    trial.start_epoch = int(state["epoch"])
    trial.history = list(state.get("history") or [])
    if trial.canaries is not None and state.get("audit"):
        trial.canaries.load_state_dict(state["audit"])   # the same canaries, scores and steps
    trial.say(f"resumed from epoch {trial.start_epoch}"
              + (f", {trial.stepper.steps} DP steps already accounted" if trial.stepper.dp else ""))
    if trial.history:
        # The launch may have died after this checkpoint was saved but before its metrics
        # reached MLflow: the tracker logs whatever epochs of this history it lacks.
        facts = trial.facts.as_result() if trial.facts else {}
        ray.train.report({**trial.history[-1], **facts, REPLAY_KEY: trial.history}, checkpoint=None)


def keep_noise_ledger(trial: Trial) -> None:
    """Noise added after the last checkpoint by a worker group that then died is still
    counted (see DPStepper.attach_ledger); the ledger lives beside the run's checkpoints."""
    if not trial.stepper.dp:
        return
    ledger = Path(trial.meta["storage_path"]) / ray.train.get_context().get_experiment_name() / "noise_ledger.txt"
    recovered = trial.recovered_steps = trial.stepper.count_ledger(ledger)
    if recovered:
        trial.say(f"{recovered} noise additions after the last checkpoint were lost with the failed workers; "
                  "they stay in the privacy account")
    if trial.rank == 0:
        trial.stepper.attach_ledger(ledger)


def lr_schedule(stage: StageConfig, optimizer, steps_per_epoch: int):
    """train.lr_schedule over the run's optimizer steps (None: constant). Post-processing of
    the noisy gradients, so free in privacy terms."""
    t = stage.train
    total = t.epochs * min(steps_per_epoch, t.max_steps_per_epoch or steps_per_epoch)
    if t.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    if t.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=t.lr, total_steps=max(total, 2))
    return None


def train_epoch(trial: Trial, epoch: int) -> dict:
    """One pass: every sampling event is a step, split into physical micro-batches."""
    stepper, adapter, pbs = trial.stepper, trial.adapter, trial.stage.train.physical_batch_size
    max_steps = trial.stage.train.max_steps_per_epoch
    if stepper.dp:
        stepper.seed_noise(epoch, trial.rank)   # dp.reproducible only
    sums: dict[str, float] = {}
    seen = 0
    unit_of = getattr(trial.sampler, "unit_of", None)   # privacy.unit subject: record -> subject
    for step, local in enumerate(trial.sampler.epoch(epoch)):
        if max_steps and step >= max_steps:
            break
        chunks = microbatches(local, pbs, unit_of)   # a subject is never split
        for j, chunk in enumerate(chunks):
            if len(chunk) == 0:
                stepper.empty_microbatch()
            else:
                batch = collate(trial.train_set, chunk, trial.device)
                loss, parts = adapter.per_sample_loss(stepper.module, batch)
                stepper.backward(loss, getattr(adapter, "rows_per_sample", 1), units=unit_ids(chunk, unit_of))
                for k, v in {"loss": loss, **parts}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach().sum())
                seen += len(chunk)
            stepper.microbatch_done(last=j == len(chunks) - 1)
        if hasattr(adapter, "after_step"):
            adapter.after_step(trial.world)
        if trial.ema is not None:
            trial.ema.update(stepper.network)
        if trial.schedule is not None:
            trial.schedule.step()
    keys = ["loss", *adapter.components]
    totals = all_sum([sums.get(k, 0.0) for k in keys] + [seen], trial.world)
    return {"epoch": epoch + 1, **{f"train/{k}": v / max(totals[-1], 1.0) for k, v in zip(keys, totals[:-1])},
            "train/lr": trial.optimizer.param_groups[0]["lr"], "seen": totals[-1]}


def validate(trial: Trial, epoch: int) -> dict:
    """Validation loss (all ranks), the privacy spent so far, and after the last epoch the
    selection metric when trials are not ranked on the private validation split."""
    val_idx = np.arange(trial.rank, len(trial.val_set), trial.world)
    pbs = trial.stage.train.physical_batch_size
    val = mean_losses(trial.adapter, trial.stepper.network, trial.val_set, val_idx, trial.device, pbs, trial.world)
    metrics = {f"val/{k}": v for k, v in val.items()}
    metrics.update({f"param.{k}": v for k, v in trial.params.items()})
    if trial.facts is not None:
        metrics.update({"privacy/epsilon": trial.stepper.epsilon(trial.facts.delta),
                        "privacy/steps": trial.stepper.steps, **trial.facts.as_result()})
        subject = trial.facts.subject_epsilon(trial.stepper.history)   # the patient's, beside the record's
        if subject is not None:
            metrics["privacy/epsilon_subject"] = subject
        if trial.recovered_steps:   # the console says so (orchestrator/progress.py)
            metrics["privacy/steps_recovered"] = trial.recovered_steps
    if trial.canaries is not None and epoch + 1 == trial.stage.train.epochs:
        metrics.update(trial.canaries.result(trial.facts.delta))   # the audit ends with the last step
    if trial.meta.get("select") and epoch + 1 == trial.stage.train.epochs:
        metrics.update(selection_metrics(trial.meta["select"], trial.adapter, trial.stepper.network, trial.stage,
                                          trial.val_set, val_idx, trial.device, pbs, trial.rank, trial.world))
    return metrics


def report(trial: Trial, epoch: int, metrics: dict) -> None:
    """Every rank reports (Ray Train's report is a barrier); rank 0 with a checkpoint of
    everything the trial needs to resume and the released model needs to sample."""
    if trial.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    stage, net = trial.stage, trial.stepper.network
    eps = f" eps={metrics['privacy/epsilon']:.3f} steps={metrics['privacy/steps']}" if trial.facts else ""
    if "privacy/epsilon_subject" in metrics and trial.facts.unit == "record":
        eps += f" eps_subject={metrics['privacy/epsilon_subject']:.3f}"
    if "audit/epsilon_lower" in metrics:
        eps += f" audited eps_lower={metrics['audit/epsilon_lower']:.3f}"
    trial.say(f"epoch {epoch + 1}/{stage.train.epochs} train/loss={metrics['train/loss']:.5f} "
              f"val/loss={metrics['val/loss']:.5f}{eps} ({metrics['time/epoch_s']:.1f}s)")
    trial.history.append(_loggable(metrics))
    last = epoch + 1 == stage.train.epochs
    weights = net.state_dict()
    if last:   # the EMA weights are loaded below for evaluation; keep the trained ones
        weights = {k: v.detach().clone() for k, v in weights.items()}
    state = {"model": weights, "optimizer": trial.optimizer.state_dict(),
             "accountant": trial.stepper.state_dict(), "epoch": epoch + 1,
             "family": stage.model.kind, "model_config": stage.model.model_dump(),
             "shape": list(trial.data.shape), "labels": list(trial.data.labels),
             "metrics": trial.history[-1], "history": trial.history,
             "aux": trial.adapter.aux_state() if hasattr(trial.adapter, "aux_state") else {},
             "ema_model": trial.ema.state_dict() if trial.ema is not None else None,
             "ema_updates": trial.ema.updates if trial.ema is not None else 0,
             "lr_schedule": trial.schedule.state_dict() if trial.schedule is not None else None,
             # the canaries' secret seed: for resuming the audit; the custodian keeps it as the model
             "audit": trial.canaries.state_dict() if trial.canaries is not None else None, **trial.extra_state}
    with tempfile.TemporaryDirectory() as tmp:
        if last:
            finish(trial, metrics, state, tmp)
        torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def finish(trial: Trial, metrics: dict, state: dict, folder: str) -> None:
    """After the last epoch (rank 0): switch to the weights sampling will use (EMA), evaluate
    on the test split, and draw the sample grid."""
    stage, net, pbs = trial.stage, trial.stepper.network, trial.stage.train.physical_batch_size
    if trial.ema is not None:
        net.load_state_dict(trial.ema.state_dict())
    net.eval()
    if stage.eval.enabled and len(trial.test_set):
        metrics.update(evaluate_trial(trial.adapter, stage, trial.data, trial.test_set, trial.device, pbs,
                                      train_set=trial.train_set))
        # the evaluation goes into the checkpoint too, so a replay (restore) has it
        trial.history[-1] = state["metrics"] = _loggable(metrics)
        trial.say(f"evaluation on {int(metrics['eval/n_samples'])} test volumes: "
                  + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                             if k.startswith(("fidelity/", "control/r_mean", "control/ed_es")))
                  + f" ({metrics['time/eval_s']:.1f}s)")
    if hasattr(trial.adapter, "sample") and stage.train.sample_grid:
        write_sample_grid(trial.adapter, trial.test_set, stage.train.sample_grid, os.path.join(folder, "samples.png"),
                          show_real=not trial.data.private)
