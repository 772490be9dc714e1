"""Optional loss terms of the compression models: perceptual and adversarial.

Perceptual: a frozen feature network loaded from a LOCAL TorchScript file (nothing is
downloaded at run time; TorchScript archives hold no pickled Python objects, unlike a
`torch.save` of a module). Features of the input and of the reconstruction are compared per
sample, so the term is as DP-compatible as the reconstruction loss: it only shapes the
per-sample gradient of the trained network.

Adversarial: a PatchGAN discriminator (Isola et al. 2017; MONAI's PatchDiscriminator)
trained on the real images. The discriminator itself sees the training data without clipping
or noise and feeds the generator's loss; that is how the reference code leaked private data
around DP-SGD. So this term exists only in non-DP stages; the sweep schema refuses it with DP.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class PerceptualTerm:
    def __init__(self, path: str):
        if not Path(path).is_file():
            raise FileNotFoundError(f"model.perceptual_network: {path} does not exist; expected a local TorchScript "
                                    "feature network (nothing is downloaded at run time)")
        self.net = torch.jit.load(path, map_location="cpu").eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def __call__(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        self.net.to(x.device)
        with torch.no_grad():
            real = self.net(x)
        fake = self.net(recon)
        real = real if isinstance(real, (list, tuple)) else [real]
        fake = fake if isinstance(fake, (list, tuple)) else [fake]
        # unit-normalised channels, as in LPIPS (Zhang et al. 2018), mean per sample
        terms = [(F.normalize(f, dim=1) - F.normalize(r, dim=1)).pow(2).flatten(1).mean(1)
                 for f, r in zip(fake, real)]
        return torch.stack(terms).sum(0)


class AdversarialTerm:
    """Least-squares GAN (Mao et al. 2017) with a PatchGAN discriminator; non-DP only."""

    def __init__(self, channels: int, layers: int, lr: float):
        from monai.networks.nets import PatchDiscriminator

        self.discriminator = PatchDiscriminator(spatial_dims=3, channels=channels, in_channels=1,
                                                num_layers_d=layers, norm="INSTANCE", kernel_size=3)
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _logits(self, x):
        return self.discriminator(x)[-1]

    def generator_loss(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        self.discriminator.to(x.device)
        self._pairs.append((x.detach(), recon.detach()))
        for p in self.discriminator.parameters():
            p.requires_grad_(False)
        loss = (self._logits(recon) - 1).pow(2).flatten(1).mean(1)
        for p in self.discriminator.parameters():
            p.requires_grad_(True)
        return loss

    def discriminator_step(self, world_size: int) -> None:
        """One discriminator update on this step's pairs; called once per step on every rank."""
        count = torch.zeros(1)
        for real, fake in self._pairs:
            loss = (self._logits(real) - 1).pow(2).flatten(1).mean(1) + self._logits(fake).pow(2).flatten(1).mean(1)
            (0.5 * loss.sum()).backward()
            count += len(real)
        self._pairs.clear()
        params = list(self.discriminator.parameters())
        if world_size > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
            dist.all_reduce(count)
        if count.item() > 0:
            for p in params:
                if p.grad is not None:
                    p.grad /= count.item()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])

