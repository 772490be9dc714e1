"""An empirical lower bound on epsilon from one training run, and the canaries it needs.

Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run" (NeurIPS 2023).
M canaries are each included in the training run independently with probability 1/2 (a
secret coin, OS entropy). After training, an auditor scores every canary, guesses "in" for
the k highest scores and "out" for the k lowest, and abstains on the rest. Under
(eps, delta)-DP the number of correct guesses is stochastically dominated by
Binomial(r, e^eps / (1 + e^eps)) plus a delta term (the paper's Theorem 3.1), so an observed
count that this tail makes unlikely (p-value below 5%) rejects eps: `epsilon_lower` is the
largest eps so rejected. A correct DP-SGD can only be audited below its claimed epsilon
(up to the 5% error of the test); an audit above it means the training is not the
mechanism the accountant was told about.

White-box gradient canaries (`audit.kind: gradient`): canary i is a record whose gradient,
at every step, is the Dirac vector C e_j(i) on one coordinate j(i) of the parameter vector
(norm C: it is at the clip bound, and clipping leaves it unchanged). Each step it joins the
Poisson batch with the run's probability q (only if its coin put it in the dataset); its
score is the sum over steps of the noisy aggregated gradient on j(i). See GradientCanaries
for where it enters the step.

Black-box input canaries (`audit.kind: input`: crafted volumes in the training set, scored
by the final model's loss) are named by the schema but not implemented yet: the sweep file
is refused with one line.

The bound is computed here with scipy, written from the paper (its Algorithm / appendix
code); no library implements it for PyTorch.
"""
from __future__ import annotations

import math
import secrets
from typing import Sequence

import numpy as np
import scipy.optimize
import scipy.stats
import torch
import torch.distributed as dist

CONFIDENCE = 0.95
# Guess on this fraction of the canaries (half "in" from the top, half "out" from the
# bottom). The best of the grid is reported, at CONFIDENCE jointly over the grid
# (Bonferroni: each k is tested at (1 - CONFIDENCE) / len(grid)).
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


# ------------------------------------------------------------------------------------
# The bound

def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] for an (eps, delta)-DP run with m canaries
    (Steinke et al. 2023, Theorem 3.1): the binomial tail with p = e^eps / (1 + e^eps),
    plus 2 m delta times the largest mean mass alpha = max_i P[v - i <= W < v] / i."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"expected 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
    p = 1.0 / (1.0 + math.exp(-eps))
    beta = float(scipy.stats.binom.sf(v - 1, r, p))          # P[W >= v]
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    mass = scipy.stats.binom.sf(v - i - 1, r, p) - beta      # P[v - i <= W < v]
    alpha = float(np.max(mass / i))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """The largest eps that v correct guesses out of r (m canaries) reject at `significance`:
    p_value grows with eps, so this is where it crosses `significance`; 0 if even eps = 0
    is not rejected."""
    def excess(eps):
        return p_value(m, r, v, eps, delta) - significance

    if r == 0 or excess(0.0) >= 0:
        return 0.0
    hi = 1.0
    while excess(hi) < 0:
        if hi > 1e3:
            return hi
        hi *= 2
    return float(scipy.optimize.brentq(excess, 0.0, hi, xtol=1e-6))


def k_grid(m: int) -> list[int]:
    """Guesses per side: k "in" (top scores) and k "out" (bottom scores)."""
    return sorted({min(m // 2, max(1, round(f * m / 2))) for f in GUESS_FRACTIONS})


def audit_bound(scores: Sequence[float], included: Sequence[bool], delta: float,
                confidence: float = CONFIDENCE) -> dict:
    """The audit's result: the best bound over the k grid, with its guesses and correct count.
    Only the ranking of `scores` is used; `included` (the coins) only counts correct guesses."""
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    m = len(scores)
    grid = k_grid(m)
    order = np.argsort(-scores, kind="stable")
    best = {"audit/epsilon_lower": 0.0, "audit/canaries": m, "audit/guesses": 0, "audit/correct": 0}
    for k in grid:
        correct = int(included[order[:k]].sum() + (~included[order[m - k:]]).sum())
        eps = epsilon_lower(m, 2 * k, correct, delta, (1 - confidence) / len(grid))
        if eps > best["audit/epsilon_lower"]:
            best.update({"audit/epsilon_lower": eps, "audit/guesses": 2 * k, "audit/correct": correct})
    return best


# ------------------------------------------------------------------------------------
# Gradient canaries

class GradientCanaries:
    """M Dirac gradient canaries riding on DP-SGD's steps.

    Where they enter: a step pre-hook on the plain torch optimizer under the DP stepper.
    Every stepper `make_dp_stepper` returns (Opacus's DPOptimizer, ghost clipping,
    book-keeping) ends a logical step the same way: p.grad = (sum of clipped per-sample
    gradients + N(0, (sigma C)^2)) / (q n), all-reduced over ranks, then the plain
    optimizer's step. Noise is additive and independent of the records, so adding the
    included canaries' clipped gradients C e_j / (q n) there is the same as adding them to
    the clipped sum before the noise (on rank 0 before the all-reduce). With several ranks
    every rank adds the identical increment (one secret seed, drawn from OS entropy on rank
    0 and broadcast), so the ranks' weights stay equal and the sum counts each canary once.

    Scoring: the same hook reads the noisy aggregated gradient on each canary's coordinate,
    times q n (the noisy sum), and adds it to the canary's score.

    Coordinates: drawn uniformly without replacement among the weights of layers (tensors
    of 2 or more dimensions). Biases and normalisation scales are left out: every position
    of a feature map adds to their gradient, so real records pull hardest on them, and that
    pull is noise for the audit (it never invalidates the bound, which rests on the coins
    only, but it lowers its power).
    """

    def __init__(self, params: Sequence[torch.Tensor], canaries: int, *, max_grad_norm: float, sample_rate: float,
                 expected_batch: float, rank: int = 0, world_size: int = 1):
        seed = torch.tensor([secrets.randbits(62) if rank == 0 else 0], dtype=torch.int64)
        if world_size > 1:
            dist.broadcast(seed, src=0)
        self._rng = np.random.default_rng(int(seed.item()))
        self.params = [p for p in params if p.requires_grad]
        self.m, self.q, self.expected_batch = int(canaries), float(sample_rate), float(expected_batch)
        # The canary's gradient, clipped as Opacus clips a record (factor C / (norm + 1e-6)).
        norm = float(max_grad_norm)
        self.clipped = norm * min(1.0, max_grad_norm / (norm + 1e-6))
        pool = [i for i, p in enumerate(self.params) if p.dim() >= 2]
        if sum(self.params[i].numel() for i in pool) < self.m:
            pool = list(range(len(self.params)))
        sizes = np.array([self.params[i].numel() for i in pool])
        if sizes.sum() < self.m:
            raise ValueError(f"audit.canaries: {self.m} canaries need {self.m} distinct coordinates; "
                             f"the model has {int(sizes.sum())} trainable parameters")
        flat = self._rng.choice(int(sizes.sum()), size=self.m, replace=False)
        owner = np.searchsorted(np.cumsum(sizes), flat, side="right")
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.slots = []   # (param, local flat indices, canary ids)
        for k in np.unique(owner):
            ids = np.nonzero(owner == k)[0]
            p = self.params[pool[k]]
            self.slots.append((p, torch.as_tensor(flat[ids] - starts[k], device=p.device),
                               torch.as_tensor(ids, device=p.device)))
        self.included = self._rng.random(self.m) < 0.5      # the secret coins: never logged
        self.scores = np.zeros(self.m)
        self.steps = 0
        self._handle = None

    def attach(self, optimizer: torch.optim.Optimizer) -> "GradientCanaries":
        """`optimizer`: the plain torch optimizer the DP stepper steps last."""
        self._handle = optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.step())
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def step(self) -> None:
        # Poisson: each included canary joins this step's batch with probability q.
        joined = (self._rng.random(self.m) < self.q) & self.included
        add = torch.as_tensor(joined * (self.clipped / self.expected_batch))
        for p, local, ids in self.slots:
            g = p.grad.view(-1)
            g.index_add_(0, local, add.to(device=g.device, dtype=g.dtype)[ids])
            noisy_sum = (g[local] * self.expected_batch).double().cpu().numpy()
            self.scores[ids.cpu().numpy()] += noisy_sum
        self.steps += 1

    def result(self, delta: float) -> dict:
        """The audit (after the last step): the bound and what it rests on."""
        return {**audit_bound(self.scores, self.included, delta), "audit/steps": self.steps}
