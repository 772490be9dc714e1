"""Trial checkpoints: one `state.pt` per epoch, self-contained enough to sample from.

A checkpoint holds the model weights, optimizer and accountant state, and what is needed
to rebuild the model without the sweep file: family, model config, volume shape, label
names, and for a latent diffusion model the frozen compression model it was trained on
and the latent scale factor. Everything is plain tensors, numbers, strings, lists and
dicts, so it loads with `torch.load(weights_only=True)` (no pickle of arbitrary code).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from models import build_adapter

CHECKPOINT_FILE = "state.pt"


def state_path(path: str | Path) -> Path:
    """A Ray checkpoint folder, or the state file itself."""
    p = Path(path)
    return p / CHECKPOINT_FILE if p.is_dir() else p


def load_state(path: str | Path, device: Any = "cpu") -> dict:
    p = state_path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no checkpoint here; expected a trial checkpoint folder holding {CHECKPOINT_FILE}")
    return torch.load(p, map_location=device, weights_only=True)


def model_config_of(state: dict):
    from orchestrator.config import StageConfig

    return StageConfig.model_validate({"name": "checkpoint", "model": state["model_config"]}).model


def compression_record(adapter, state_dict: Optional[dict] = None) -> dict:
    """What an LDM checkpoint embeds about its frozen compression model."""
    return {"family": adapter.family, "model_config": adapter.cfg.model_dump(), "shape": list(adapter.shape),
            "model": state_dict if state_dict is not None else adapter.network.state_dict()}


def adapter_from_record(record: dict, device: Any = "cpu", n_labels: int = 0):
    """Rebuild a (compression) adapter from a checkpoint or an embedded record, frozen."""
    adapter = build_adapter(model_config_of(record), tuple(record["shape"]), n_labels)
    adapter.network.load_state_dict(record["model"])
    adapter.network.to(device).eval()
    for p in adapter.network.parameters():
        p.requires_grad_(False)
    return adapter


def load_generator(path: str | Path, device: Any = "cpu"):
    """(adapter ready to sample, state) from an LDM trial checkpoint."""
    state = load_state(path, device)
    if state.get("family") != "ldm":
        raise ValueError(f"{state_path(path)} holds a {state.get('family')} model; expected an ldm (generator) checkpoint")
    compression = adapter_from_record(state["compression"], device) if state.get("compression") else None
    adapter = build_adapter(model_config_of(state), tuple(state["shape"]), len(state["labels"]),
                            compression=compression, scale_factor=state.get("scale_factor"),
                            label_names=list(state["labels"]))
    weights = state.get("ema_model") or state["model"]
    adapter.network.load_state_dict(weights)
    adapter.network.to(device).eval()
    return adapter, state


class WeightEMA:
    """Exponential moving average of the weights (buffers copied), for sampling.

    With a warm-up: update n (from 0) uses decay min(decay, (1 + n) / (10 + n)), as
    TensorFlow's ExponentialMovingAverage does with `num_updates`. Without it, decay 0.999
    over 780 steps leaves 0.999^780 = 46% of the initial (random) weights in the average."""

    def __init__(self, net: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0   # restored from the checkpoint's `ema_updates` on a resume
        self.shadow = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}
