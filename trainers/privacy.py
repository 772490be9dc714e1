"""Everything that touches private data on its way to a trained model goes through here.

Read this file to audit the privacy story of a trial:

* Secret randomness. The Poisson batches and the Gaussian noise are what the guarantee rests
  on: anyone who can regenerate them can subtract the noise. By default both come from the
  operating system's entropy (`secrets`), are never logged and never saved in a checkpoint
  (a restarted worker draws fresh ones). Only `dp.reproducible: true` (debugging) derives
  them from `train.seed`, and such a run is tagged as not a DP release.
* Sampling. DP-SGD's guarantee (and every accountant in Opacus and dp-accounting) assumes
  Poisson subsampling: each record joins each step independently with probability q, and
  the number of steps is fixed in advance. `PoissonSampler` does exactly that, per rank over
  a disjoint shard, with a stream of random numbers of its own per rank. Every sampling
  event is a step on every rank, also when a rank's batch is empty. (Opacus's own
  DistributedUniformWithReplacementSampler silently skips steps whose local batch is
  empty, so its epsilon is under-reported and ranks can desync; see FACTS.md.)
* Clipping and noise. Opacus's DPOptimizer / DistributedDPOptimizer clip each sample's
  gradient to `max_grad_norm`, sum, add N(0, (sigma * C)^2) once per step (rank 0 only in
  the distributed case) and divide by the expected global batch q * N.
* Accounting. Each trial keeps its own history of noise additions [(sigma, q, steps)] and
  asks an Opacus accountant for epsilon over the whole history (`epsilon_of`; GDP is
  composed by mu here, since Opacus's GaussianAccountant keeps only its last entry). The
  history is saved in every checkpoint and restored on resume, and noise added after the
  last checkpoint is recovered from the noise ledger, so a resumed run continues its
  epsilon rather than restarting it. The facts that let anyone recompute epsilon
  (sigma, q, steps, delta, accountant) are reported with every epoch.
* Auditing. A stage with `audit` adds canaries to every step, whatever the stepper below
  (trainers/audit.py): gradient canaries in a pre-step hook on the plain optimizer (after
  noise and all-reduce), input canaries as extra micro-batches of records before a step's
  final microbatch_done (clipped and noised like the rest). It reports a measured lower
  bound on epsilon; such a trial is no release.

Non-DP training shares the sampling/stepping structure (shuffled fixed-size batches) so the
training loop has one shape.
"""
from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.validators import ModuleValidator

# Opacus's backward hooks also fire on the first layer, whose input needs no gradient;
# PyTorch warns about that once per trial. The per-sample gradients are unaffected (tested).
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def _rng(seed: int, *stream: int) -> np.random.Generator:
    # SeedSequence gives statistically independent streams per (seed, rank, epoch).
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, *stream]))


def secret_generator(device="cpu") -> torch.Generator:
    """A torch generator seeded with 63 bits of OS entropy: nothing logged or saved can
    regenerate its draws (torch has no CSPRNG; Opacus's secure_mode needs torchcsprng,
    which does not build for current torch)."""
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbits(63))
    return g


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Sampling events per epoch: 1/q rounded up, the same on every rank."""
    return max(1, math.ceil(n_train / batch_size))


class PoissonSampler:
    """Poisson subsampling of the whole training set, split over ranks.

    The units of privacy are records (volumes), or with `units` given, subjects: `units[u]`
    lists the record indices of subject u, and a subject joins a step with all of its
    records. Rank r owns units r, r + W, r + 2W, ...; at each step each owned unit is
    included independently with probability q = batch_size / n_units. The union over ranks
    is then exactly a Poisson sample of the full set of units, which is what the accountant
    assumes. A step's records come out unit by unit (`unit_of` maps a record to its unit),
    so the loop can keep a subject inside one micro-batch and clip it once.

    `seed=None` (the DP default): each rank draws from a stream seeded by OS entropy, so
    batch membership cannot be regenerated from anything logged. An int seed makes the
    batches reproducible per (seed, rank, epoch): `dp.reproducible` only.
    """

    def __init__(self, n_train: int, batch_size: int, rank: int, world_size: int, seed: Optional[int],
                 units: Optional[Sequence[np.ndarray]] = None):
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.n_units = len(units) if units is not None else n_train
        self.sample_rate = batch_size / self.n_units
        self.shard = np.arange(rank, self.n_units, world_size)   # the units this rank owns
        self.steps = steps_per_epoch(self.n_units, batch_size)
        self._secret = np.random.default_rng(secrets.randbits(128)) if seed is None else None
        self.unit_of = None
        if units is not None:
            self._records = [np.asarray(units[u], dtype=np.int64) for u in self.shard]
            self.unit_of = np.empty(n_train, dtype=np.int64)
            for u, records in enumerate(units):
                self.unit_of[np.asarray(records, dtype=np.int64)] = u

    def epoch(self, epoch: int):
        rng = self._secret if self.seed is None else _rng(self.seed, 1, self.rank, epoch)
        for _ in range(self.steps):
            chosen = rng.random(len(self.shard)) < self.sample_rate
            if self.unit_of is None:
                yield self.shard[chosen]
            else:
                picked = [self._records[i] for i in np.flatnonzero(chosen)]
                yield np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)


def microbatches(local: np.ndarray, size: int, unit_of: Optional[np.ndarray] = None) -> list[np.ndarray]:
    """A step's local records in physical micro-batches of at most `size` records. With
    units (subjects), a unit is never split: its gradient is clipped as one, so its records
    share a micro-batch (a subject with more than `size` records gets one of its own)."""
    if unit_of is None or len(local) == 0:
        return [local[i:i + size] for i in range(0, len(local), size)] or [local]
    u = unit_of[local]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    bounds = list(starts) + [len(local)]
    chunks, begin = [], 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - begin > size and a > begin:
            chunks.append(local[begin:a])
            begin = a
    chunks.append(local[begin:])
    return chunks


def unit_ids(chunk: np.ndarray, unit_of: Optional[np.ndarray]) -> Optional[torch.Tensor]:
    """For each record of a micro-batch, the index (0..U-1) of its unit within it; None
    when every record is its own unit."""
    if unit_of is None:
        return None
    _, inverse = np.unique(unit_of[chunk], return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long)


class ShuffleSampler:
    """Non-DP: a shuffled pass in fixed-size global batches, each split over ranks."""

    def __init__(self, n_train: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.n_train, self.batch_size, self.rank, self.world_size, self.seed = n_train, batch_size, rank, world_size, seed
        self.sample_rate = batch_size / n_train
        self.steps = steps_per_epoch(n_train, batch_size)

    def epoch(self, epoch: int):
        perm = _rng(self.seed, 2, epoch).permutation(self.n_train)  # same on every rank
        for s in range(self.steps):
            yield perm[s * self.batch_size:(s + 1) * self.batch_size][self.rank::self.world_size]


MAX_NOISE_MULTIPLIER = 100.0
ACCOUNTANTS = ("prv", "rdp", "gdp")


def merge_history(history) -> list[tuple[float, float, int]]:
    """[(sigma, q, steps)] with identical (sigma, q) merged (composition is commutative)."""
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        if n > 0:
            merged[(float(s), float(q))] = merged.get((float(s), float(q)), 0) + int(n)
    return [(s, q, n) for (s, q), n in merged.items()]


def gdp_epsilon(history, delta: float, group_size: int = 1) -> float:
    """Opacus's GDP (central limit theorem) accountant over a whole history: each entry is
    mu_i-GDP (Opacus's `compute_mu_poisson`) and mu-GDP composes as sqrt(sum mu_i^2).
    Opacus's GaussianAccountant itself reads only its last history entry and overwrites the
    history on `step`, so 100 restored steps + 5 recovered + 1 new would count as 6.
    `group_size` k: a mu-GDP mechanism is (k mu)-GDP for groups of k records."""
    from opacus.accountants.analysis import gdp

    mu = group_size * math.sqrt(sum(gdp.compute_mu_poisson(steps=n, noise_multiplier=s, sample_rate=q) ** 2
                                    for s, q, n in history))
    if gdp.delta_eps_mu(eps=0.0, mu=mu) <= delta:
        return 0.0
    if not math.isfinite(mu) or gdp.delta_eps_mu(eps=500.0, mu=mu) > delta:
        return math.inf
    return float(gdp.eps_from_mu(mu=mu, delta=delta))


def epsilon_of(history, delta: float, accountant: str) -> float:
    """Epsilon at `delta` of every (sigma, q, steps) entry of `history` composed, with the
    Opacus accountant `accountant` (prv | rdp | gdp) holding the whole history."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    history = merge_history(history)
    if not history:
        return 0.0
    if accountant == "gdp":
        return gdp_epsilon(history, delta)
    acc = create_accountant(accountant)
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


def group_epsilon(history, delta: float, group_size: int, accountant: str) -> float:
    """Epsilon at `delta` for a group of `group_size` records (a subject with that many
    volumes in a record-level run), by group privacy.

    gdp: a mu-GDP mechanism is (k mu)-GDP for groups of k (Dong, Roth, Su 2022), exact.
    prv, rdp: the standard conversion, (eps, delta')-DP => (k eps, k e^{(k-1) eps} delta')
    for groups of k, applied to the RDP accountant's curve eps(delta') (cheap at many
    delta'); delta' is chosen on a grid to minimise k eps(delta') subject to
    k e^{(k-1) eps(delta')} delta' <= delta. An upper bound, not tight: subject-level DP
    (privacy.unit: subject) costs far less."""
    k = int(group_size)
    history = merge_history(history)
    if k <= 1 or not history:
        return epsilon_of(history, delta, accountant)
    if accountant == "gdp":
        return gdp_epsilon(history, delta, group_size=k)
    from opacus.accountants.analysis import rdp as rdp_analysis
    from opacus.accountants.rdp import RDPAccountant

    orders = RDPAccountant.DEFAULT_ALPHAS
    curve = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in history)
    best = math.inf
    for d in delta / k * np.logspace(0, -12, 121):
        eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=curve, delta=float(d))
        if math.isfinite(eps) and k * math.exp(min((k - 1) * eps, 700.0)) * d <= delta:
            best = min(best, k * float(eps))
    return best


def solve_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float,
                           steps: int, accountant: str) -> float:
    """sigma such that `steps` Poisson steps at rate q end at `target_epsilon`.

    Raises ValueError when the target needs sigma > MAX_NOISE_MULTIPLIER: no model learns
    under that much noise, and Opacus's own search (doubling up to 1e6) takes minutes to
    say so."""
    ceiling = create_accountant(accountant)
    ceiling.history = [(MAX_NOISE_MULTIPLIER, sample_rate, steps)]
    if ceiling.get_epsilon(delta=delta) > target_epsilon:
        raise ValueError(f"target epsilon {target_epsilon} needs a noise multiplier above {MAX_NOISE_MULTIPLIER}")
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant=accountant,
                                      epsilon_tolerance=0.005))


def noisy_selection_mean(clipped_sum: float, count: float, *, clip: float, noise_multiplier: float) -> float:
    """`search.select_on: dp`: the mean of per-sample validation losses, each clipped to
    [0, clip], released with the Gaussian mechanism: adding or removing one person changes
    the clipped sum by at most `clip`, so N(0, (noise_multiplier * clip)^2) is added to the
    sum (OS entropy, never seeded). The count is treated as public, as n_train is in q.
    One release per trial; the ledger composes them (a Gaussian mechanism is a
    Poisson-subsampled one with q = 1 and one step)."""
    noise = torch.normal(0.0, noise_multiplier * clip, size=(1,), generator=secret_generator(),
                         dtype=torch.float64).item()
    return (clipped_sum + noise) / max(count, 1.0)


@dataclass
class PrivacyFacts:
    """What anyone needs to recompute epsilon (logged as MLflow params). `sample_rate` is q
    over the unit of privacy (records, or subjects with unit `subject`); `group_size` is
    the most training records one subject has (None: the data declares no subjects)."""
    noise_multiplier: float
    sample_rate: float
    delta: float
    accountant: str
    max_grad_norm: float
    steps_planned: int
    unit: str = "record"
    group_size: Optional[int] = None

    def as_result(self) -> dict:
        """The `privacy.*` keys of a trial's result (the tracker logs them as params)."""
        return {f"privacy.{k}": v for k, v in self.__dict__.items() if v is not None}

    def subject_epsilon(self, history) -> Optional[float]:
        """The patient-level epsilon: the run's own with unit subject, by group privacy over
        `group_size` records with unit record, None when subjects are unknown."""
        if self.unit == "subject":
            return epsilon_of(history, self.delta, self.accountant)
        if self.group_size is None:
            return None
        return group_epsilon(history, self.delta, self.group_size, self.accountant)


def plan_privacy(stage, n_units: int, delta: float, accountant: str, unit: str = "record",
                 group_size: Optional[int] = None) -> PrivacyFacts:
    """sigma, q and the planned number of steps of a stage config (orchestrator.config.
    StageConfig) on `n_units` units of privacy (records, or subjects with unit `subject`),
    decided before training starts. The loop trains with it; the privacy books price every
    configuration a search can draw with it."""
    steps = steps_per_epoch(n_units, stage.train.batch_size)
    if stage.train.max_steps_per_epoch:
        steps = min(steps, stage.train.max_steps_per_epoch)
    total = steps * stage.train.epochs
    q = stage.train.batch_size / n_units
    sigma = stage.dp.noise_multiplier
    if sigma is None:
        sigma = solve_noise_multiplier(target_epsilon=stage.dp.target_epsilon, delta=delta,
                                       sample_rate=q, steps=total, accountant=accountant)
    return PrivacyFacts(noise_multiplier=sigma, sample_rate=q, delta=delta, accountant=accountant,
                        max_grad_norm=stage.dp.max_grad_norm, steps_planned=total, unit=unit,
                        group_size=1 if unit == "subject" else group_size)


class Stepper:
    """Non-DP step: sums per-sample loss gradients over micro-batches, all-reduces across
    ranks and averages over the global batch, then takes one optimizer step."""

    dp = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int):
        self.module, self.optimizer, self.world_size = model, optimizer, world_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._count = 0

    @property
    def network(self) -> nn.Module:
        return self.module

    def backward(self, per_sample_loss: torch.Tensor, rows_per_sample: int = 1,
                 units: Optional[torch.Tensor] = None) -> None:
        per_sample_loss.sum().backward()
        self._count += len(per_sample_loss)

    def empty_microbatch(self) -> None:
        pass

    def microbatch_done(self, last: bool) -> None:
        if not last:
            return
        count = torch.tensor(float(self._count))
        if self.world_size > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
            dist.all_reduce(count)
        if count.item() > 0:
            for p in self.params:
                if p.grad is not None:
                    p.grad /= count.item()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._count = 0

    # Non-DP runs report no epsilon.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DPStepper(Stepper):
    """DP-SGD step on upstream Opacus: per-sample gradients (GradSampleModule), clipping,
    noise and accounting (DPOptimizer + accountant). Micro-batches accumulate clipped
    per-sample gradients; noise is added once per logical step."""

    dp = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int, *,
                 noise_multiplier: float, max_grad_norm: float, sample_rate: float, n_train: int,
                 accountant: str, grad_sample_mode: str, noise_seed: Optional[int] = None):
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(f"model is not DP-compatible: {errors[0]}")
        gsm = prepare_module(model, grad_sample_mode, batch_first=True, loss_reduction="sum")
        super().__init__(gsm, optimizer, world_size)
        cls = DistributedDPOptimizer if world_size > 1 else DPOptimizer
        # loss_reduction="mean" divides the noisy sum by expected_batch_size on each rank;
        # the distributed optimizer then sums over ranks and divides by world size, so the
        # update is (sum of clipped grads + noise) / (q * n_train) in both cases.
        self.optimizer = cls(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                             expected_batch_size=sample_rate * n_train / world_size, loss_reduction="mean")
        self._init_accounting(accountant, sample_rate, noise_multiplier, noise_seed)
        self.optimizer.attach_step_hook(lambda optim: self._noise_added())

    def _init_accounting(self, accountant, sample_rate, noise_multiplier, noise_seed):
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.accountant = accountant
        self.history: list[tuple[float, float, int]] = []   # [(sigma, q, steps)], whole run
        self.sample_rate, self.noise_multiplier = sample_rate, noise_multiplier
        self._noise_seed = noise_seed
        self._ledger = None
        # Only rank 0's noise reaches the model. By default it is drawn from OS entropy;
        # an int noise_seed (dp.reproducible) makes it reproducible via seed_noise().
        self.generator = secret_generator(self.params[0].device) if noise_seed is None else None
        if hasattr(self.optimizer, "generator"):
            self.optimizer.generator = self.generator

    def _account(self, steps: int) -> None:
        s, q = float(self.noise_multiplier), float(self.sample_rate)
        if self.history and self.history[-1][:2] == (s, q):
            self.history[-1] = (s, q, self.history[-1][2] + steps)
        else:
            self.history.append((s, q, steps))

    def _noise_added(self) -> None:
        """Called once per noise addition: the history counts it, the ledger records it."""
        self._account(1)
        if self._ledger is not None:
            with open(self._ledger, "a") as f:
                f.write(f"{self.noise_multiplier} {self.sample_rate} {self.steps}\n")

    @property
    def network(self) -> nn.Module:
        return self.module._module  # the plain model, for evaluation and checkpoints

    def seed_noise(self, *stream: int) -> None:
        """dp.reproducible only: noise reproducible per (seed, epoch, rank). Without a
        noise_seed the secret generator drawn at construction keeps running."""
        if self._noise_seed is not None:
            g = torch.Generator(device=self.params[0].device)
            g.manual_seed(int(_rng(self._noise_seed, 3, *stream).integers(2**62)))
            self.optimizer.generator = g
            self.generator = g

    def backward(self, per_sample_loss: torch.Tensor, rows_per_sample: int = 1,
                 units: Optional[torch.Tensor] = None) -> None:
        """`rows_per_sample`: K rows (noise draws) per sample; `units`: for each sample, the
        index of its unit of privacy in this micro-batch (a subject), None: each sample is one."""
        per_sample_loss.sum().backward()
        rows = row_units(len(per_sample_loss), rows_per_sample, units)
        n_units = len(per_sample_loss) if units is None else int(units.max()) + 1 if len(units) else 0
        if rows is not None:
            # Noise multiplicity: K rows per sample (its loss is the mean over its draws);
            # subjects: all of a subject's samples. Opacus gave one gradient per row; summing a
            # unit's rows makes one gradient per unit, which the optimizer then clips once.
            for p in self.params:
                gs = p.grad_sample
                if gs is not None:
                    p.grad_sample = gs.new_zeros((n_units, *gs.shape[1:])).index_add_(0, rows.to(gs.device), gs)
        # One gradient per unit, or each row would be clipped as if it were a person: K draws
        # or a subject's volumes passed as separate people would silently weaken the guarantee.
        got = {p.grad_sample.shape[0] for p in self.params if p.grad_sample is not None}
        if got != {n_units}:
            raise ValueError(f"{sorted(got)} per-sample gradients for {n_units} units of privacy: "
                             f"rows_per_sample {rows_per_sample} does not match how the batch was run")

    def empty_microbatch(self) -> None:
        # An empty Poisson batch is still a step: noise is added and the accountant counts
        # it. MONAI's GroupNorm cannot run a batch of 0, so skip the forward and hand
        # Opacus zero per-sample gradients for a batch of size 0.
        for p in self.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)

    def microbatch_done(self, last: bool) -> None:
        # Opacus's virtual-step protocol (as BatchMemoryManager uses it): non-final
        # micro-batches only clip and accumulate; the final one adds noise, counts the
        # step and, with several ranks, all-reduces. Every rank calls the final step once
        # per sampling event, so the all-reduce never desyncs.
        self.optimizer.signal_skip_step(do_skip=not last)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.history, delta, self.accountant)

    def state_dict(self) -> dict:
        # Plain lists of (sigma, q, steps) so torch.load(weights_only=True) can read it back.
        # The noise generator's state is deliberately not saved: a restart draws a new one.
        return {"mechanism": self.accountant,
                "history": [[float(s), float(q), int(n)] for s, q, n in self.history]}

    # --- the noise ledger: noise added since the last checkpoint is never forgotten ------
    def attach_ledger(self, path) -> None:
        """Append every noise addition to `path` (rank 0, shared storage). A worker that dies
        mid-epoch loses the steps since its last checkpoint, but their noise was added and
        their gradients may have reached other ranks: the accountant must keep counting them."""
        from pathlib import Path

        self._ledger = Path(path)
        self._ledger.parent.mkdir(parents=True, exist_ok=True)

    def count_ledger(self, path) -> int:
        """Steps recorded in the ledger beyond the restored history are added back, at this
        run's (sigma, q). Each line is `sigma q steps_so_far`; a line that does not parse
        as that (a worker killed mid-write leaves e.g. `1.0 0.`) is one noise addition
        whose record was torn, when no valid line follows it."""
        from pathlib import Path

        path = Path(path)
        if not path.exists():
            return 0
        logged, torn = 0, 0
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            n = _ledger_steps(line)
            if n is None:
                torn += 1
            else:
                logged, torn = max(logged, n), 0
        missing = logged + torn - self.steps
        if missing > 0:
            self._account(missing)
        return max(missing, 0)

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state["mechanism"] != self.accountant:
            raise ValueError(f"checkpoint was accounted with {state['mechanism']}, "
                             f"this run uses {self.accountant}")
        self.history = merge_history((float(s), float(q), int(n)) for s, q, n in state["history"])


def row_units(n_samples: int, rows_per_sample: int = 1, units: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The unit of privacy of each row of a micro-batch run as `rows_per_sample` rows per
    sample (noise multiplicity) with per-sample `units` (subjects); None when every row is
    a unit of its own."""
    if rows_per_sample == 1 and units is None:
        return None
    per_sample = torch.arange(n_samples) if units is None else units.long().cpu()
    return per_sample.repeat_interleave(rows_per_sample)


def _ledger_steps(line: str) -> Optional[int]:
    """The step count of a valid noise-ledger line, None for a torn or corrupt one."""
    parts = line.split()
    if len(parts) != 3:
        return None
    try:
        sigma, q, n = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        return None
    if not (math.isfinite(sigma) and sigma > 0 and 0 < q <= 1 and n >= 1):
        return None
    return n


class GhostDPStepper(DPStepper):
    """DP-SGD with ghost clipping (Li et al. 2022; Bu et al. 2023) on Opacus's
    GradSampleModuleFastGradientClipping: a first backward pass gives each sample's gradient
    norm without materialising per-sample gradients (for layers with a norm sampler; others
    materialise them layer by layer), a second pass backpropagates the loss reweighted by
    each sample's clipping factor, which yields the sum of clipped gradients directly.
    Noise, all-reduce and accounting are done here, once per logical step, as in DPStepper."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int, *,
                 noise_multiplier: float, max_grad_norm: float, sample_rate: float, n_train: int,
                 accountant: str, grad_sample_mode: str = "ghost", noise_seed: Optional[int] = None):
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(f"model is not DP-compatible: {errors[0]}")
        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum", strict=False,
                                                   max_grad_norm=max_grad_norm, use_ghost_clipping=True)
        Stepper.__init__(self, gsm, optimizer, world_size)
        self.max_grad_norm, self.expected_batch = max_grad_norm, sample_rate * n_train
        self._init_accounting(accountant, sample_rate, noise_multiplier, noise_seed)
        self._summed = None

    def seed_noise(self, *stream: int) -> None:
        if self._noise_seed is not None:
            self.generator = torch.Generator(device=self.params[0].device)
            self.generator.manual_seed(int(_rng(self._noise_seed, 3, *stream).integers(2**62)))

    def backward(self, per_sample_loss: torch.Tensor, rows_per_sample: int = 1,
                 units: Optional[torch.Tensor] = None) -> None:
        if rows_per_sample > 1:
            raise ValueError("ghost clipping computes one norm per row; noise multiplicity needs functorch or hooks")
        if units is not None and int(units.max()) + 1 != len(units):
            raise ValueError("ghost clipping computes one norm per volume, not per subject; use bk, functorch or hooks")
        per_sample_loss.sum().backward(retain_graph=True)  # pass 1: per-sample norms
        coeff = self.module.get_clipping_coef().detach()
        for p in self.params:
            p.grad = None
        self.module.disable_hooks()
        try:
            (coeff * per_sample_loss).sum().backward()       # pass 2: sum of clipped gradients
        finally:
            self.module.enable_hooks()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self._summed = grads if self._summed is None else [a + b for a, b in zip(self._summed, grads)]
        for p in self.params:
            p.grad = None

    def empty_microbatch(self) -> None:
        pass  # nothing to clip; the step still adds noise and is counted

    def microbatch_done(self, last: bool) -> None:
        if not last:
            return
        summed = self._summed or [torch.zeros_like(p) for p in self.params]
        rank = dist.get_rank() if self.world_size > 1 else 0
        for p, g in zip(self.params, summed):
            if rank == 0:
                g = g + torch.normal(0.0, self.noise_multiplier * self.max_grad_norm, size=g.shape,
                                     device=g.device, generator=self.generator)
            if self.world_size > 1:
                dist.all_reduce(g)
            p.grad = g / self.expected_batch
        self._noise_added()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._summed = None


from trainers import grad_samplers as _grad_samplers  # noqa: E402,F401  registers the 3D conv samplers with Opacus

# `auto`: per family, the fastest correct mode measured by benchmarks/dp_overhead.py on CPU
# (13 x 48 x 48, batch 8; README "Performance"): bk (one backward, trainers/book_keeping.py)
# 1.42x / 1.57x / 1.56x a non-DP step for beta_vae / vq_vae / ldm, against hooks 1.42x / 1.60x /
# 1.67x, functorch 1.96x / 2.14x / 2.36x and Opacus's ghost clipping (two backwards) 2.1-3.7x;
# bk also peaks lowest in memory and supports noise multiplicity.
AUTO_MODE = {"beta_vae": "bk", "vq_vae": "bk", "ldm": "bk"}


def make_dp_stepper(mode: str, family: str, model, optimizer, world_size: int, **kw) -> DPStepper:
    mode = AUTO_MODE.get(family, "functorch") if mode == "auto" else mode
    if mode == "bk":
        from trainers.book_keeping import BookKeepingDPStepper

        return BookKeepingDPStepper(model, optimizer, world_size, **kw)
    if mode == "ghost":
        return GhostDPStepper(model, optimizer, world_size, **kw)
    return DPStepper(model, optimizer, world_size, grad_sample_mode=mode, **kw)

