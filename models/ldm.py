"""Label-conditioned (latent) diffusion model on MONAI's DiffusionModelUNet.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models"): a DDPM (Ho et al. 2020) learns to denoise the latents of a FROZEN compression model
(or the image itself when there is none). Labels reach the UNet by cross-attention over one
token per label (`label_conditioning: cross_attention`, the reference LDM's way), through the
timestep embedding that every residual block receives (`embedding`: the tokens, concatenated,
through one Linear added to it, as class-conditional DDPMs do), or both. Label dropout during
training gives classifier-free guidance at sampling (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"); sampling uses deterministic DDIM
(Song et al. 2021, "Denoising Diffusion Implicit Models").

Privacy notes (this model is trained with DP-SGD through Opacus):
* The latent scale factor is never computed here: the reference code computed it from the
  first private batch, which releases a statistic of private data outside DP. It comes from
  the config, from the caller (computed on public data), or defaults to 1.0.
* Label values are never normalised with a mean/std of the data, for the same reason: dataset
  statistics would be a release. A label with a declared range (`label_ranges`, from the
  config) is mapped affinely to [-1, 1]; any other goes through the fixed sign(x) * log1p(|x|).
* The trainable module (`self.network`) holds only Linear/Embedding/Conv3d/GroupNorm/LayerNorm
  layers, for which Opacus computes per-sample gradients in hooks and functorch mode; the
  compression model is kept outside it, frozen, so Opacus never sees it.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from models.base import Adapter, crop_to, pad_to_multiple
from models.inplane import make_in_plane, strides


def squash(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * log1p(|x|): brings raw labels (volumes ~100 mL, ages ~60, flags 0/1) to a
    range of a few units with a fixed, data-independent map (no statistics of private data)."""
    return torch.sign(x) * torch.log1p(x.abs())


class LabelEmbedder(nn.Module):
    """One context token per label: [B, L] values + mask -> [B, L, E].

    Known label i: a small per-label MLP of m_i(x_i), where m_i is the affine map of the
    declared range [lo_i, hi_i] to [-1, 1] (`ranges[i]`), or squash where none is declared.
    It is written with standard layers only, so that Opacus has a per-sample gradient rule for
    every parameter: the input row of label i is [m_i(x_i) * onehot(i), onehot(i)], so the
    first Linear acts as a per-label
    slope and per-label bias (the label's identity), then SiLU and a shared output Linear.
    Unknown label i (mask False, NaN, or dropped): a learned per-label "unknown" token from an
    Embedding; the value is never fed as a number. With no labels, one learned null token.
    """

    def __init__(self, n_labels: int, dim: int, ranges: Optional[list] = None):
        super().__init__()
        self.n_labels = n_labels
        if n_labels == 0:
            self.null = nn.Embedding(1, dim)
            return
        ranges = list(ranges) if ranges is not None else [None] * n_labels
        if len(ranges) != n_labels:
            raise ValueError(f"ranges: expected one entry (or None) per label ({n_labels}), got {len(ranges)}")
        # Not persistent: they come from the config (a checkpoint's model_config), not from training.
        self.register_buffer("ranged", torch.tensor([r is not None for r in ranges]), persistent=False)
        self.register_buffer("lo", torch.tensor([float(r[0]) if r else 0.0 for r in ranges]), persistent=False)
        self.register_buffer("span", torch.tensor([float(r[1]) - float(r[0]) if r else 1.0 for r in ranges]),
                             persistent=False)
        self.value_in = nn.Linear(2 * n_labels, 2 * dim)
        self.value_out = nn.Linear(2 * dim, dim)
        self.unknown = nn.Embedding(n_labels, dim)
        self.register_buffer("eye", torch.eye(n_labels), persistent=False)
        self.register_buffer("ids", torch.arange(n_labels), persistent=False)

    def forward(self, labels: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        b = labels.shape[0]
        if self.n_labels == 0:
            return self.null(torch.zeros(b, 1, dtype=torch.long, device=labels.device))
        use = mask.bool() & ~drop.bool()[:, None] & ~torch.isnan(labels)  # [B, L]
        # where() before any arithmetic: unknown/dropped values never enter the network.
        v = self.value_map(torch.nan_to_num(labels))
        v = torch.where(use, v, torch.zeros_like(v))
        eye = self.eye.to(v.dtype)
        rows = torch.cat([v[:, :, None] * eye, eye.expand(b, -1, -1)], dim=-1)  # [B, L, 2L]
        known = self.value_out(F.silu(self.value_in(rows)))
        # contiguous: Opacus's ghost-clipping norm sampler for Embedding `.view`s the ids
        unknown = self.unknown(self.ids.expand(b, -1).contiguous())
        # Both branches stay in the graph, so every parameter gets a (possibly zero)
        # per-sample gradient in every batch; Opacus needs grad_sample on all of them.
        return torch.where(use[:, :, None], known, unknown)

    def value_map(self, labels: torch.Tensor) -> torch.Tensor:
        """[B, L] raw label values -> the numbers the embedder sees (fixed maps, no data statistic)."""
        affine = 2 * (labels - self.lo.to(labels.dtype)) / self.span.to(labels.dtype) - 1
        return torch.where(self.ranged, affine, squash(labels))


class ConditionalUNet(nn.Module):
    """Label embedder + DiffusionModelUNet: forward(x_noisy, t, labels, mask, drop) -> noise.

    `cross_attention`: the label tokens are the UNet's cross-attention context (attention
    levels only). `embedding`: `label_time` (one Linear of the concatenated tokens) is added
    to the timestep embedding, which every residual block of every level receives; MONAI's
    class-embedding slot carries it (an Identity there, so the Linear, named for the label
    path, stays ours). Both can be on; the UNet's `with_conditioning` says whether
    cross-attention is."""

    def __init__(self, embedder: LabelEmbedder, unet: DiffusionModelUNet, label_time: Optional[nn.Linear] = None):
        super().__init__()
        self.embedder, self.unet = embedder, unet
        self.label_time = label_time

    def forward(self, x, t, labels, mask, drop):
        tokens = self.embedder(labels, mask, drop)
        extra = {"class_labels": self.label_time(tokens.flatten(1))} if self.label_time is not None else {}
        return self.unet(x, timesteps=t, context=tokens if self.unet.with_conditioning else None, **extra)


class FrozenCompression:
    """Gives a trained autoencoder (PaddedAutoencoderKL, e.g. a BetaVAE adapter's network)
    the interface LDM expects: encode_latent (posterior mean, deterministic), decode_latent
    (clamped to [0, 1]) and latent_shape. A frozen copy: the caller's model is untouched."""

    def __init__(self, autoencoder: nn.Module, shape: tuple[int, int, int]):
        self.net = copy.deepcopy(autoencoder).eval().requires_grad_(False)
        self.shape = tuple(shape)
        self.latent_shape = tuple(self.encode_latent(torch.zeros(1, 1, *self.shape)).shape[1:])

    @classmethod
    def from_adapter(cls, adapter: Adapter) -> "FrozenCompression":
        return cls(adapter.network, adapter.shape)

    def parameters(self):
        return self.net.parameters()

    def _follow(self, x: torch.Tensor) -> None:
        p = next(self.net.parameters(), None)
        if p is not None and p.device != x.device:
            self.net.to(x.device)

    @torch.no_grad()
    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        self._follow(x)
        mu, _, _ = self.net.encode(x)
        return mu

    @torch.no_grad()
    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        self._follow(z)
        return self.net.decode(z, self.shape).clamp(0, 1)


class LDM(Adapter):
    """Label-conditioned diffusion in latent space (with `compression`) or image space."""

    family = "ldm"
    components = ()

    def __init__(self, cfg: Any, shape: tuple[int, int, int], n_labels: int,
                 compression: Any = None, scale_factor: Optional[float] = None,
                 label_names: Optional[list[str]] = None):
        # Set before Adapter.__init__, which calls build().
        self.compression = compression
        self.label_names = list(label_names) if label_names is not None else None
        if scale_factor is not None:
            self.scale_factor, self.scale_factor_source = float(scale_factor), "given"
        elif getattr(cfg, "scale_factor", None) is not None:
            self.scale_factor, self.scale_factor_source = float(cfg.scale_factor), "config"
        else:
            self.scale_factor, self.scale_factor_source = 1.0, "default"
        if not self.scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0, not {self.scale_factor}")
        if compression is not None:
            # Frozen: trained elsewhere, never by this DP step (a FrozenCompression, or an
            # adapter such as BetaVAE exposing encode_latent/decode_latent on `.network`).
            owner = compression if hasattr(compression, "parameters") else getattr(compression, "network", None)
            for p in (owner.parameters() if owner is not None else []):
                p.requires_grad_(False)
        super().__init__(cfg, shape, n_labels)

    def build(self) -> nn.Module:
        c = self.cfg
        self.stride = strides(len(c.channels), c.downsample)  # (D, H, W)
        self.latent_shape = (tuple(self.compression.latent_shape) if self.compression is not None
                             else (1, *self.shape))
        attention = c.attention_levels or [False] + [True] * (len(c.channels) - 1)
        cross = c.label_conditioning in ("cross_attention", "both")
        embed = c.label_conditioning in ("embedding", "both")
        unet = DiffusionModelUNet(
            spatial_dims=3, in_channels=self.latent_shape[0], out_channels=self.latent_shape[0],
            channels=tuple(c.channels), attention_levels=tuple(attention),
            num_res_blocks=c.num_res_blocks, num_head_channels=c.num_head_channels,
            norm_num_groups=c.norm_num_groups, with_conditioning=cross,
            cross_attention_dim=c.label_embedding_dim if cross else None,
            num_class_embeds=1 if embed else None,
            # torch's fused scaled_dot_product_attention: parameter-free, so per-sample
            # gradients (hooks on the Linear projections around it) are unchanged by it.
            use_flash_attention=True,
        )
        label_time = None
        if embed:
            # MONAI adds class_embedding(class_labels) to the timestep embedding; the labels'
            # Linear is computed in ConditionalUNet and passed through an Identity there.
            unet.class_embedding = nn.Identity()
            n_tokens = max(self.n_labels, 1)
            label_time = nn.Linear(n_tokens * c.label_embedding_dim, unet.block_out_channels[0] * 4)
        if c.downsample == "in_plane":  # strided layers that never mix slices, as in the reference LDM
            make_in_plane(unet)
        schedule = dict(schedule=c.beta_schedule, beta_start=c.beta_start, beta_end=c.beta_end)
        # Schedulers hold no trainable state: kept outside the network Opacus wraps.
        self.train_scheduler = DDPMScheduler(num_train_timesteps=c.num_train_timesteps, **schedule)
        self._schedule = schedule
        return ConditionalUNet(LabelEmbedder(self.n_labels, c.label_embedding_dim, self._label_ranges()),
                               unet, label_time)

    def _label_ranges(self) -> Optional[list]:
        """cfg.label_ranges in the order of the labels (None where a label has none)."""
        ranges = self.cfg.label_ranges or {}
        if not ranges:
            return None
        if self.label_names is None or len(self.label_names) != self.n_labels:
            raise ValueError("label_ranges: the model needs the label names (in data order) to place the ranges")
        unknown = sorted(set(ranges) - set(self.label_names))
        if unknown:
            raise ValueError(f"label_ranges.{unknown[0]}: not a label of the data; expected one of {self.label_names}")
        return [tuple(ranges[n]) if n in ranges else None for n in self.label_names]

    # -- data <-> diffusion space -------------------------------------------------------
    def to_diffusion(self, x: torch.Tensor, latent: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Images in [0, 1] -> scaled latents padded to the UNet stride (and the size to crop to).
        `latent`: the compression model's encoding of `x`, already computed (LatentCache)."""
        with torch.no_grad():
            if latent is not None and self.compression is not None:
                z = latent.to(x.device, x.dtype)
            else:   # image space: 2x - 1 is the usual fixed DDPM data range, not a data statistic
                z = self.compression.encode_latent(x) if self.compression is not None else 2 * x - 1
            z = z * self.scale_factor
        # Replicate-padding odd sizes; the loss covers the padded border too, so sampling
        # generates a consistent border that is cropped away at the end.
        return pad_to_multiple(z, self.stride)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """What LatentCache stores: the frozen compression model's latent of `x`, unscaled."""
        return self.compression.encode_latent(x)

    def from_diffusion(self, z: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
        z = crop_to(z, spatial) / self.scale_factor
        x = self.compression.decode_latent(z) if self.compression is not None else (z + 1) / 2
        return x.clamp(0, 1)

    # -- training -----------------------------------------------------------------------
    # Noise multiplicity K (dp.noise_multiplicity): each sample's loss is the mean over K
    # timestep/noise draws. The K draws run as K rows of the batch, so Opacus computes one
    # gradient per row; trainers/privacy.py sums each sample's K rows before clipping
    # (`rows_per_sample`), which gives the per-sample gradient of this mean, clipped once.
    noise_multiplicity: int = 1
    rows_per_sample: int = 1

    def per_sample_loss(self, net, batch):
        x = batch["image"]
        z, _ = self.to_diffusion(x, batch.get("latent"))
        b = z.shape[0]
        labels = batch["labels"].to(device=z.device, dtype=z.dtype)
        mask = batch["label_mask"].to(device=z.device, dtype=torch.bool)
        k = self.noise_multiplicity if net.training else 1
        self.rows_per_sample = k
        if k > 1:  # sample-major rows: sample i owns rows i*k .. i*k + k - 1
            z, labels, mask = (v.repeat_interleave(k, 0) for v in (z, labels, mask))
        # Per-row randomness: a timestep, a noise draw and a label-dropout coin each.
        t = torch.randint(0, self.cfg.num_train_timesteps, (b * k,), device=z.device)
        noise = torch.randn_like(z)
        drop = torch.rand(b * k, device=z.device) < self.cfg.label_dropout
        noisy = self.train_scheduler.add_noise(z, noise, t)
        pred = net(noisy, t, labels, mask, drop)
        loss = (pred - noise).pow(2).flatten(1).mean(1)
        return loss.view(b, k).mean(1), {}

    # -- sampling -----------------------------------------------------------------------
    def _prepare_labels(self, labels, label_mask, n):
        dev = next(self.network.parameters()).device
        if labels is None:
            if n is None:
                raise ValueError("give labels or n")
            labels = torch.zeros(n, self.n_labels)
        labels = torch.as_tensor(labels, dtype=torch.float32, device=dev)
        if labels.ndim == 1:
            labels = labels[None]
        n = labels.shape[0] if n is None else n
        if labels.shape[0] == 1 and n > 1:
            labels = labels.expand(n, -1)
        if labels.shape != (n, self.n_labels):
            raise ValueError(f"labels: expected shape ({n}, {self.n_labels}), got {tuple(labels.shape)}")
        mask = (torch.ones_like(labels, dtype=torch.bool) if label_mask is None
                else torch.as_tensor(label_mask, device=dev).bool().expand(n, -1))
        mask = mask & ~torch.isnan(labels)  # NaN means unknown, whatever the mask says
        return torch.nan_to_num(labels), mask, n

    @torch.no_grad()
    def sample(self, labels, label_mask=None, n=None, generator=None, num_inference_steps=None,
               guidance_scale=None, net=None) -> torch.Tensor:
        """[n, 1, D, H, W] in [0, 1]: DDIM (eta 0) with classifier-free guidance
        eps = eps_uncond + w * (eps_cond - eps_uncond); w == 1 runs the conditional pass only."""
        net = self.network if net is None else net
        labels, mask, n = self._prepare_labels(labels, label_mask, n)
        dev = labels.device
        w = self.cfg.guidance_scale if guidance_scale is None else float(guidance_scale)
        steps = num_inference_steps or self.cfg.num_inference_steps
        # Image space: clip predicted x0 to the data range; latents have no fixed range.
        sched = DDIMScheduler(num_train_timesteps=self.cfg.num_train_timesteps,
                              clip_sample=self.compression is None,
                              clip_sample_min=-self.scale_factor, clip_sample_max=self.scale_factor,
                              **self._schedule)
        sched.set_timesteps(steps)
        acp = sched.alphas_cumprod.to(dev)
        c, *spatial = self.latent_shape
        padded = [s + (-s) % m for s, m in zip(spatial, self.stride)]
        z = torch.randn((n, c, *padded), generator=generator,
                        device=generator.device if generator is not None else dev)
        z = z.to(dev)
        was_training = net.training
        net.eval()
        keep, drop_all = torch.zeros(n, dtype=torch.bool, device=dev), torch.ones(n, dtype=torch.bool, device=dev)
        ts = sched.timesteps.tolist()
        try:
            for i, t in enumerate(ts):
                tt = torch.full((n,), t, dtype=torch.long, device=dev)
                if w == 1 or w == 0:  # one pass: conditional (w 1) or unconditional (w 0)
                    eps = net(z, tt, labels, mask, drop_all if w == 0 else keep)
                else:
                    both = net(torch.cat([z, z]), torch.cat([tt, tt]), torch.cat([labels, labels]),
                               torch.cat([mask, mask]), torch.cat([keep, drop_all]))
                    cond, uncond = both.chunk(2)
                    eps = uncond + w * (cond - uncond)
                # DDIM update (eta 0) between consecutive entries of sched.timesteps. MONAI's
                # DDIMScheduler.step assumes a spacing of T // steps, but its set_timesteps
                # spaces them by linspace, so the two disagree (49 -> 33 vs 49 -> 24 at T=50,
                # 3 steps); stepping to the actual next timestep keeps DDIM exact.
                a_t = acp[t]
                a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else sched.final_alpha_cumprod.to(dev)
                x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                if sched.clip_sample:
                    x0 = x0.clamp(*sched.clip_sample_values)
                z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        finally:
            net.train(was_training)
        return self.from_diffusion(z, tuple(spatial))
