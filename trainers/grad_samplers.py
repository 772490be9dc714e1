"""Per-sample gradients of 3D convolutions from what the one backward already holds.

Opacus computes a layer's per-sample gradients from the activations its forward hook saved
and the output gradients its backward hook receives. For Conv3d it unfolds the input
(27x the activation for k = 3) and multiplies; for ConvTranspose3d it has no rule, so it
falls back to functorch, which re-runs the layer's forward inside vmap (Opacus issue 521).
Both cost several times the layer's own backward. Written by hand because no maintained
library has this for 3D convolutions (fastDP does not register Conv3d; private-vision pays a
second backward); registered through Opacus's own registries, so every Opacus mode that
looks a sampler up (hooks, ghost, and `bk` in trainers/book_keeping.py) uses it.

Two ways to get what clipping needs from (activations a, output gradients g), per layer:

* Instantiate: sample b's weight gradient is the weight gradient of the same convolution
  run on sample b alone. Folding the batch into the channel groups (input [1, B*Cin, ...],
  weight [B*Cout, Cin, k...], groups B) turns the B per-sample gradients into ONE call of
  the weight-gradient kernel the ordinary backward uses: same arithmetic as the batch
  weight gradient, no unfold, no forward re-run.
* Ghost norm (Li et al. 2022, "Large language models can be strong differentially private
  learners"): ||sum_t g_t a_t^T||^2 = <A A^T, G G^T> over the T output positions, with A the
  unfolded activations [T, d] and G the output gradients [T, p]. It costs T^2 (p + d) against
  T p d for instantiating and holds 2 T^2 numbers against p d (Bu et al. 2023, "Differentially
  private optimization on large model at small cost"), so it pays for layers with few
  positions: deep, small layers, label and time embeddings.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List

import torch
import torch.nn as nn
from opacus.grad_sample.conv import compute_conv_grad_sample as _opacus_conv
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler
from opacus.utils.tensor_utils import unfold3d

aten = torch.ops.aten
CONVS = (nn.Conv3d, nn.ConvTranspose3d)


def _plain(layer: nn.Module) -> bool:
    """Zero-padded, integer-padded: the activations the hook saved are what the kernel saw."""
    return not isinstance(layer.padding, str) and layer.padding_mode == "zeros"


def _conv_backward(layer, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, groups: int, mask):
    transposed = isinstance(layer, nn.ConvTranspose3d)
    out_pad = list(layer.output_padding) if transposed else [0] * (x.dim() - 2)
    bias_sizes = [weight.shape[1] * groups if transposed else weight.shape[0]]
    return aten.convolution_backward(g, x, weight, bias_sizes, list(layer.stride), list(layer.padding),
                                     list(layer.dilation), transposed, out_pad, groups, mask)


def _grouped(layer, x, g):
    """The batch folded into the channel groups: one weight-gradient call for all samples."""
    b = x.shape[0]
    x1 = x.contiguous().reshape(1, b * x.shape[1], *x.shape[2:])
    g1 = g.contiguous().reshape(1, b * g.shape[1], *g.shape[2:])
    w = layer.weight.detach().to(g.dtype).contiguous()
    w_b = w.expand(b, *w.shape).reshape(b * w.shape[0], *w.shape[1:])  # only its shape is read
    return _conv_backward(layer, x1, g1, w_b, b * layer.groups, [False, True, False])[1].view(b, *w.shape)


def _per_sample_calls(layer, x, g):
    """One weight-gradient call per sample, in the tensors' own memory layout."""
    w = layer.weight.detach().to(g.dtype)
    return torch.stack([_conv_backward(layer, x[i:i + 1], g[i:i + 1], w, layer.groups, [False, True, False])[1]
                        for i in range(x.shape[0])])


def _unfolded(layer, x, g):
    """Unfold + einsum: for few input channels (the first layer), where the unfolded input
    is small and the grouped kernel has one channel per group to work with."""
    b, c = x.shape[:2]
    a = unfold3d(x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                 dilation=layer.dilation)  # [B, Cin k^3, T]
    return torch.einsum("bdt,bpt->bpd", a, g.reshape(b, g.shape[1], -1)).reshape(b, *layer.weight.shape)


def _methods(layer, x):
    methods = {"grouped": _grouped, "per_sample_calls": _per_sample_calls}
    if isinstance(layer, nn.Conv3d) and layer.groups == 1 and layer.weight[0].numel() <= 64:
        methods["unfolded"] = _unfolded  # the unfolded input is Cin k^3 <= 64 times the input
    return methods


# Which method is fastest depends on the layer's shape, the memory layout and the machine
# (on this CPU: grouped for most layers in the default layout, per-sample calls for some
# channels_last_3d layers, unfold for one input channel). Each layer signature is timed once,
# on its first batch, and the winner cached: every method computes the same numbers.
_CHOICE: dict = {}
FORCE_METHOD = None  # tests set this to check every method against a direct computation


def _timed(f, *args):
    sync = torch.cuda.synchronize if args[1].is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = f(*args)
    sync()
    return time.perf_counter() - t0, out


def conv_per_sample_weight_grad(layer, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[B, *weight.shape]: each sample's weight gradient, by the method measured fastest."""
    methods = _methods(layer, x)
    if FORCE_METHOD is not None:
        return methods[FORCE_METHOD](layer, x, g).to(layer.weight.dtype)
    # The batch size is left out of the key: a Poisson batch's last micro-batch varies in size,
    # and the ranking of the methods does not hinge on it.
    key = (type(layer), tuple(x.shape[1:]), tuple(g.shape[1:]), tuple(layer.weight.shape), layer.stride, layer.padding,
           layer.dilation, layer.groups, x.dtype, x.device.type, x.is_contiguous(), g.is_contiguous())
    if key not in _CHOICE:
        # Round-robin, best of three: other load on the machine only ever adds time.
        times = {name: math.inf for name in methods}
        for _ in range(3):
            for name, f in methods.items():
                times[name] = min(times[name], _timed(f, layer, x, g)[0])
        _CHOICE[key] = min(times, key=times.get)
    return methods[_CHOICE[key]](layer, x, g).to(layer.weight.dtype)


@register_grad_sampler(list(CONVS))
def conv_grad_sample(layer, activations: List[torch.Tensor], backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    x = activations[0].to(backprops.dtype)
    if not _plain(layer):
        if isinstance(layer, nn.ConvTranspose3d):
            raise NotImplementedError("ConvTranspose3d with non-zero padding mode")
        return _opacus_conv(layer, activations, backprops)
    ret = {}
    if x.shape[0] == 0:
        ret[layer.weight] = torch.zeros((0, *layer.weight.shape), dtype=x.dtype, device=x.device)
    elif layer.weight.requires_grad:
        ret[layer.weight] = conv_per_sample_weight_grad(layer, x, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.flatten(2).sum(2).to(layer.bias.dtype)
    return ret


# --- ghost norms -----------------------------------------------------------------------------
def positions(layer: nn.Module, backprops: torch.Tensor) -> int:
    """T: output positions per row that share the weight (spatial voxels or tokens)."""
    if isinstance(layer, nn.Linear):
        return backprops[0].numel() // backprops.shape[-1]
    return backprops[0, 0].numel()


def ghost_is_cheaper(layer: nn.Module, t: int) -> bool:
    """Ghost norm where it costs less arithmetic than instantiating, for layers where a
    Gram-matrix norm is implemented. Per sample, two Gram matrices take T^2 (p + d)
    multiply-adds against T p d for the per-sample gradient. Bu et al.'s 2 T^2 <= p d
    compares memory (2 T^2 numbers against p d) and is implied by this rule (p + d >=
    2 sqrt(p d)); used alone it picked a Conv3d of the LDM (T = 256, p = 64, d = 3456) whose
    Gram matrices cost 4x the arithmetic."""
    if isinstance(layer, nn.Linear):
        p, d = layer.out_features, layer.in_features
    elif isinstance(layer, nn.Conv3d) and _plain(layer) and layer.groups == 1:
        p, d = layer.out_channels, layer.weight[0].numel()
    else:
        return False
    return t * (p + d) <= p * d


def _rows_as_positions(a: torch.Tensor, g: torch.Tensor, rows):
    """[rows, T, .] -> [units, R * T, .]: a unit's gradient sums its rows, so its rows' positions
    are positions of one unit. `rows`: K rows per unit (an int), or the unit of each row (a
    tensor; a subject's volumes, each possibly K rows): units with fewer than R rows are
    padded with zero rows, which add nothing to a Gram matrix."""
    if isinstance(rows, int):
        k = rows
        return a.reshape(a.shape[0] // k, k * a.shape[1], a.shape[2]), g.reshape(g.shape[0] // k, k * g.shape[1], g.shape[2])
    units = rows.to(a.device).long()
    counts = torch.bincount(units)
    order = torch.argsort(units, stable=True)
    slot = torch.arange(len(units), device=a.device) - (torch.cumsum(counts, 0) - counts)[units[order]]
    out = []
    for t in (a, g):
        padded = t.new_zeros((len(counts), int(counts.max()), *t.shape[1:]))
        padded[units[order], slot] = t[order]
        out.append(padded.reshape(len(counts), -1, t.shape[2]))
    return out[0], out[1]


def ghost_sq_norms(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, rows_per_sample=1) -> torch.Tensor:
    """[units]: squared norm of each unit's gradient over the layer's weight and bias, from
    Gram matrices of activations and output gradients (no per-sample gradient). A unit is a
    sample of `rows_per_sample` rows (an int), or, given the unit of each row (a tensor), a
    subject's rows."""
    x = x.to(g.dtype)
    if isinstance(layer, nn.Linear):
        a, gg = x.reshape(x.shape[0], -1, x.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
    else:
        a = unfold3d(x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                     dilation=layer.dilation).transpose(1, 2)  # [rows, T, Cin k^3]
        gg = g.flatten(2).transpose(1, 2)  # [rows, T, Cout]
    a, gg = _rows_as_positions(a, gg, rows_per_sample)
    sq = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(gg, gg.transpose(1, 2))).flatten(1).sum(1)
    if layer.bias is not None and layer.bias.requires_grad:
        sq = sq + gg.sum(1).pow(2).sum(1)
    return sq


def clipped_sum(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, coef_rows: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """sum_b coef_b * (sample b's gradient), by re-using the saved activations and output
    gradients with each row's output gradient scaled: one batched weight-gradient call."""
    x = x.to(g.dtype)
    gs = g * coef_rows.view(-1, *[1] * (g.dim() - 1)).to(g.dtype)
    out = {}
    if isinstance(layer, nn.Linear):
        out[layer.weight] = torch.einsum("n...i,n...j->ij", gs, x).to(layer.weight.dtype)
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = gs.reshape(-1, gs.shape[-1]).sum(0).to(layer.bias.dtype)
        return out
    want_bias = layer.bias is not None and layer.bias.requires_grad
    _, gw, gb = _conv_backward(layer, x, gs, layer.weight.detach().to(g.dtype), layer.groups, [False, True, want_bias])
    out[layer.weight] = gw.to(layer.weight.dtype)
    if want_bias:
        out[layer.bias] = gb.to(layer.bias.dtype)
    return out


@register_norm_sampler(list(CONVS))
def conv_norm_sample(layer, activations: List[torch.Tensor], backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """For Opacus's ghost mode: Gram-matrix norms where cheaper, else norms of the
    instantiated per-sample gradients. The layer's whole norm goes on the weight (the bias
    gets zeros), which is all Opacus reads: it takes the norm over parameters."""
    x = activations[0]
    if ghost_is_cheaper(layer, positions(layer, backprops)):
        sq = ghost_sq_norms(layer, x, backprops)
    else:
        sq = sum(gs.flatten(1).pow(2).sum(1) for gs in conv_grad_sample(layer, activations, backprops).values())
    ret = {layer.weight: sq.sqrt()}
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = torch.zeros_like(sq)
    return ret
