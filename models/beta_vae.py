"""beta-VAE for 3D volumes on MONAI's AutoencoderKL (Kingma & Welling 2014; Higgins et al.
2017 for the beta weight; the KL-autoencoder of Rombach et al. 2022 that MONAI implements).

The loss is reconstruction + beta * KL per sample, plus optional perceptual (a local
TorchScript feature network) and adversarial terms (non-DP only; see models/extra_losses.py:
the reference code's non-private discriminator leaked private data around DP-SGD).
"""
from __future__ import annotations

import torch
from torch import nn
from monai.networks.nets import AutoencoderKL

from models.base import Adapter, crop_to, pad_to_multiple
from models.extra_losses import AdversarialTerm, PerceptualTerm
from models.inplane import make_in_plane, strides


class PaddedAutoencoderKL(nn.Module):
    """AutoencoderKL that accepts any (D, H, W): pads to the total stride, crops back."""

    def __init__(self, channels, latent_channels, num_res_blocks, norm_num_groups, downsample="all"):
        super().__init__()
        self.stride = strides(len(channels), downsample)  # (D, H, W)
        self.net = AutoencoderKL(
            spatial_dims=3, in_channels=1, out_channels=1,
            channels=tuple(channels), latent_channels=latent_channels,
            num_res_blocks=num_res_blocks, norm_num_groups=norm_num_groups,
            attention_levels=(False,) * len(channels),
            # Attention on 3D feature maps is costly and needs per-sample gradients
            # through softmax; the reference model has none at these sizes either.
            with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
        )
        if downsample == "in_plane":
            make_in_plane(self.net)

    def encode(self, x):
        x, spatial = pad_to_multiple(x, self.stride)
        mu, sigma = self.net.encode(x)
        return mu, sigma, spatial

    def decode(self, z, spatial):
        return crop_to(self.net.decode(z), spatial)

    def forward(self, x):
        mu, sigma, spatial = self.encode(x)
        z = mu + sigma * torch.randn_like(sigma)
        return self.decode(z, spatial), mu, sigma


class BetaVAE(Adapter):
    family = "beta_vae"
    components = ("recon", "kl")

    def build(self) -> nn.Module:
        c = self.cfg
        self.perceptual = PerceptualTerm(c.perceptual_network) if c.perceptual_weight > 0 else None
        self.adversarial = (AdversarialTerm(c.discriminator_channels, c.discriminator_layers, c.discriminator_lr)
                            if c.adversarial_weight > 0 else None)
        self.components = ("recon", "kl") + (("perceptual",) if self.perceptual else ()) + \
            (("adversarial",) if self.adversarial else ())
        return PaddedAutoencoderKL(c.channels, c.latent_channels, c.num_res_blocks, c.norm_num_groups, c.downsample)

    def per_sample_loss(self, net, batch):
        x = batch["image"]
        recon, mu, sigma = net(x)
        err = (recon - x).abs() if self.cfg.recon_loss == "l1" else (recon - x) ** 2
        recon_loss = err.flatten(1).mean(1)
        var = sigma.pow(2)
        kl = 0.5 * (mu.pow(2) + var - torch.log(var + 1e-12) - 1).flatten(1).sum(1)
        loss = recon_loss + self.cfg.kl_weight * kl
        parts = {"recon": recon_loss.detach(), "kl": kl.detach()}
        if self.perceptual is not None:
            perc = self.perceptual(x, recon)
            loss = loss + self.cfg.perceptual_weight * perc
            parts["perceptual"] = perc.detach()
        if self.adversarial is not None and net.training:
            adv = self.adversarial.generator_loss(x, recon)
            loss = loss + self.cfg.adversarial_weight * adv
            parts["adversarial"] = adv.detach()
        elif self.adversarial is not None:
            parts["adversarial"] = torch.zeros_like(loss).detach()
        return loss, parts

    # --- the loop calls these once per optimizer step / checkpoint -------------------
    def after_step(self, world_size: int) -> None:
        if self.adversarial is not None:
            self.adversarial.discriminator_step(world_size)

    def aux_state(self) -> dict:
        return {"adversarial": self.adversarial.state_dict()} if self.adversarial is not None else {}

    def load_aux_state(self, state: dict) -> None:
        if self.adversarial is not None and state.get("adversarial"):
            self.adversarial.load_state_dict(state["adversarial"])

    # --- as the frozen compression model of a latent diffusion stage ----------------
    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic latent (the posterior mean), [B, latent_channels, d, h, w]."""
        mu, _, _ = self.network.encode(x)
        return mu

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.network.decode(z, self.shape).clamp(0, 1)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.cfg.latent_channels, *[-(-n // s) for n, s in zip(self.shape, self.network.stride)])
