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

import os
import time
from pathlib import Path
from typing import Any, Optional

from ray import tune

from orchestrator.config import flatten
from orchestrator.progress import metric_value, trial_label

ROLE, STAGE, MODEL, DP = "orchestrator.role", "orchestrator.stage", "orchestrator.model", "orchestrator.dp"
DP_RELEASE = "orchestrator.dp_release"
AUDIT = "orchestrator.audit"   # "true": trained with canaries (stage `audit`), never selected or released
TRIAL_KEY = "orchestrator.trial_key"
REPLAY_KEY = "replay_history"   # see trainers/loop.py
PARAM_LIMIT = 6000
RETRY_EVERY_S = 10.0
ARTIFACTS = ("samples.png",)  # files a trial leaves in its checkpoint for the driver to log  # MLflow's cap on a param value's length


def default_uri(output_dir: Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# MLflow 3 opens an experiment without this tag in its GenAI view (traces); with it, the UI
# opens on the training runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def ensure_experiment(client, name: str, artifact_root: Optional[Path]) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if exp.tags.get(EXPERIMENT_KIND[0]) is None:
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    # With the SQLite default, keep artifacts under `output` too, not in ./mlruns of
    # whatever directory the user happened to launch from.
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= PARAM_LIMIT else s[:PARAM_LIMIT - 3] + "..."


def _is_outage(exc: BaseException) -> bool:
    """A tracking server that is down or restarting (retry later), as opposed to a bad request."""
    import requests

    from mlflow.exceptions import MlflowException

    if isinstance(exc, (requests.exceptions.RequestException, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, MlflowException):
        text = str(exc)
        return any(w in text for w in ("Max retries", "Connection", "connection", "503", "502", "504",
                                       "timed out", "API request"))
    return False


def loggable_metric(key: str, value) -> bool:
    """Whether a result value goes to MLflow as a metric: a `metric_value` under a "/" key."""
    return "/" in key and metric_value(key, value) is not None


class MlflowTrialLogger(tune.Callback):
    """Mirrors Tune trials into MLflow child runs of the launch's parent run.

    Picklable (Tune saves callbacks with the experiment for `--resume`): it keeps only
    strings and plain records and reopens its client lazily. A resumed trial finds its
    existing run through the `orchestrator.trial_key` tag, so runs are never duplicated.

    Every write goes through a queue: when the tracking server is unreachable (restarting,
    network blip) the writes wait, in order, and are replayed at the next result and at the
    end of the stage, so an MLflow outage neither stops the sweep nor loses metrics.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, stage: str, model: str,
                 dp: bool, extra_tags: Optional[dict] = None, extra_params: Optional[dict] = None,
                 searched: Optional[list] = None, repeats: bool = False):
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.searched, self.repeats = list(searched or []), repeats
        self.stage, self.model, self.dp = stage, model, dp
        self.extra_tags = dict(extra_tags or {})
        self.extra_params = dict(extra_params or {})
        self._runs: dict[str, str] = {}
        self._params_logged: set[tuple[str, str]] = set()
        self._pending: list[tuple[str, str, Any]] = []   # (trial key, op, payload)
        self._trial_info: dict[str, dict] = {}
        self._outage_since: Optional[float] = None
        self._client = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    def __setstate__(self, state):
        state.setdefault("_pending", [])
        state.setdefault("_trial_info", {})
        state.setdefault("_outage_since", None)
        self.__dict__.update(state)

    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.uri)
        return self._client

    # Saved by Tune with its experiment checkpoints: writes still queued when the launch
    # died are sent by `--resume`.
    def get_state(self) -> Optional[dict]:
        return {"pending": list(self._pending), "trial_info": dict(self._trial_info)}

    def set_state(self, state: dict) -> None:
        self._pending = list(state.get("pending", [])) + [p for p in self._pending if p not in state.get("pending", [])]
        self._trial_info.update(state.get("trial_info", {}))

    def _key(self, trial) -> str:
        return f"{self.parent_run_id}/{self.stage}/{trial.trial_id}"

    # --- the queue --------------------------------------------------------------------
    def _remember(self, trial) -> str:
        key = self._key(trial)
        if key not in self._trial_info:
            stage_cfg = trial.config.get("stage", {})
            self._trial_info[key] = {"trial_id": trial.trial_id, "config": stage_cfg}
        return key

    def _enqueue(self, trial, op: str, payload: Any = None) -> None:
        self._pending.append((self._remember(trial), op, payload))
        self.flush()

    def flush(self, patience_s: float = 0.0) -> bool:
        """Send queued writes in order; stop at the first outage (they stay queued). With
        `patience_s`, keep retrying that long. True when the queue is empty."""
        deadline = time.monotonic() + patience_s
        if (not patience_s and self._outage_since is not None
                and time.monotonic() - getattr(self, "_last_try", 0.0) < RETRY_EVERY_S):
            return False  # in an outage: try again in a while, do not stall Tune on every result
        self._last_try = time.monotonic()
        while self._pending:
            key, op, payload = self._pending[0]
            try:
                self._apply(key, op, payload)
            except Exception as exc:  # noqa: BLE001 - an outage is retried, anything else is re-raised
                if not _is_outage(exc):
                    raise
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    print(f"warning: MLflow at {self.uri} is unreachable; {len(self._pending)} write(s) queued, "
                          "training goes on and they are sent when it is back", flush=True)
                self._client = None
                if time.monotonic() >= deadline:
                    return False
                time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
                continue
            self._pending.pop(0)
        if self._outage_since is not None:
            print(f"MLflow at {self.uri} is back after {time.monotonic() - self._outage_since:.0f}s; "
                  "queued writes sent", flush=True)
            self._outage_since = None
        return True

    def _apply(self, key: str, op: str, payload: Any) -> None:
        from mlflow.entities import Metric

        run_id = self._run_for(key)
        if op == "start":
            return
        if op == "params":
            self._log_params(run_id, payload)
        elif op == "metrics":
            items = [Metric(k, v, ts, step) for k, v, ts, step in payload]
            for i in range(0, len(items), 500):
                self.client.log_batch(run_id, metrics=items[i:i + 500])
        elif op == "tag":
            self.client.set_tag(run_id, *payload)
        elif op == "artifact":
            if Path(payload).exists():
                self.client.log_artifact(run_id, payload)
        elif op == "end":
            self.client.set_terminated(run_id, status=payload)
        elif op == "replay":
            have = {m.step for m in self.client.get_metric_history(run_id, "train/loss")}
            now = int(time.time() * 1000)
            missing = [Metric(k, float(v), now, int(e["epoch"])) for e in payload
                       if int(e.get("epoch", 0)) not in have
                       for k, v in e.items() if loggable_metric(k, v)]
            if missing:
                print(f"[{self.stage}] trial {key.rsplit('/', 1)[-1]}: {len({m.step for m in missing})} epoch(s) "
                      "checkpointed but not yet in MLflow when the launch stopped; logged now", flush=True)
            for i in range(0, len(missing), 500):
                self.client.log_batch(run_id, metrics=missing[i:i + 500])

    def _run_for(self, key: str) -> str:
        if key in self._runs:
            return self._runs[key]
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{TRIAL_KEY}` = '{key}'",
                                        max_results=1)
        info = self._trial_info.get(key, {"trial_id": key.rsplit("/", 1)[-1], "config": {}})
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            stage_cfg = info["config"]
            dp = stage_cfg.get("dp", {}).get("enabled", self.dp)  # dp.enabled may itself be searched
            model = stage_cfg.get("model", {}).get("kind", self.model)
            tags = {"mlflow.parentRunId": self.parent_run_id, ROLE: "trial", STAGE: self.stage,
                    MODEL: model, DP: str(bool(dp)).lower(), TRIAL_KEY: key,
                    "orchestrator.trial_id": info["trial_id"], **self.extra_tags}
            if dp:   # a DP trial whose noise and batches derive from the logged seed is no DP release
                tags[DP_RELEASE] = str(not stage_cfg.get("dp", {}).get("reproducible", False)).lower()
            if stage_cfg.get("audit"):
                tags[AUDIT] = "true"
            name = trial_label(self.stage, stage_cfg, getattr(self, "searched", []), info["trial_id"],
                               getattr(self, "repeats", False))
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
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

    # --- Tune hooks ---------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self._enqueue(trial, "start")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(REPLAY_KEY):   # a trial restored from a checkpoint replays its history
            self._enqueue(trial, "replay", [e for e in result[REPLAY_KEY] if isinstance(e, dict)])
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [(k, float(v), now, step) for k, v in result.items() if loggable_metric(k, v)]
        # Facts known only inside the trial (the sigma solved from a target epsilon, the
        # latent scale and where it came from) arrive with the results; they are params.
        params = {k: _param_value(v) for k, v in result.items() if k.startswith(("privacy.", "select."))}
        params.update({k[len("param."):]: _param_value(v) for k, v in result.items() if k.startswith("param.")})
        if params:
            self._enqueue(trial, "params", params)
        self._enqueue(trial, "metrics", metrics)
        if result.get("checkpoint_path"):
            ckpt = str(result["checkpoint_path"])
            self._enqueue(trial, "tag", ("orchestrator.checkpoint", ckpt))
            for name in ARTIFACTS:
                if (Path(ckpt) / name).exists():
                    self._enqueue(trial, "artifact", str(Path(ckpt) / name))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._enqueue(trial, "end", "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._enqueue(trial, "end", "FAILED")

    def on_experiment_end(self, trials, **info):
        if not self.flush(patience_s=float(os.environ.get("ORCHESTRATOR_MLFLOW_PATIENCE_S", "600"))):
            print(f"warning: MLflow at {self.uri} stayed unreachable; {len(self._pending)} write(s) kept in the "
                  "Tune experiment state: `--resume` sends them", flush=True)


def with_patience(fn, *args, patience_s: float = 600.0, what: str = "MLflow", **kwargs):
    """Call a tracking function, waiting out a server outage (restart) for up to `patience_s`."""
    deadline = time.monotonic() + patience_s
    warned = False
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if not _is_outage(exc) or time.monotonic() >= deadline:
                raise
            if not warned:
                print(f"warning: {what} unreachable; retrying for up to {patience_s:.0f}s", flush=True)
                warned = True
            time.sleep(5.0)


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """An http(s) tracking URI must answer before any training starts."""
    import requests

    from orchestrator.errors import ConfigError

    if not uri.startswith(("http://", "https://")):
        return
    base = uri.rstrip("/")
    try:
        r = requests.get(f"{base}/health", timeout=timeout_s)
        ok = r.status_code == 200
        if not ok:  # some deployments put MLflow behind a proxy without /health
            r = requests.get(f"{base}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                             timeout=timeout_s)
            ok = r.status_code == 200
        detail = f"HTTP {r.status_code}"
    except requests.exceptions.RequestException as exc:
        ok, detail = False, type(exc).__name__
    if not ok:
        raise ConfigError(f"tracking.uri: the MLflow server at {redact(uri)} does not answer ({detail}); "
                          "expected a running `mlflow server` (see cluster/mlflow-server.sh)")


def redact(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://***@host` (for anything printed or logged)."""
    import re

    return re.sub(r"(://)[^/@\s:]+(:[^/@\s]*)?@", r"\1***@", str(text))
