"""VQ-VAE for 3D volumes on MONAI's VQVAE (van den Oord et al. 2017, "Neural Discrete
Representation Learning", arXiv 1711.00937; MONAI's network follows Tudosiu et al. 2022).

The codebook is where the privacy story differs from the reference code. MONAI's
EMAQuantizer moves its codebook towards an exponential moving average of raw encoder
outputs under no_grad: a release of private data that DP-SGD never clips or noises. Here
`codebook: gradient` (the default, and the only DP mode) learns the codebook as an
ordinary parameter through van den Oord's codebook loss, so every change to it is a
clipped, noised per-sample gradient step. `codebook: ema` keeps MONAI's quantizer for
non-DP runs (it often trains faster and uses more codes).

Per-sample loss = recon + ||sg[z_e] - e||^2 + commitment_cost * ||z_e - sg[e]||^2, both VQ
terms averaged over the sample's latent voxels, never over the batch (Opacus clips each
sample's gradient, so it needs one loss per sample).
"""
from __future__ import annotations

import torch
from torch import nn
from monai.networks.layers.vector_quantizer import EMAQuantizer, VectorQuantizer
from monai.networks.nets import VQVAE as MonaiVQVAE

from models.base import Adapter, crop_to, pad_to_multiple
from models.inplane import make_in_plane, strides


@torch.no_grad()
def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code for each latent voxel of z [B, C, d, h, w] -> [B, d, h, w].

    The selection carries no gradient in VQ-VAE (the straight-through estimator bypasses
    it). Chunked so the voxels x codes distance matrix stays small for large codebooks
    (the reference uses 4000 codes)."""
    flat = z.movedim(1, -1).reshape(-1, z.shape[1]).float()
    w = codebook.detach().float()
    idx = torch.cat([torch.cdist(c, w).argmin(1) for c in flat.split(16384)])
    return idx.view(z.shape[0], *z.shape[2:])


def per_sample_perplexity(indices: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """exp(entropy) of each sample's code histogram [B]: 1 = one code used, K = all used evenly.
    MONAI's VectorQuantizer reports one number for the whole batch; per sample it averages
    over ranks and micro-batches like every other component."""
    flat = indices.flatten(1)
    counts = torch.zeros(flat.shape[0], num_embeddings, device=flat.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=counts.dtype))
    return torch.special.entr(counts / flat.shape[1]).sum(1).exp()


class GradientQuantizer(nn.Module):
    """Codebook learned by gradients; a drop-in for MONAI's EMAQuantizer inside its
    VectorQuantizer wrapper (same forward -> (quantized, loss, indices) and embed()).

    The codebook is an nn.Embedding looked up by the selected indices, so the only
    parameter-owning layer is one Opacus has a per-sample grad sampler for, and it holds
    no buffers: nothing in here changes except through the optimizer."""

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.commitment_cost = commitment_cost
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        # nn.Embedding's N(0, 1) init, as MONAI's quantizer uses: data-independent (a k-means
        # init from the data would itself be a release). In probes a small U(-1/K, 1/K) init
        # let the encoder's outputs outrun codes that Adam moves by at most lr a step (VQ
        # loss spikes to 10-100x); N(0, 1) codes already span the scale the encoder settles at.

    def embed(self, embedding_indices: torch.Tensor) -> torch.Tensor:
        # contiguous: Opacus's ghost-clipping norm sampler for Embedding `.view`s the indices
        return self.embedding(embedding_indices.contiguous()).movedim(-1, 1)

    def forward(self, inputs: torch.Tensor):
        indices = nearest_codes(inputs, self.embedding.weight)
        e = self.embed(indices)
        codebook_loss = (inputs.detach() - e).pow(2).flatten(1).mean(1)  # moves codes only
        commitment = (inputs - e.detach()).pow(2).flatten(1).mean(1)  # moves the encoder only
        loss = codebook_loss + self.commitment_cost * commitment
        quantized = inputs + (e - inputs).detach()  # straight-through: decoder grads reach the encoder
        return quantized, loss, indices


class PerSampleEMAQuantizer(EMAQuantizer):
    """MONAI's EMA quantizer with its commitment loss kept per sample (MONAI averages it
    over the batch, which is the same gradient but not a per-sample loss)."""

    def forward(self, inputs: torch.Tensor):
        quantized, _, indices = super().forward(inputs)
        # quantized = inputs + sg[e - inputs], so sg[quantized] is the selected code e.
        commitment = (quantized.detach() - inputs).pow(2).flatten(1).mean(1)
        return quantized, self.commitment_cost * commitment, indices


class PaddedVQVAE(nn.Module):
    """MONAI's VQVAE with a swappable quantizer, for any (D, H, W): pads to the total
    stride and crops back. `net.quantizer` keeps MONAI's VectorQuantizer wrapper, so
    MONAI's own methods (index_quantize, decode_samples, ...) keep working."""

    def __init__(self, cfg):
        super().__init__()
        levels = len(cfg.channels)
        self.stride = strides(levels, cfg.downsample)  # (D, H, W)
        # (stride, kernel, dilation, padding[, output_padding]): the first level keeps the
        # size, each later one halves it; the decoder mirrors that, doubling with k=4, s=2.
        down = [(1, 3, 1, 1)] + [(2, 4, 1, 1)] * (levels - 1)
        up = [(2, 4, 1, 1, 0)] * (levels - 1) + [(1, 3, 1, 1, 0)]
        self.net = MonaiVQVAE(
            spatial_dims=3, in_channels=1, out_channels=1, channels=tuple(cfg.channels),
            num_res_layers=cfg.num_res_layers, num_res_channels=tuple(cfg.num_res_channels or cfg.channels),
            downsample_parameters=down, upsample_parameters=up,
            num_embeddings=cfg.num_embeddings, embedding_dim=cfg.embedding_dim,
            output_act="sigmoid",  # images live in [0, 1]; the reference model ends in a sigmoid too
        )
        if cfg.downsample == "in_plane":  # before the quantizer swap: it has no strided layers anyway
            make_in_plane(self.net)
        if cfg.codebook == "gradient":
            inner = GradientQuantizer(cfg.num_embeddings, cfg.embedding_dim, cfg.commitment_cost)
        else:
            # ddp_sync off: MONAI all-reduces inside forward, and ranks run different numbers
            # of forwards per step (uneven micro-batches, empty shards), which would hang.
            # The price: each rank's EMA codebook drifts on its own shard in multi-rank runs.
            inner = PerSampleEMAQuantizer(spatial_dims=3, num_embeddings=cfg.num_embeddings,
                                          embedding_dim=cfg.embedding_dim, commitment_cost=cfg.commitment_cost,
                                          decay=cfg.ema_decay, ddp_sync=False)
        self.net.quantizer = VectorQuantizer(inner)

    @property
    def quantizer(self) -> nn.Module:
        return self.net.quantizer.quantizer

    def snap(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code vectors for z, without any codebook update (also in EMA mode)."""
        return self.quantizer.embed(nearest_codes(z, self.quantizer.embedding.weight))

    def forward(self, x):
        x, spatial = pad_to_multiple(x, self.stride)
        quantized, vq_loss, indices = self.quantizer(self.net.encode(x))
        return crop_to(self.net.decode(quantized), spatial), vq_loss, indices


class VQVAE(Adapter):
    family = "vq_vae"
    components = ("recon", "vq", "perplexity")

    @staticmethod
    def dp_compatible(cfg) -> tuple[bool, str]:
        """Whether DP-SGD covers everything this config learns from the data."""
        if cfg.codebook == "ema":
            return False, ("codebook 'ema' updates the codebook from raw encoder outputs outside "
                           "DP-SGD's clipping and noise; use codebook 'gradient' with DP")
        return True, ""

    def build(self) -> nn.Module:
        return PaddedVQVAE(self.cfg)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(embedding_dim, d, h, w) of `encode_latent` for volumes of `self.shape`."""
        return (self.cfg.embedding_dim, *(-(-n // s) for n, s in zip(self.shape, self.network.stride)))

    def per_sample_loss(self, net, batch):
        x = batch["image"]
        recon, vq, indices = net(x)
        err = (recon - x).abs() if self.cfg.recon_loss == "l1" else (recon - x) ** 2
        recon_loss = err.flatten(1).mean(1)
        perplexity = per_sample_perplexity(indices, self.cfg.num_embeddings)
        return recon_loss + vq, {"recon": recon_loss.detach(), "vq": vq.detach(), "perplexity": perplexity}

    @torch.no_grad()
    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Quantized code vectors [B, embedding_dim, d, h, w] (deterministic, no codebook update)."""
        net = self.network
        x, _ = pad_to_multiple(x, net.stride)
        return net.snap(net.net.encode(x))

    @torch.no_grad()
    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Volumes [B, 1, *self.shape] in [0, 1] from latents; z is snapped to the codebook
        first, so a diffusion model's continuous output decodes like a real code map."""
        net = self.network
        return crop_to(net.net.decode(net.snap(z)), self.shape)
