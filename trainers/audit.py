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

Black-box input canaries (`audit.kind: input`): M crafted volumes (random 0/1 voxels,
far from any anatomy) that are training records like any other: an included canary joins
each step's Poisson batch with probability q, is clipped, and its gradient goes under the
same noise; its score is minus the final model's loss on it. See InputCanaries.

The secret (one 62-bit seed from OS entropy, from which the coins, the coordinates and the
volumes derive) is never logged, to MLflow or the console. It is saved in the trial's
checkpoint (`state_dict`), which the data custodian keeps like the model, so that a
restarted trial continues the same audit: same canaries, scores and steps adding up. Each
step's Poisson draws come from a fresh OS-entropy stream per worker group (not saved).

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
# The secret

def shared_secrets(n: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """n 62-bit seeds from OS entropy, drawn on rank 0 and broadcast: every rank holds the
    same canaries. Never logged; only the trial checkpoint keeps the canaries' seed."""
    seeds = torch.tensor([secrets.randbits(62) if rank == 0 else 0 for _ in range(n)], dtype=torch.int64)
    if world_size > 1:
        dist.broadcast(seeds, src=0)
    return [int(x) for x in seeds.tolist()]


def _check_state(state: dict, kind: str, m: int) -> None:
    if state.get("kind") != kind or state.get("canaries") != m:
        raise ValueError(f"audit: the checkpoint holds {state.get('canaries')} {state.get('kind')} canaries, not "
                         f"{m} {kind} canaries; "
                         "a trial resumes with the audit it started with")


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
        self.params = [p for p in params if p.requires_grad]
        self.m, self.q, self.expected_batch = int(canaries), float(sample_rate), float(expected_batch)
        # The canary's gradient, clipped as Opacus clips a record (factor C / (norm + 1e-6)).
        norm = float(max_grad_norm)
        self.clipped = norm * min(1.0, max_grad_norm / (norm + 1e-6))
        seed, stream = shared_secrets(2, rank, world_size)
        self._stream = np.random.default_rng(stream)   # the Poisson draws, the same on every rank
        self._draw(seed)
        self._handle = None

    def _draw(self, seed: int) -> None:
        """Coordinates and coins from the secret `seed` (restored from a checkpoint on resume)."""
        self.seed, rng = int(seed), np.random.default_rng(int(seed))
        pool = [i for i, p in enumerate(self.params) if p.dim() >= 2]
        if sum(self.params[i].numel() for i in pool) < self.m:
            pool = list(range(len(self.params)))
        sizes = np.array([self.params[i].numel() for i in pool])
        if sizes.sum() < self.m:
            raise ValueError(f"audit.canaries: {self.m} canaries need {self.m} distinct coordinates; "
                             f"the model has {int(sizes.sum())} trainable parameters")
        flat = rng.choice(int(sizes.sum()), size=self.m, replace=False)
        owner = np.searchsorted(np.cumsum(sizes), flat, side="right")
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.slots = []   # (param, local flat indices, canary ids)
        for k in np.unique(owner):
            ids = np.nonzero(owner == k)[0]
            p = self.params[pool[k]]
            self.slots.append((p, torch.as_tensor(flat[ids] - starts[k], device=p.device),
                               torch.as_tensor(ids, device=p.device)))
        self.included = rng.random(self.m) < 0.5      # the secret coins: never logged
        self.scores = np.zeros(self.m)
        self.steps = 0

    def state_dict(self) -> dict:
        """For the trial checkpoint only (it holds the secret seed; torch.load(weights_only=True))."""
        return {"kind": "gradient", "canaries": self.m, "seed": self.seed, "steps": self.steps,
                "scores": torch.as_tensor(self.scores, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "gradient", self.m)
        self._draw(state["seed"])
        self.scores, self.steps = state["scores"].double().cpu().numpy().copy(), int(state["steps"])

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
        joined = (self._stream.random(self.m) < self.q) & self.included
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


# ------------------------------------------------------------------------------------
# Input canaries

class InputCanaries:
    """M crafted volumes in the training set, audited black-box by the final model's loss.

    Canary i is a volume of the data's shape of random black-and-white voxels (each 0 or 1),
    labels unknown: out of the data's distribution and far from every other canary, so a
    model that learns it shows it. Its coin puts it in the training set with probability
    1/2; an included canary is a record of its own (its own unit of privacy, also with
    `privacy.unit: subject`).

    Where they enter: `attach` has the stepper run `train_step` when a step's last real
    micro-batch is done, before the step's final microbatch_done (rank 0 only: a canary is
    one record, counted once). There the included canaries join the step independently with
    the run's q and run as extra micro-batches through the adapter's per-sample loss and the
    stepper's backward: clipped like every record, summed, under the same noise.

    Scoring (`result`, after the last step): minus the per-sample loss of the trained
    weights on each canary (eval mode, the fixed random draws of validation), then
    audit_bound: in-canaries should have the lower loss.
    """

    def __init__(self, canaries: int, shape: Sequence[int], n_labels: int, *, sample_rate: float,
                 physical_batch_size: int, rank: int = 0, world_size: int = 1):
        self.m, self.shape, self.n_labels, self.q = int(canaries), tuple(shape), int(n_labels), float(sample_rate)
        self.batch_size, self.rank = int(physical_batch_size), rank
        seed, stream = shared_secrets(2, rank, world_size)
        self._stream = np.random.default_rng(stream)   # which included canaries join each step
        self._draw(seed)
        self.stepper = self.adapter = self._close = None

    def _draw(self, seed: int) -> None:
        self.seed = int(seed)
        self.included = np.random.default_rng(self.seed).random(self.m) < 0.5   # the secret coins
        self.steps = 0

    def batch(self, ids, device="cpu") -> dict:
        """Canaries `ids` as a training batch (volumes drawn again from the seed: nothing kept)."""
        images = np.stack([np.random.default_rng([self.seed, int(i)]).integers(0, 2, size=self.shape).astype(np.float32)
                           for i in ids])
        n = len(images)
        return {"image": torch.from_numpy(images).unsqueeze(1).to(device),
                "labels": torch.zeros(n, self.n_labels, device=device),
                "label_mask": torch.zeros(n, self.n_labels, dtype=torch.bool, device=device)}

    def attach(self, stepper, adapter, device="cpu") -> "InputCanaries":
        """Run `train_step` before every step's final microbatch_done of `stepper` (rank 0)."""
        self.stepper, self.adapter, self.device = stepper, adapter, device
        self._close = close = stepper.microbatch_done
        if self.rank == 0:
            def done(last: bool) -> None:
                if last:
                    self.train_step()
                close(last)
            stepper.microbatch_done = done
        return self

    def train_step(self) -> None:
        """This step's canaries: each included one joins with probability q (rank 0, once per
        step, before the step's final microbatch_done)."""
        joined = np.flatnonzero(self.included & (self._stream.random(self.m) < self.q))
        self.steps += 1
        for start in range(0, len(joined), self.batch_size):
            self._close(False)   # the micro-batch before (the step's records, maybe none): clipped, kept
            loss, _ = self.adapter.per_sample_loss(self.stepper.module,
                                                   self.batch(joined[start:start + self.batch_size], self.device))
            self.stepper.backward(loss, getattr(self.adapter, "rows_per_sample", 1))

    def scores(self) -> np.ndarray:
        """Minus each canary's per-sample loss under the trained weights."""
        net, out = self.stepper.network, []
        net.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            for start in range(0, self.m, self.batch_size):
                ids = range(start, min(start + self.batch_size, self.m))
                loss, _ = self.adapter.per_sample_loss(net, self.batch(ids, self.device))
                out.append(-loss.detach().double().cpu().numpy())
        net.train()
        return np.concatenate(out)

    def result(self, delta: float) -> dict:
        """The audit (after the last step, rank 0; other ranks hold no canary)."""
        if self.rank != 0:
            return {}
        return {**audit_bound(self.scores(), self.included, delta), "audit/steps": self.steps}

    def state_dict(self) -> dict:
        """For the trial checkpoint only (it holds the secret seed; torch.load(weights_only=True))."""
        return {"kind": "input", "canaries": self.m, "seed": self.seed, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "input", self.m)
        self._draw(state["seed"])
        self.steps = int(state["steps"])
