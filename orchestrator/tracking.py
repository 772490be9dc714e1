"""MLflow tracking: one parent run per launch, one child run per trial.

All writes happen in the launch process (the Tune driver), through a `ray.tune.Callback`
that sees every epoch's metrics forwarded from rank 0 of each trial, across worker-group
restarts. One writer means SQLite is safe, and on a multi-node cluster no worker needs to
reach the tracking store.

Names (the contract in ARCHITECTURE.md):
  parent: tag orchestrator.role=sweep, artifact sweep.yaml
  child:  tags mlflow.parentRunId, orchestrator.role=trial, orchestrator.stage,
          orchestrator.model, orchestrator.dp; params = the trial's stage config flattened
          with dots + privacy.noise_multiplier/sample_rate/delta/accountant;
          metrics (step = epoch) train/loss, val/loss, privacy/epsilon, privacy/steps, ...
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

from ray import tune

from orchestrator.config import flatten

ROLE, STAGE, MODEL, DP = "orchestrator.role", "orchestrator.stage", "orchestrator.model", "orchestrator.dp"
TRIAL_KEY = "orchestrator.trial_key"
PARAM_LIMIT = 6000
ARTIFACTS = ("samples.png",)  # files a trial leaves in its checkpoint for the driver to log  # MLflow's cap on a param value's length


def default_uri(output_dir: Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client, name: str, artifact_root: Optional[Path]) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    # With the SQLite default, keep artifacts under `output` too, not in ./mlruns of
    # whatever directory the user happened to launch from.
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    return client.create_experiment(name, artifact_location=location)


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= PARAM_LIMIT else s[:PARAM_LIMIT - 3] + "..."


class MlflowTrialLogger(tune.Callback):
    """Mirrors Tune trials into MLflow child runs of the launch's parent run.

    Picklable (Tune saves callbacks with the experiment for `--resume`): it keeps only
    strings and reopens its client lazily. A resumed trial finds its existing run through
    the `orchestrator.trial_key` tag, so runs are never duplicated.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, stage: str, model: str,
                 dp: bool, extra_tags: Optional[dict] = None, extra_params: Optional[dict] = None):
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.stage, self.model, self.dp = stage, model, dp
        self.extra_tags = dict(extra_tags or {})
        self.extra_params = dict(extra_params or {})
        self._runs: dict[str, str] = {}
        self._params_logged: set[str] = set()
        self._client = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.uri)
        return self._client

    def _key(self, trial) -> str:
        return f"{self.parent_run_id}/{self.stage}/{trial.trial_id}"

    def run_id(self, trial) -> str:
        key = self._key(trial)
        if key in self._runs:
            return self._runs[key]
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{TRIAL_KEY}` = '{key}'",
                                        max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            stage_cfg = trial.config.get("stage", {})
            dp = stage_cfg.get("dp", {}).get("enabled", self.dp)  # dp.enabled may itself be searched
            model = stage_cfg.get("model", {}).get("kind", self.model)
            tags = {"mlflow.parentRunId": self.parent_run_id, ROLE: "trial", STAGE: self.stage,
                    MODEL: model, DP: str(bool(dp)).lower(), TRIAL_KEY: key,
                    "orchestrator.trial_id": trial.trial_id, **self.extra_tags}
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"{self.stage}-{trial.trial_id}")
            run_id = run.info.run_id
            params = {k: _param_value(v) for k, v in flatten(stage_cfg).items()}
            params.update({k: _param_value(v) for k, v in self.extra_params.items()})
            self._log_params(run_id, params)
        self._runs[key] = run_id
        return run_id

    def _log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items() if (run_id, k) not in self._params_logged]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=items[i:i + 100])
        self._params_logged.update((run_id, p.key) for p in items)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        run_id = self.run_id(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(float(v))]
        # Facts known only inside the trial (the sigma solved from a target epsilon, the
        # latent scale and where it came from) arrive with the results; they are params.
        params = {k: _param_value(v) for k, v in result.items() if k.startswith("privacy.")}
        params.update({k[len("param."):]: _param_value(v) for k, v in result.items() if k.startswith("param.")})
        if params:
            self._log_params(run_id, params)
        for i in range(0, len(metrics), 500):
            self.client.log_batch(run_id, metrics=metrics[i:i + 500])
        if result.get("checkpoint_path"):
            ckpt = str(result["checkpoint_path"])
            self.client.set_tag(run_id, "orchestrator.checkpoint", ckpt)
            for name in ARTIFACTS:
                if (Path(ckpt) / name).exists():
                    self.client.log_artifact(run_id, str(Path(ckpt) / name))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.client.set_terminated(self.run_id(trial), status="FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.client.set_terminated(self.run_id(trial), status="FAILED")
