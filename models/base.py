"""What a model family is, to the one training loop: an adapter.

An adapter builds the network from config, computes a per-sample loss for a batch
(shape [B]: per-sample losses are what let Opacus clip each sample's gradient), and
names the metrics it reports. Everything else (sampling, DP, checkpoints, Ray) lives
in `trainers/` and is shared by every family.
"""
from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F


class Adapter(abc.ABC):
    """One model family. `network` is the trainable module; `per_sample_loss` receives the
    module actually used in training (it may be Opacus's GradSampleModule wrapper)."""

    family: str = ""
    components: tuple[str, ...] = ()  # names of the per-sample loss parts `per_sample_loss` returns

    def __init__(self, cfg: Any, shape: tuple[int, int, int], n_labels: int):
        self.cfg = cfg
        self.shape = tuple(shape)
        self.n_labels = n_labels
        self.network: nn.Module = self.build()

    @abc.abstractmethod
    def build(self) -> nn.Module:
        """The network, built from `self.cfg` for volumes of `self.shape`."""

    @abc.abstractmethod
    def per_sample_loss(self, net: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss of shape [B], {component name: tensor of shape [B]}) for a batch."""


def pad_to_multiple(x: torch.Tensor, multiple) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pad the three spatial dims of [B, C, D, H, W] up to a multiple of `multiple` (an int,
    or one per dim: (1, s, s) for in-plane networks, which leave depth alone).

    MONAI's strided convolutions halve every spatial dim; on odd sizes the decoder
    comes back one voxel short (13 -> 6 -> 12, no error). Padding to a multiple of the
    total stride and cropping back makes any (D, H, W) work, not only powers of two.
    Replicate padding keeps the padded border from looking like an edge.
    """
    spatial = x.shape[2:]
    multiples = [multiple] * len(spatial) if isinstance(multiple, int) else list(multiple)
    extra = [(-s) % m for s, m in zip(spatial, multiples)]
    if not any(extra):
        return x, tuple(spatial)
    # F.pad takes (last dim first) pairs: (w_lo, w_hi, h_lo, h_hi, d_lo, d_hi)
    pads = []
    for e in reversed(extra):
        pads += [e // 2, e - e // 2]
    return F.pad(x, pads, mode="replicate"), tuple(spatial)


def crop_to(x: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Undo `pad_to_multiple` (centre crop)."""
    slices = [slice(None), slice(None)]
    for have, want in zip(x.shape[2:], spatial):
        lo = (have - want) // 2
        slices.append(slice(lo, lo + want))
    return x[tuple(slices)]
