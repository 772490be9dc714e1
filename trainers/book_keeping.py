"""DP-SGD with one forward and one backward: book-keeping (Bu et al. 2023, "Differentially
private optimization on large model at small cost"), on Opacus's hooks.

The one backward gives, per layer, the saved activations and the output gradients. From
them each layer either instantiates its per-sample gradients (Opacus's grad samplers, with
trainers/grad_samplers.py for 3D convolutions) or, where a ghost norm takes less arithmetic
(grad_samplers.ghost_is_cheaper), keeps them for one. Once every layer is through, each sample's clipping factor is known, and the clipped
sum is a weighted sum of the instantiated gradients plus, for ghost layers, one weight-
gradient call on the output gradients scaled by the factors. No second backward (Opacus's
ghost mode pays one), no forward re-run (its functorch mode re-runs every layer).

One more saving: for convolutions and linear layers the ordinary backward would also
compute the batch weight gradient, which DP-SGD throws away (it needs the clipped sum). The
weight is set not to require grad while the layer's forward runs, so autograd skips that
work, and the hooks (which read only activations and output gradients) compute what DP
needs. Net cost: about one non-DP step plus clipping.

Noise multiplicity (K rows per sample) is exact in both paths: instantiated rows are summed
per sample; a ghost norm treats the K rows as K T positions of one sample.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from opacus.grad_sample import GradSampleModule
from opacus.utils.module_utils import trainable_parameters

from trainers import grad_samplers as gs
from opacus.validators import ModuleValidator
from trainers.privacy import GhostDPStepper, Stepper, row_units

# Layers whose batch weight gradient is skipped in the backward (see the module docstring).
CONVS = (nn.Conv3d, nn.ConvTranspose3d)
SKIP_WEIGHT_GRAD = CONVS + (nn.Linear,)


class BookKeepingGradSampleModule(GradSampleModule):
    """Opacus's hooks, except that a layer whose ghost norm is cheaper keeps its
    (activations, output gradients) for the stepper instead of instantiating."""

    def __init__(self, m: nn.Module, *, ghost: Optional[bool] = None):
        # ghost: None = by cost (ghost_is_cheaper), True/False = force (tests exercise both paths)
        self.ghost, self.ghost_layers = ghost, []
        super().__init__(m, batch_first=True, loss_reduction="sum", strict=False)
        for module in self.iterate_submodules(self._module):
            # Not for 1x1x1 convolutions: their weight gradient is cheap, and without a weight
            # that requires grad torch runs them on its slow (non-oneDNN) CPU path.
            pointwise = isinstance(module, CONVS) and all(k == 1 for k in module.kernel_size)
            if isinstance(module, SKIP_WEIGHT_GRAD) and module.weight.requires_grad and not pointwise:
                self.autograd_grad_sample_hooks += [
                    module.register_forward_pre_hook(self._weight_grad_off),
                    module.register_forward_hook(self._weight_grad_on, prepend=True),  # before Opacus's hook
                ]

    def _weight_grad_off(self, module, args):
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled()):
            return None
        # The bias too: oneDNN's convolution backward computes the weight gradient whenever
        # the bias gradient is asked for (an input-only backward with the bias costs as much
        # as the full one, twice an input-only backward without it: measured here). The bias's
        # per-sample gradient is the output gradient summed over positions (the grad sampler).
        # A first layer (its input needs no gradient) keeps its bias: that keeps the output in
        # the graph (so Opacus's backward hook fires) at the cost of a weight gradient, which
        # is cheaper there than the input gradient the alternative would compute.
        has_bias = module.bias is not None and module.bias.requires_grad
        skipped = [module.weight] + ([module.bias] if has_bias and args[0].requires_grad else [])
        for p in skipped:
            p.requires_grad_(False)
        module._bk_skipped = skipped
        if not has_bias and not args[0].requires_grad:
            # Nothing else would make the output require grad, and Opacus's backward hook
            # would never fire: let the input carry a gradient instead.
            return (args[0].detach().requires_grad_(), *args[1:])
        return None

    def _weight_grad_on(self, module, args, output):
        for p in getattr(module, "_bk_skipped", ()):
            p.requires_grad_(True)  # back on before Opacus's forward hook and the backward
        module._bk_skipped = ()

    def capture_backprops_hook(self, module, _forward_input, forward_output, loss_reduction, batch_first):
        if not self.hooks_enabled:
            return
        g = forward_output[0].detach()
        ghost = self.ghost if self.ghost is not None else gs.ghost_is_cheaper(module, gs.positions(module, g))
        if ghost and (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv3d) and module.groups == 1)):
            activations, g = self.rearrange_grad_samples(module=module, backprops=g, loss_reduction=loss_reduction,
                                                         batch_first=batch_first)
            self.ghost_layers.append((module, activations[0], g))
            for _, p in trainable_parameters(module):
                p._forward_counter -= 1
            if not module.activations and hasattr(module, "max_batch_len"):
                del module.max_batch_len
            return
        super().capture_backprops_hook(module, _forward_input, forward_output, loss_reduction, batch_first)


class BookKeepingDPStepper(GhostDPStepper):
    """`grad_sample_mode: bk`. Clipped per-sample gradients summed over micro-batches;
    noise (rank 0 only, then all-reduce), accounting and the optimizer step once per logical
    step, as GhostDPStepper does (inherited)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int, *,
                 noise_multiplier: float, max_grad_norm: float, sample_rate: float, n_train: int,
                 accountant: str, grad_sample_mode: str = "bk", noise_seed: Optional[int] = None,
                 ghost: Optional[bool] = None):
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(f"model is not DP-compatible: {errors[0]}")
        Stepper.__init__(self, BookKeepingGradSampleModule(model, ghost=ghost), optimizer, world_size)
        self.max_grad_norm, self.expected_batch = max_grad_norm, sample_rate * n_train
        self._init_accounting(accountant, sample_rate, noise_multiplier, noise_seed)
        self._summed = None

    def backward(self, per_sample_loss: torch.Tensor, rows_per_sample: int = 1,
                 units: Optional[torch.Tensor] = None) -> None:
        """`rows_per_sample`: K rows (noise draws) per sample; `units`: each sample's unit of
        privacy in this micro-batch (a subject); a unit's rows are summed, then clipped once."""
        k = rows_per_sample
        rows = row_units(len(per_sample_loss), k, units)   # None: one row = one unit
        n_units = len(per_sample_loss) if units is None else int(units.max()) + 1
        per_sample_loss.sum().backward()  # the one backward: hooks instantiate or book-keep
        ghosts, self.module.ghost_layers = self.module.ghost_layers, []
        # Squared norm of each unit's whole gradient: instantiated layers, then ghost layers.
        sq = torch.zeros(n_units, device=per_sample_loss.device)
        per_sample = {}
        for p in self.params:
            g = getattr(p, "grad_sample", None)
            if g is None:
                continue
            if rows is not None:  # a unit's gradient is the sum of its rows' gradients
                g = g.new_zeros((n_units, *g.shape[1:])).index_add_(0, rows.to(g.device), g)
            per_sample[p] = g
            sq += g.flatten(1).pow(2).sum(1).to(sq.dtype)
        for module, x, g in ghosts:
            sq += gs.ghost_sq_norms(module, x, g, k if units is None else rows).to(sq.dtype)
        coef = (self.max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        # The clipped sum from what the backward produced.
        clipped = {p: torch.einsum("b,b...->...", coef.to(g.dtype), g) for p, g in per_sample.items()}
        coef_rows = coef if rows is None else coef[rows.to(coef.device)]
        for module, x, g in ghosts:
            clipped.update(gs.clipped_sum(module, x, g, coef_rows))
        missing = [p for p in self.params if p not in clipped]
        if missing:
            raise RuntimeError(f"{len(missing)} parameter(s) got no per-sample gradient (first: {tuple(missing[0].shape)})")
        grads = [clipped[p] for p in self.params]
        self._summed = grads if self._summed is None else [a + b for a, b in zip(self._summed, grads)]
        for p in self.params:
            p.grad_sample = None
            p.grad = None
