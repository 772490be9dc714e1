"""Model families. `build_adapter(model_cfg, shape, n_labels)` is the one entry point."""
from __future__ import annotations

from models.base import Adapter
from models.beta_vae import BetaVAE

FAMILIES: dict[str, type[Adapter]] = {BetaVAE.family: BetaVAE}


def build_adapter(model_cfg, shape, n_labels: int) -> Adapter:
    try:
        cls = FAMILIES[model_cfg.kind]
    except KeyError:
        raise ValueError(f"unknown model kind {model_cfg.kind!r}; expected one of {sorted(FAMILIES)}")
    return cls(model_cfg, shape, n_labels)
