"""Turn `search.parameters` (dotted paths into a stage's config) into a Tune param space.

    dp.noise_multiplier: {values: [0.8, 1.5]}              grid: every value; random/optuna: a choice
    train.lr: {distribution: log_uniform, min: 1e-4, max: 1e-2}
    train.batch_size: {distribution: int_uniform, min: 8, max: 64}    (max inclusive)
    model.latent_channels: {value: 4}                        a constant
"""
from __future__ import annotations

import copy
from typing import Any

from ray import tune

from orchestrator.config import ParamSpec, SearchConfig, set_path


def to_domain(spec: ParamSpec, method: str) -> Any:
    if spec.values is not None:
        # Optuna cannot take a grid; it samples the listed values instead.
        return tune.grid_search(list(spec.values)) if method == "grid" else tune.choice(list(spec.values))
    if spec.distribution == "uniform":
        return tune.uniform(spec.min, spec.max)
    if spec.distribution == "log_uniform":
        return tune.loguniform(spec.min, spec.max)
    if spec.distribution == "int_uniform":
        return tune.randint(int(spec.min), int(spec.max) + 1)
    return spec.value


def build_param_space(stage_config: dict, search: SearchConfig) -> dict:
    """The stage config with each searched path replaced by its Tune domain."""
    space = copy.deepcopy(stage_config)
    for path, spec in search.parameters.items():
        set_path(space, path, to_domain(spec, search.method))
    return space


def build_search_alg(search: SearchConfig, seed: int = 0):
    """None means Tune's default variant generator (grid expansion / random sampling)."""
    if search.method == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        import optuna

        return OptunaSearch(metric=search.metric, mode=search.mode,
                            sampler=optuna.samplers.TPESampler(seed=seed))
    return None
