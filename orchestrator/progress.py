"""What a launch prints while it runs: one line per trial per epoch, one per finished trial.

The lines come from the driver (a Tune callback that sees every result that rank 0 reports),
not from the workers: worker output goes to Ray's log files (and the dashboard), so nothing
is printed twice and nothing arrives after the summary. `--verbose` brings Ray's and Tune's
own output back to the console.

A trial is named by what differs from the stage's other trials, the searched values
(`ae_dp sigma=0.8 latent=2`); the same label names its MLflow run.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

from ray import tune

from orchestrator.config import get_path

# short names of common searched keys; anything else is shown by its last path component
SHORT = {"dp.noise_multiplier": "sigma", "dp.target_epsilon": "target_eps", "train.batch_size": "batch",
         "model.latent_channels": "latent", "model.embedding_dim": "latent", "train.lr": "lr",
         "train.epochs": "epochs", "train.seed": "seed", "dp.enabled": "dp"}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def trial_label(stage: str, stage_config: dict, searched: Iterable[str], trial_id: str = "",
                repeats: bool = False) -> str:
    """`ae_dp sigma=0.8 latent=2`: the stage and the trial's searched values; the trial's
    number is added where the values alone do not tell trials apart (no searched values,
    or repeats of the same values)."""
    parts = [stage]
    for path in searched:
        try:
            value = get_path(stage_config, path)
        except (KeyError, TypeError):
            continue
        parts.append(f"{SHORT.get(path, path.rsplit('.', 1)[-1])}={_fmt(value)}")
    number = trial_id.rsplit("_", 1)[-1] if trial_id else ""
    if number and (len(parts) == 1 or repeats):
        parts.append(f"#{int(number) + 1 if number.isdigit() else number}")
    return " ".join(parts)


def metric_value(key: str, value) -> Optional[float]:
    """A trial's result value as a metric: a number, finite, or +inf under `privacy/` (None
    otherwise; NaN never). An epsilon with no finite bound (per patient, by group privacy,
    when the record-level epsilon is large) must replace the epoch before's finite one, not
    leave it standing as the latest value: MLflow stores it as the max float, which
    `orchestrator/report.py` reads back as inf, and the console prints it."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    v = float(value)
    return v if math.isfinite(v) or (v == math.inf and key.startswith("privacy/")) else None


def _num(result: dict, key: str) -> Optional[float]:
    return metric_value(key, result.get(key))   # an unbounded epsilon says so


class ConsoleProgress(tune.Callback):
    """Driver-side progress lines for one stage's Tune run."""

    def __init__(self, stage: str, epochs: int, searched: list[str], repeats: bool, metric: str):
        self.stage, self.epochs, self.searched, self.repeats, self.metric = stage, epochs, searched, repeats, metric
        self._told: dict[str, float] = {}

    def _label(self, trial) -> str:
        return trial_label(self.stage, trial.config.get("stage", {}), self.searched, trial.trial_id, self.repeats)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        label = self._label(trial)
        if result.get("replay_history"):
            print(f"[{label}] resumed from its checkpoint of epoch {int(result.get('epoch', 0))}", flush=True)
            return
        recovered = _num(result, "privacy/steps_recovered")
        if recovered and self._told.get(trial.trial_id) != recovered:
            self._told[trial.trial_id] = recovered
            print(f"[{label}] {int(recovered)} noise additions after the last checkpoint were lost with the failed "
                  "workers; they stay in the privacy account", flush=True)
        parts = [f"[{label}] epoch {int(result.get('epoch', 0))}/{self.epochs}"]
        for key, name in (("train/loss", "train/loss"), ("val/loss", "val/loss"), ("privacy/epsilon", "eps"),
                          ("privacy/epsilon_subject", "eps_patient")):
            v = _num(result, key)
            if v is not None and not (key == "privacy/epsilon_subject" and result.get("privacy.unit") == "subject"):
                parts.append(f"{name}={v:.4g}")
        if result.get("privacy.unit") == "subject":
            parts.append("(per patient)")
        t = _num(result, "time/epoch_s")
        if t is not None:
            parts.append(f"({t:.1f}s)")
        print(" ".join(parts), flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        shown = [self.metric] + [k for k in sorted(r) if k.startswith(("fidelity/", "control/r_mean",
                                                                         "control/ed_es", "select/"))
                                 and k != self.metric]
        values = " ".join(f"{k}={v:.4g}" for k in dict.fromkeys(shown) if (v := _num(r, k)) is not None)
        eps, patient = _num(r, "privacy/epsilon"), _num(r, "privacy/epsilon_subject")
        if eps is not None:
            values += f" epsilon={eps:.4g}" + (" per patient" if r.get("privacy.unit") == "subject" else
                                              f" (per patient {patient:.4g}, group privacy over "
                                              f"{int(_num(r, 'privacy.group_size') or 0)} volumes)"
                                              if patient is not None else "")
        print(f"[{self._label(trial)}] done: {values}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        where = getattr(trial, "local_path", None) or getattr(trial, "path", "")
        print(f"[{self._label(trial)}] failed; the error is in {where}/error.txt", flush=True)
