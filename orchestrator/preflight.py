"""Checks that run before any training: data present and valid, privacy plan feasible.

Everything here raises `UserError` (one line, exit 2) so that a bad sweep file or dataset
fails in seconds, not after Ray has started and trials have burned an hour.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import ConfigError, DataConfig, StageConfig, SweepConfig, search_combinations
from trainers.data import validate_dataset
from trainers.loop import plan_privacy

@dataclass
class StagePlan:
    stage: StageConfig
    data: DataConfig        # with `root` made absolute
    n_train: int

def _materialise(cfg: SweepConfig, stage: StageConfig, cache_dir: Path) -> tuple[DataConfig, int]:
    data = cfg.stage_data(stage)
    root = cfg.resolve(data.root)
    data = data.model_copy(update={"root": str(root)})
    if data.synthesize is not None and not (root / "training.npy").exists():
        from orchestrator.phantoms import synthesize

        syn = data.synthesize
        print(f"[{stage.name}] writing a {syn.variant} phantom dataset of {syn.n} volumes "
              f"{tuple(data.shape)} to {root}", flush=True)
        synthesize(root, n=syn.n, shape=tuple(data.shape), seed=syn.seed, variant=syn.variant,
                   labels=tuple(data.labels))
    index = validate_dataset(root, data.labels, tuple(data.shape), allow_pickle=data.allow_pickle,
                             cache_dir=cache_dir)
    return data, index.n("training")

def _trial_variants(stage: StageConfig, limit: int = 64):
    """The stage config under each combination of searched values (bounded: each DP
    variant may solve sigma, which takes seconds)."""
    for _, trial in search_combinations(stage, limit):
        yield StageConfig.model_validate({**trial, "name": stage.name})


def check_privacy_plan(cfg: SweepConfig, stage: StageConfig, data: DataConfig, n_train: int) -> None:
    where = f"stages[{stage.name}]"
    for variant in _trial_variants(stage):
        if variant.train.batch_size > n_train:
            raise ConfigError(f"{where}.train.batch_size: {variant.train.batch_size} is larger than the "
                              f"{n_train} training samples in {data.root}")
        if not variant.dp.enabled:
            continue
        if data.private and cfg.privacy.delta >= 1.0 / n_train:
            raise ConfigError(f"privacy.delta: {cfg.privacy.delta:g} is not below 1/n_train = 1/{n_train} "
                              f"(stage {stage.name}); expected delta << 1/n_train, e.g. {0.1 / n_train:.1e}")
        try:
            plan_privacy(variant, n_train, cfg.privacy.delta, cfg.privacy.accountant)
        except ValueError:
            raise ConfigError(f"{where}.dp.target_epsilon: {variant.dp.target_epsilon:g} is unreachable with "
                              f"batch_size {variant.train.batch_size} of {n_train} samples over "
                              f"{variant.train.epochs} epochs; raise target_epsilon or batch size, or train fewer epochs")

def check_model_files(cfg: SweepConfig, stage: StageConfig) -> None:
    """Local files a model needs exist (and are made absolute: Ray workers run elsewhere)."""
    path = getattr(stage.model, "perceptual_network", None)
    if path:
        resolved = cfg.resolve(path)
        if not resolved.is_file():
            raise ConfigError(f"stages[{stage.name}].model.perceptual_network: {resolved} does not exist; expected a "
                              "local TorchScript feature network (nothing is downloaded at run time)")
        stage.model.perceptual_network = str(resolved)


def preflight(cfg: SweepConfig) -> dict[str, StagePlan]:
    from orchestrator.config import stage_order

    cache_dir = cfg.output_dir / ".cache"
    plans = {}
    for stage in stage_order(cfg.stages):
        data, n_train = _materialise(cfg, stage, cache_dir)
        check_model_files(cfg, stage)
        check_privacy_plan(cfg, stage, data, n_train)
        plans[stage.name] = StagePlan(stage=stage, data=data, n_train=n_train)
    return plans

def apply_smoke_test(cfg: SweepConfig) -> None:
    """`--smoke-test`: every trial runs 1 epoch of at most 2 steps."""
    for stage in cfg.stages:
        stage.train.epochs = 1
        stage.train.max_steps_per_epoch = 2
        for path in list(stage.search.parameters):
            if path in ("train.epochs", "train.max_steps_per_epoch"):
                del stage.search.parameters[path]
