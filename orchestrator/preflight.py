"""Checks that run before any training: data present and valid, privacy plan feasible.

Everything here raises `UserError` (one line, exit 2) so that a bad sweep file or dataset
fails in seconds, not after Ray has started and trials have burned an hour.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from orchestrator.config import DataConfig, StageConfig, SweepConfig, search_combinations
from orchestrator.errors import ConfigError, DataError
from trainers.data import validate_dataset

@dataclass
class StagePlan:
    stage: StageConfig
    data: DataConfig        # with `root` made absolute
    n_train: int
    select_data: Optional[DataConfig] = None   # select_on public: the public dataset, root absolute
    unit: str = "record"                       # the unit of privacy: record | subject
    n_subjects: Optional[int] = None           # training subjects (None: the data declares none)
    group_size: Optional[int] = None           # most training volumes of one subject (group privacy's k)
    val_group_size: Optional[int] = None       # the same in the validation split (select_on dp)

    @property
    def n_units(self) -> int:
        """Records or subjects in the training split: what Poisson sampling draws from."""
        return self.n_subjects if self.unit == "subject" else self.n_train


def _materialise(cfg: SweepConfig, stage: StageConfig, cache_dir: Path,
                 data: Optional[DataConfig] = None):
    data = data or cfg.stage_data(stage)
    root = cfg.resolve(data.root)
    data = data.model_copy(update={"root": str(root)})
    if data.synthesize is not None and not (root / "training.npy").exists():
        from trainers.phantoms import synthesize

        if root.is_dir() and any(root.iterdir()):
            raise DataError(f"data.root {root} has no training.npy but is not empty; data.synthesize writes a "
                            "phantom dataset only into an empty or absent folder: delete the folder (e.g. a "
                            "half-written dataset) or point data.root elsewhere")
        syn = data.synthesize
        print(f"[{stage.name}] writing a {syn.variant} phantom dataset of {syn.n} volumes "
              f"{tuple(data.shape)} to {root}", flush=True)
        synthesize(root, n=syn.n, shape=tuple(data.shape), seed=syn.seed, variant=syn.variant,
                   labels=tuple(data.labels))
    index = validate_dataset(root, data.labels, tuple(data.shape), allow_pickle=data.allow_pickle,
                             cache_dir=cache_dir, subject_pattern=data.subject_pattern)
    return data, index

def _trial_variants(stage: StageConfig, limit: int = 64):
    """The stage config under each combination of searched values (bounded: each DP
    variant may solve sigma, which takes seconds)."""
    for _, trial in search_combinations(stage, limit):
        yield StageConfig.model_validate({**trial, "name": stage.name})


def check_privacy_plan(cfg: SweepConfig, stage: StageConfig, data: DataConfig, n_train: int,
                       unit: str = "record") -> None:
    """`n_train`: the units Poisson sampling draws from (records, or subjects with unit subject)."""
    where = f"stages[{stage.name}]"
    what = "training subjects" if unit == "subject" else "training samples"
    audit = stage.audit   # an included input canary is one more record: M/2 of them in expectation
    if audit is not None and audit.kind == "input" and audit.canaries > n_train // 2:
        raise ConfigError(f"{where}.audit.canaries: {audit.canaries} input canaries for {n_train} {what} in "
                          f"{data.root} would cost over 1.3x a trial without them; expected at most {n_train // 2}")
    for variant in _trial_variants(stage):
        if variant.train.batch_size > n_train:
            raise ConfigError(f"{where}.train.batch_size: {variant.train.batch_size} is larger than the "
                              f"{n_train} {what} in {data.root}")
        if not variant.dp.enabled:
            continue
        if data.private and cfg.privacy.delta >= 1.0 / n_train:
            n = "n_subjects" if unit == "subject" else "n_train"
            raise ConfigError(f"privacy.delta: {cfg.privacy.delta:g} is not below 1/{n} = 1/{n_train} "
                              f"(stage {stage.name}); expected delta << 1/{n}, e.g. {0.1 / n_train:.1e}")
        from trainers.privacy import plan_privacy  # Ray Train, MONAI: only once the data is known good

        try:
            # Opacus warns (several lines on stderr) while it searches sigma; an unreachable
            # epsilon must still be the one `error:` line below.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plan_privacy(variant, n_train, cfg.privacy.delta, cfg.privacy.accountant)
        except ValueError:
            raise ConfigError(f"{where}.dp.target_epsilon: {variant.dp.target_epsilon:g} is unreachable with "
                              f"batch_size {variant.train.batch_size} of {n_train} {what} over "
                              f"{variant.train.epochs} epochs; raise target_epsilon or batch size, or train fewer epochs")

def _local_file(cfg: SweepConfig, stage: StageConfig, owner, key: str, section: str, what: str) -> None:
    path = getattr(owner, key, None)
    if path:
        resolved = cfg.resolve(path)
        if not resolved.is_file():
            raise ConfigError(f"stages[{stage.name}].{section}.{key}: {resolved} does not exist; expected a "
                              f"local {what} (nothing is downloaded at run time)")
        setattr(owner, key, str(resolved))


def check_model_files(cfg: SweepConfig, stage: StageConfig, data: DataConfig | None = None) -> None:
    """Local files a model or its evaluation needs exist (and are made absolute: Ray workers
    run elsewhere)."""
    _local_file(cfg, stage, stage.model, "perceptual_network", "model", "TorchScript feature network")
    _local_file(cfg, stage, stage.eval, "feature_network", "eval", "TorchScript feature network")
    _local_file(cfg, stage, stage.eval, "label_network", "eval", "TorchScript label network")
    for key in ("feature_network", "label_network"):
        path = getattr(stage.eval, key)
        if path:   # found out now, not when the first trial has trained for an hour
            import torch

            try:
                torch.jit.load(path, map_location="cpu")
            except Exception as exc:  # noqa: BLE001 - any failure to load is the same user error
                raise ConfigError(f"stages[{stage.name}].eval.{key}: {path} is not a TorchScript file "
                                  f"({type(exc).__name__}); expected a network saved with torch.jit.save")
    if data is not None and stage.eval.label_network_outputs:
        unknown = [x for x in stage.eval.label_network_outputs if x not in data.labels]
        if unknown:
            raise ConfigError(f"stages[{stage.name}].eval.label_network_outputs: {unknown[0]!r} is not one of "
                              f"data.labels {list(data.labels)}")


def preflight(cfg: SweepConfig) -> dict[str, StagePlan]:
    from orchestrator.config import stage_order

    if cfg.tracking.uri:
        from orchestrator.tracking import check_reachable  # imports Ray Tune: only when needed

        check_reachable(cfg.tracking.uri)
    if cfg.output_dir.exists() and not cfg.output_dir.is_dir():
        raise ConfigError(f"output: {cfg.output_dir} is not a directory; expected a folder (new or existing) for "
                          "mlflow.db, Ray results and checkpoints")
    cache_dir = cfg.output_dir / ".cache"
    plans = {}
    for stage in stage_order(cfg.stages):
        data, index = _materialise(cfg, stage, cache_dir)
        check_model_files(cfg, stage, data)
        warn_on_noise_schedule(stage)
        unit = cfg.stage_unit(stage)
        if unit == "subject" and index.subjects is None:
            raise ConfigError(f"stages[{stage.name}]: privacy.unit subject needs the subjects of {data.root}; "
                              "expected data.subject_pattern (a regex whose first group is the subject id) or a "
                              "`subject` entry in every sample file")
        plan = StagePlan(stage=stage, data=data, n_train=index.n("training"), unit=unit,
                         n_subjects=index.n_subjects("training"), group_size=index.group_size("training"),
                         val_group_size=index.group_size("validation"))
        check_privacy_plan(cfg, stage, data, plan.n_units, unit)
        plans[stage.name] = plan
        if stage.search.select_on == "public":
            plans[stage.name].select_data = _materialise(cfg, stage, cache_dir, cfg.select_data(stage))[0]
    return plans

def terminal_signal(model) -> float:
    """sqrt(alpha_bar_T): the share of the data left at the last DDPM step of an ldm config.

    MONAI's DDPMScheduler's two beta schedules, written out in numpy: the launch process never
    imports MONAI (seconds of start-up); tests/test_ldm.py checks it against MONAI's own."""
    import math

    import numpy as np

    t = model.num_train_timesteps
    if model.beta_schedule == "scaled_linear_beta":
        betas = np.linspace(math.sqrt(model.beta_start), math.sqrt(model.beta_end), t) ** 2
    else:
        betas = np.linspace(model.beta_start, model.beta_end, t)
    return float(math.sqrt(np.prod(1.0 - betas)))


def warn_on_noise_schedule(stage: StageConfig) -> None:
    """A warning line (not an error) when the noise schedule ends far from pure noise:
    sampling starts from pure noise, which such a model never saw, and its samples come out
    washed out (beta 0.0015-0.0195, right for 1000 steps, keeps 41% of the signal at 200)."""
    m = stage.model
    if m.kind != "ldm":
        return
    left = terminal_signal(m)
    if left > 0.1:
        print(f"warning: stages[{stage.name}].model: the last of {m.num_train_timesteps} DDPM steps keeps "
              f"{left:.0%} of the signal (sqrt(alpha_bar_T); beta {m.beta_start:g}-{m.beta_end:g}); sampling "
              f"starts from pure noise, so samples come out washed out: raise beta_start/beta_end (about "
              f"{1000 / m.num_train_timesteps:g}x the defaults for {m.num_train_timesteps} steps) or "
              "num_train_timesteps", flush=True)


def apply_smoke_test(cfg: SweepConfig) -> None:
    """`--smoke-test`: every trial runs 1 epoch of at most 2 steps."""
    for stage in cfg.stages:
        stage.train.epochs = 1
        stage.train.max_steps_per_epoch = 2
        for path in list(stage.search.parameters):
            if path in ("train.epochs", "train.max_steps_per_epoch"):
                del stage.search.parameters[path]
