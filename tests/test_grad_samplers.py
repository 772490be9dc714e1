"""The 3D convolution samplers (trainers/grad_samplers.py) and the book-keeping module
(trainers/book_keeping.py) against direct per-sample autograd, layer by layer."""
import pytest
import torch
from torch import nn

import trainers.grad_samplers as gs
from trainers.book_keeping import BookKeepingGradSampleModule

torch.set_num_threads(1)
CL = torch.channels_last_3d
LAYERS = {
    "conv-1ch": lambda: nn.Conv3d(1, 4, 3, padding=1),
    "conv-strided": lambda: nn.Conv3d(3, 4, 4, stride=2, padding=1),
    "conv-inplane-dilated": lambda: nn.Conv3d(2, 3, (1, 3, 3), padding=(0, 2, 2), dilation=(1, 2, 2), bias=False),
    "convT": lambda: nn.ConvTranspose3d(4, 3, 4, stride=2, padding=1),
    "convT-outpad": lambda: nn.ConvTranspose3d(2, 3, 3, stride=2, padding=1, output_padding=1),
}


def close(a, b, msg=""):
    """Equal up to float32 rounding, measured against the tensor's norm (single entries of
    sums with cancellation carry larger relative errors)."""
    assert a.shape == b.shape, msg
    assert (a - b).norm() <= 1e-5 * b.norm() + 1e-7, f"{msg}: error {(a - b).norm():.2e}, norm {b.norm():.2e}"


def direct(layer, x, g):
    """Sample i's gradient of <layer(x_i), g_i>: a plain backward per sample."""
    params = [p for p in layer.parameters()]
    return [torch.autograd.grad((layer(x[i:i + 1]) * g[i:i + 1]).sum(), params) for i in range(len(x))]


def case(name, layout, b=3):
    torch.manual_seed(0)
    layer = LAYERS[name]().to(memory_format=layout)
    spatial = (3, 4, 4) if isinstance(layer, nn.ConvTranspose3d) else (5, 8, 8)
    x = torch.randn(b, layer.in_channels, *spatial).contiguous(memory_format=layout)
    g = torch.randn_like(layer(x))
    return layer, x, g


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["default", "channels_last_3d"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_every_method_gives_each_samples_gradient(name, layout):
    layer, x, g = case(name, layout)
    want = direct(layer, x, g)
    methods = list(gs._methods(layer, x)) + [None]  # None: the autotuned choice
    try:
        for m in methods:
            gs.FORCE_METHOD = m
            got = gs.conv_grad_sample(layer, [x], g)
            for j, p in enumerate(layer.parameters()):
                for i in range(len(x)):
                    close(got[p][i], want[i][j], f"{name} {m} sample {i}")
    finally:
        gs.FORCE_METHOD = None


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("name", ["conv-1ch", "conv-strided", "conv-inplane-dilated", "linear-tokens", "linear-flat"])
def test_ghost_norms_and_weighted_reuse(name, k):
    """Gram-matrix norms equal the instantiated per-sample norms (K rows summed per sample),
    and the re-use with scaled output gradients equals the weighted sum of those gradients."""
    torch.manual_seed(0)
    rows = 4 * k
    if name.startswith("linear"):
        layer = nn.Linear(5, 3)
        x = torch.randn(rows, 7, 5) if name == "linear-tokens" else torch.randn(rows, 5)
        g = torch.randn_like(layer(x))
    else:
        layer, x, g = case(name, torch.contiguous_format, b=rows)
    params = list(layer.parameters())
    per_row = [torch.autograd.grad((layer(x[i:i + 1]) * g[i:i + 1]).sum(), params) for i in range(rows)]
    per_sample = [[sum(per_row[s * k + r][j] for r in range(k)) for j in range(len(params))] for s in range(rows // k)]
    want_sq = torch.stack([sum((t ** 2).sum() for t in ps) for ps in per_sample])
    close(gs.ghost_sq_norms(layer, x, g, k), want_sq, "norms")

    coef = torch.rand(rows // k)
    got = gs.clipped_sum(layer, x, g, coef.repeat_interleave(k))
    for j, p in enumerate(params):
        close(got[p], sum(c * ps[j] for c, ps in zip(coef, per_sample)), f"clipped sum, param {j}")


def test_cost_rule():
    # T (p + d) <= p d (arithmetic); Bu et al.'s 2 T^2 <= p d (memory) would allow T <= 235 here
    conv = nn.Conv3d(64, 64, 3)  # p = 64, d = 1728
    assert gs.ghost_is_cheaper(conv, 61) and not gs.ghost_is_cheaper(conv, 62)
    assert not gs.ghost_is_cheaper(nn.Conv3d(128, 64, 3), 256)  # the LDM layer where 2 T^2 <= p d misleads
    assert not gs.ghost_is_cheaper(nn.ConvTranspose3d(64, 64, 3), 1)  # no Gram norm for transposed convs
    assert gs.ghost_is_cheaper(nn.Linear(64, 64), 32) and not gs.ghost_is_cheaper(nn.Linear(64, 64), 33)


def test_one_backward_skips_the_batch_weight_gradient():
    """In `bk` mode autograd never computes the (discarded) batch weight or bias gradient of
    a conv or linear layer (oneDNN computes a conv's weight gradient whenever its bias
    gradient is asked for); the hooks still give per-sample gradients, and the parameters
    are trainable again after the forward (the optimizer updates them)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.SiLU(), nn.Conv3d(4, 2, 3, bias=False), nn.SiLU(),
                        nn.Conv3d(2, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 3 * 6 * 6, 3, bias=False))
    gsm = BookKeepingGradSampleModule(net, ghost=False)
    x = torch.randn(2, 1, 5, 8, 8)
    out = gsm(x)
    assert all(p.requires_grad for p in net.parameters())
    out.sum().backward()
    for layer in (net[0], net[2], net[4], net[6]):
        assert layer.weight.grad is None and layer.weight.grad_sample.shape == (2, *layer.weight.shape)
    # the first layer keeps its bias gradient (cheaper than the input gradient that would
    # otherwise keep it in the graph); the second layer's bias-free weight gradient is skipped
    assert net[0].bias.grad is not None and net[0].bias.grad_sample.shape == (2, 4)
    # a later layer's bias gradient is skipped too (oneDNN would compute the weight gradient with it)
    assert net[4].bias.grad is None and net[4].bias.grad_sample.shape == (2, 2)
    gsm.disable_hooks()
    want = direct(net, x, torch.ones(2, 3))
    for j, p in enumerate(net.parameters()):
        close(p.grad_sample, torch.stack([w[j] for w in want]), f"param {j}")
