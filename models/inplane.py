"""In-plane compression: strided layers that halve H and W and leave depth alone.

Cardiac short-axis volumes are a few thick slices (13) of fine in-plane pixels (96 x 96).
The reference paper (Daum et al. 2024) compresses them in-plane only: 13 x 96 x 96 ->
a latent of 13 x 24 x 24 at 4x, and its diffusion UNet's strided layers do not mix
slices. MONAI's AutoencoderKL, VQVAE and DiffusionModelUNet hard-code isotropic strides
(VQVAE even refuses tuple strides), so `make_in_plane` rewrites a built network: every
layer that strides by 2 (convolution, transposed convolution, pooling, nearest upsampling)
strides by (1, 2, 2) with a depth-1 kernel. Depth is still mixed, by the unstrided
3 x 3 x 3 convolutions of the residual blocks; only the resampling is in-plane.
"""
from __future__ import annotations

from torch import nn

# MONAI's AutoencoderKL pads (0, 1) on every axis before its stride-2, unpadded convolution
from monai.networks.nets.autoencoderkl import AsymmetricPad


def strides(levels: int, downsample: str) -> tuple[int, int, int]:
    """Total (D, H, W) stride of a network with `levels` levels, each after the first halving."""
    s = 2 ** (levels - 1)
    return (1, s, s) if downsample == "in_plane" else (s, s, s)


def _in_plane_conv(m: nn.Module) -> nn.Module:
    k, p, d = m.kernel_size, m.padding, m.dilation
    kw = dict(kernel_size=(1, k[1], k[2]), stride=(1, m.stride[1], m.stride[2]), padding=(0, p[1], p[2]),
              dilation=(1, d[1], d[2]), groups=m.groups, bias=m.bias is not None)
    if isinstance(m, nn.ConvTranspose3d):
        op = m.output_padding
        return nn.ConvTranspose3d(m.in_channels, m.out_channels, output_padding=(0, op[1], op[2]), **kw)
    return nn.Conv3d(m.in_channels, m.out_channels, padding_mode=m.padding_mode, **kw)


def _strided(m: nn.Module) -> bool:
    if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
        return tuple(m.stride) != (1, 1, 1)
    if isinstance(m, (nn.AvgPool3d, nn.MaxPool3d)):
        return m.stride not in (1, (1, 1, 1))
    if isinstance(m, nn.Upsample):
        f = m.scale_factor
        return f is not None and any(v != 1 for v in (f if isinstance(f, tuple) else (f,)))
    return False


def make_in_plane(net: nn.Module) -> int:
    """Rewrite every stride-2 layer of `net` (in place) to stride (1, 2, 2); returns how many.

    Raises if a strided layer is not an isotropic factor 2, so a MONAI release that changes
    its resampling layers fails here rather than silently mixing depth."""
    count = 0
    for parent in list(net.modules()):
        for name, m in list(parent.named_children()):
            if isinstance(m, AsymmetricPad):
                m.pad = (0, 1, 0, 1, 0, 0)  # F.pad order: (W lo, W hi, H lo, H hi, D lo, D hi)
            if not _strided(m):
                continue
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                if tuple(m.stride) != (2, 2, 2):
                    raise ValueError(f"{name}: expected stride 2, got {m.stride}")
                setattr(parent, name, _in_plane_conv(m))
            elif isinstance(m, (nn.AvgPool3d, nn.MaxPool3d)):
                setattr(parent, name, type(m)(kernel_size=(1, 2, 2), stride=(1, 2, 2)))
            else:  # nn.Upsample
                m.scale_factor = (1.0, 2.0, 2.0)
            count += 1
    return count
