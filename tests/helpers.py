"""One home for what several test files need: the independent epsilon reference, a tiny
DP-compatible network, free ports, tiny sweep files, launching the CLI, reading runs (and
their noise ledgers) back from MLflow by role, and the training loop run in this process.

The epsilon reference is Google's dp-accounting (RDP, PLD) or the Gaussian-DP central limit
theorem written out with scipy: never Opacus, which is what it checks."""
from __future__ import annotations

import copy
import math
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

import yaml

# --- the independent privacy reference ----------------------------------------------------


def poisson_gaussian_event(sigma: float, q: float, steps: int):
    from dp_accounting import dp_event

    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)


def composed_event(mechanisms: Iterable[Sequence]):
    """dp-accounting's event for several composed (sigma, q, steps) mechanisms."""
    from dp_accounting import dp_event

    return dp_event.ComposedDpEvent([poisson_gaussian_event(float(s), float(q), int(n)) for s, q, n in mechanisms])


def gdp_mu(mechanisms: Iterable[Sequence]) -> float:
    """mu of the composed Poisson-subsampled Gaussians under the GDP central limit theorem
    (Dong, Roth, Su 2019, Cor. 5.4; Bu et al. 2020): mu_i = q sqrt(T (e^{1/sigma^2} - 1)),
    and mu-GDP mechanisms compose as sqrt(sum mu_i^2)."""
    return math.sqrt(sum((q * math.sqrt(n * math.expm1(1.0 / s ** 2))) ** 2 for s, q, n in mechanisms))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest eps with delta(eps) <= delta for mu-GDP (Dong, Roth, Su 2019, Cor. 2.13):
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def excess(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
    return brentq(excess, 0.0, hi, xtol=1e-12)


def independent_composition(mechanisms: Iterable[Sequence], delta: float, accountant: str = "rdp", *,
                            pld_interval: float = 1e-4) -> float:
    """Epsilon of several composed (sigma, q, steps) Poisson-subsampled Gaussian mechanisms.

    accountant: "rdp" (dp-accounting's RDP), "prv" or "pld" (dp-accounting's PLD, the same
    privacy-loss-distribution approach as Opacus's PRV, with an independent implementation),
    "gdp" (the GDP central limit theorem, `gdp_mu` / `gdp_epsilon`)."""
    mechanisms = [(float(s), float(q), int(n)) for s, q, n in mechanisms]
    if accountant == "gdp":
        return gdp_epsilon(gdp_mu(mechanisms), delta)
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    if accountant == "rdp":
        acc = rdp_privacy_accountant.RdpAccountant()
    elif accountant in ("prv", "pld"):
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=pld_interval)
    else:
        raise ValueError(f"unknown accountant {accountant!r}: expected rdp, prv, pld or gdp")
    acc.compose(composed_event(mechanisms))
    return acc.get_epsilon(delta)


def independent_epsilon(sigma: float, q: float, steps: int, delta: float, accountant: str = "rdp", *,
                        pld_interval: float = 1e-4) -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps (rate q, noise multiplier sigma)."""
    return independent_composition([(sigma, q, steps)], delta, accountant, pld_interval=pld_interval)


# --- a tiny DP-compatible network -------------------------------------------------------------


def tiny_model(seed: int = 0):
    """Conv3d + GroupNorm + Linear on 1 x 3 x 4 x 4 inputs, one output: every layer kind the
    DP steppers must handle, in a few hundred parameters. The same seed gives the same weights."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(),
                         nn.Flatten(), nn.Linear(4 * 3 * 4 * 4, 1))


# --- ports --------------------------------------------------------------------------------


def free_ports(n: int, host: str = "") -> list[int]:
    """n distinct ports free right now (bound together, then released). host "" means every
    interface; "127.0.0.1" the loopback only."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


# --- sweep files --------------------------------------------------------------------------

TINY_AE = {"kind": "beta_vae", "channels": [4, 8], "norm_num_groups": 4}
TINY_LDM = {"kind": "ldm", "channels": [8, 16], "num_head_channels": 4, "norm_num_groups": 4,
            "label_embedding_dim": 8, "num_train_timesteps": 50, "num_inference_steps": 3}


def stage(name: str = "ae", *, model: Optional[dict] = None, train: Optional[dict] = None,
          dp: Optional[dict] = None, **keys) -> dict:
    """A tiny DP stage (beta-VAE 4/8 channels, 1 epoch, batch 4, sigma 1); `train` and `dp`
    update the defaults key by key, `model` too unless it names another `kind` (then it is
    the whole model config); other keys (search, needs, ...) are set as given."""
    model = model or {}
    return {"name": name,
            "model": dict(model) if model.get("kind", "beta_vae") != "beta_vae" else {**TINY_AE, **model},
            "train": {"epochs": 1, "batch_size": 4, "physical_batch_size": 2, **(train or {})},
            "dp": {"enabled": True, "noise_multiplier": 1.0, **(dp or {})},
            **keys}


def sweep_dict(name: str = "t", *, stages: Optional[list] = None, output: Optional[str] = None,
               data: Optional[dict] = None, privacy: Optional[dict] = None, cluster: Optional[dict] = None,
               n: int = 20, shape: Sequence[int] = (5, 16, 16), labels: Sequence[str] = ("LVEDV",),
               seed: int = 0, **top) -> dict:
    """A whole sweep file as a dict: phantom data synthesized at `data/p` (n volumes of
    `shape`), delta 1e-3 with the RDP accountant, one worker per trial, and `stages`
    (default: one tiny DP beta-VAE stage). `data`, `privacy`, `cluster` update the defaults."""
    raw = {
        "name": name,
        "output": output or f"runs/{name}",
        "data": {"root": "data/p", "labels": list(labels), "shape": list(shape),
                 "synthesize": {"kind": "phantom", "n": n, "seed": seed}, **(data or {})},
        "privacy": {"delta": 1e-3, "accountant": "rdp", **(privacy or {})},
        "cluster": {"workers_per_trial": 1, **(cluster or {})},
        "stages": copy.deepcopy(stages) if stages is not None else [stage()],
        **top,
    }
    return raw


def write_sweep(folder: Path, raw: dict, filename: str = "sweep.yaml") -> Path:
    path = Path(folder) / filename
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def launch(cwd: Path, sweep: Path, *extra: str, timeout: float = 900, check: bool = True):
    """`python -m orchestrator.launch SWEEP ...` in `cwd`; with `check`, exit 0 is asserted."""
    proc = subprocess.run([sys.executable, "-m", "orchestrator.launch", str(sweep), *extra], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# --- MLflow -------------------------------------------------------------------------------


def client_for(db_or_uri):
    """An MlflowClient on a sqlite file (a Path or a path string) or on a tracking URI."""
    from mlflow.tracking import MlflowClient

    text = str(db_or_uri)
    return MlflowClient(tracking_uri=text if "://" in text else f"sqlite:///{text}")


def runs_by_role(client, experiment: str, role: str) -> list:
    """Runs of `experiment` tagged `orchestrator.role = role` ("sweep" or "trial"); [] when the
    experiment does not exist (yet)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`orchestrator.role` = '{role}'")


def trial_runs(client, experiment: str) -> list:
    return runs_by_role(client, experiment, "trial")


def parent_run(client, experiment: str):
    """The one parent run of a launch (asserted to be one)."""
    parents = runs_by_role(client, experiment, "sweep")
    assert len(parents) == 1, [r.info.run_id for r in parents]
    return parents[0]


def trial_runs_once_started(db: Path, experiment: str) -> list:
    """For polling a running launch: [] until the launch has created its store. launch.json
    appears once it has; opening the store earlier races the launch's own schema migration."""
    if not (Path(db).parent / "launch.json").exists():
        return []
    return trial_runs(client_for(db), experiment)


def noise_ledger(output: Path, run) -> Path:
    """The noise ledger of a trial's MLflow run: one line per noise addition, beside the
    trial's Ray Train checkpoints (`<output>/ray_results/<sweep>-<stage>[-<up>]-<trial_id>/`)."""
    trial_id = run.data.tags["orchestrator.trial_id"]
    found = sorted(Path(output).glob(f"ray_results/*-{trial_id}/noise_ledger.txt"))
    assert len(found) == 1, (trial_id, found)
    return found[0]


def ledger_lines(path: Path) -> int:
    """Noise additions recorded in one noise ledger (its non-blank lines)."""
    return sum(1 for line in Path(path).read_text().splitlines() if line.strip())


def noise_ledger_lines(output: Path, run) -> int:
    return ledger_lines(noise_ledger(output, run))


# --- the training loop in this process ------------------------------------------------------


class _OneRankContext:
    def get_world_rank(self):
        return 0

    def get_world_size(self):
        return 1

    def get_experiment_name(self):
        return "in-process"


def phantom_data(root: Path, n: int = 12, shape: Sequence[int] = (5, 16, 16),
                 labels: Sequence[str] = ("LVEDV", "ESED"), private: bool = True, seed: int = 0) -> dict:
    """A phantom dataset at `root` (made once) and its `data` config as the loop's meta has it."""
    from orchestrator.config import DataConfig
    from trainers.phantoms import synthesize

    if not (Path(root) / "training.npy").exists():
        synthesize(root, n=n, shape=tuple(shape), seed=seed, labels=list(labels))
    return DataConfig.model_validate({"root": str(root), "labels": list(labels), "shape": list(shape),
                                      "private": private}).model_dump()


def run_loop(monkeypatch, tmp_path: Path, stage: dict, data: dict, *, checkpoint: Optional[Path] = None,
             **meta) -> list[tuple[dict, Optional[Path]]]:
    """`trainers.loop.train_worker` run here as the one rank of a Ray Train run, Ray's API
    stubbed: `checkpoint` is what `ray.train.get_checkpoint()` returns (a resume). Returns
    every report as (metrics, a copy of its checkpoint folder or None)."""
    import shutil

    import ray.train
    import ray.train.torch
    import torch

    from trainers import loop

    reports = []

    def report(metrics, checkpoint=None):
        kept = None
        if checkpoint is not None:
            kept = Path(tmp_path) / f"report{len(reports)}"
            shutil.copytree(checkpoint.path, kept)
        reports.append((dict(metrics), kept))

    monkeypatch.setattr(ray.train, "get_context", _OneRankContext)
    monkeypatch.setattr(ray.train, "get_checkpoint",
                        lambda: None if checkpoint is None else ray.train.Checkpoint.from_directory(str(checkpoint)))
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    meta = {"stage": stage.get("name", "s"), "data": data, "delta": 1e-3, "accountant": "rdp",
            "storage_path": str(Path(tmp_path) / "storage"), "cpus_per_worker": 1, **meta}
    with torch.random.fork_rng(devices=[]):
        loop.train_worker({"stage": {k: v for k, v in stage.items() if k != "name"}, "meta": meta})
    return reports
