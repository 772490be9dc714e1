"""Model families. `build_adapter(model_cfg, shape, n_labels, ...)` is the one entry point."""
from __future__ import annotations

import importlib

from models.base import Adapter

# family -> "module:Class"; imported on first use so a worker loads only what it trains
FAMILIES: dict[str, str] = {
    "beta_vae": "models.beta_vae:BetaVAE",
    "vq_vae": "models.vq_vae:VQVAE",
    "ldm": "models.ldm:LDM",
}
COMPRESSION_FAMILIES = ("beta_vae", "vq_vae")
GENERATOR_FAMILIES = ("ldm",)


def adapter_class(kind: str) -> type[Adapter]:
    try:
        module, name = FAMILIES[kind].split(":")
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(FAMILIES)}")
    return getattr(importlib.import_module(module), name)


def build_adapter(model_cfg, shape, n_labels: int, *, compression=None, scale_factor=None,
                  label_names=None) -> Adapter:
    """`label_names` (the data's labels, in order): needed by a generator with `label_ranges`."""
    cls = adapter_class(model_cfg.kind)
    if model_cfg.kind in GENERATOR_FAMILIES:
        return cls(model_cfg, shape, n_labels, compression=compression, scale_factor=scale_factor,
                   label_names=label_names)
    return cls(model_cfg, shape, n_labels)
