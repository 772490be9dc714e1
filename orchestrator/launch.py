"""`python -m orchestrator.launch SWEEP.yaml [--output DIR] [--smoke-test] [--resume] [--address ADDR] [--tracking-uri URI]`

Turns one sweep file into a whole study: validate (exit 2 on bad input, before anything
starts), start or join Ray, open the MLflow parent run, run each stage's Tune sweep in
dependency order, and print a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from orchestrator.errors import UserError

STATE_FILE = "launch.json"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m orchestrator.launch", description=__doc__.splitlines()[0])
    p.add_argument("sweep", help="sweep file (YAML)")
    p.add_argument("--output", help="override the sweep file's `output` folder")
    p.add_argument("--smoke-test", action="store_true", help="each trial runs 1 epoch of 2 steps")
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted launch in the same output folder (finished trials are kept)")
    p.add_argument("--address", help="override `cluster.address` (e.g. auto, ray://host:10001)")
    p.add_argument("--tracking-uri", help="override `tracking.uri` (e.g. http://127.0.0.1:5000)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's and Tune's own output (trial tables, worker logs) on the console too")
    return p.parse_args(argv)


def load_and_check(args):
    """Everything that can fail on user input, before Ray starts."""
    from orchestrator.sweep_file import load_sweep

    cfg = load_sweep(args.sweep)  # before the torch/Ray imports below: a typo is reported in a second
    from orchestrator.preflight import apply_smoke_test, preflight

    if args.output:
        cfg.output = args.output
    if args.address:
        cfg.cluster.address = args.address
    if args.tracking_uri:
        cfg.tracking.uri = args.tracking_uri
    if args.smoke_test:
        apply_smoke_test(cfg)
    out = cfg.output_dir
    if (out / STATE_FILE).exists() and not args.resume:
        state = json.loads((out / STATE_FILE).read_text())
        if state.get("status") != "finished":
            raise UserError(f"{out}: holds an unfinished launch; add --resume to finish it, "
                            f"or choose another --output")
    plans = preflight(cfg)
    return cfg, plans


def quiet_console(verbose: bool) -> None:
    """Ray, Tune and MLflow log at INFO to the console; a healthy launch shows only its own
    lines (orchestrator/progress.py). Warnings and errors still come through."""
    import logging

    if verbose:
        return
    for name in ("ray", "ray.tune", "ray.train", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # the dashboard line below says where the token is; Ray's own notice is three lines more
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Tune's legacy reporter at verbosity 0 prints nothing (the new one still prints tables)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def start_ray(cfg, verbose: bool = False):
    import logging

    import ray

    c = cfg.cluster
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    # A stage may rank trials by a metric only the final evaluation reports (fidelity/fd).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Worker output (each trial's own lines, Ray Train's messages) goes to Ray's log files
    # and the dashboard; the console gets the driver's progress lines only.
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    if c.address:
        ray.init(address=c.address, **quiet)
        print(f"joined Ray cluster at {c.address}", flush=True)
    else:
        cores = os.cpu_count() or 1
        # Declare a little more than the cores so the trial drivers (a sliver of CPU each)
        # never block Train workers from taking every real core.
        num_cpus = c.num_cpus or cores
        # Each trial is three processes (Tune driver, Train controller, worker); Ray's raylet
        # warns once more than 4 x this many start at once, which a healthy sweep does.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(4, 2 * num_cpus)))
        # Ray Train starts a preemption-watcher actor (one more process) per trial to notice
        # nodes being drained; the one machine of a local cluster is never drained. Measured:
        # the demo's smoke test 131 -> 117 s. On a joined cluster it stays on.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ctx = ray.init(num_cpus=num_cpus + 1, include_dashboard=True, dashboard_host=c.dashboard_host, **quiet)
        url = getattr(ctx, "dashboard_url", None)
        if url:
            url = url if url.startswith("http") else f"http://{url}"
            token = Path.home() / ".ray" / "auth_token"
            auth = f" (sign in with the token in {token})" if token.exists() else ""
            print(f"Ray dashboard: {url}{auth}", flush=True)
        if c.dashboard_host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: the Ray dashboard listens on {c.dashboard_host}, reachable from other machines",
                  flush=True)
    if not verbose:
        logs = _session_logs(ray)
        print(f"worker logs (every trial's own output): {logs or 'Ray session logs'}; "
              "--verbose shows them here too", flush=True)
    return ray


def _session_logs(ray) -> str:
    try:
        return str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs")
    except Exception:  # noqa: BLE001 - only a hint; joined clusters keep logs on their nodes
        return ""


def _alive_nodes(ray) -> list[dict]:
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def cluster_plan(cfg, ray, nodes: list[dict] | None = None):
    """(use GPUs?, trials at once). A trial that could never be placed on this cluster is a
    clear error now, not a sweep that waits forever for resources."""
    from orchestrator.trial import DRIVER_CPUS

    c = cfg.cluster
    nodes = _alive_nodes(ray) if nodes is None else nodes
    total_cpu = sum(n.get("CPU", 0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0) for n in nodes)
    use_gpu = total_gpu > 0 if c.use_gpu == "auto" else bool(c.use_gpu)
    where = f"the cluster ({len(nodes)} node(s), {total_cpu:g} CPUs, {total_gpu:g} GPUs)"
    if use_gpu:
        if total_gpu == 0:
            raise UserError(f"cluster.use_gpu: true, but {where} has no GPUs; expected auto or false")
        if c.gpus_per_worker < 1 and c.workers_per_trial > 1:
            raise UserError("cluster.gpus_per_worker: a fraction of a GPU per worker with workers_per_trial > 1 can "
                            "put two NCCL ranks of one trial on the same GPU; expected gpus_per_worker >= 1, "
                            "or workers_per_trial: 1 for small trials")
        if c.gpus_per_worker > 1 and c.gpus_per_worker != int(c.gpus_per_worker):
            raise UserError(f"cluster.gpus_per_worker: {c.gpus_per_worker:g}; expected a fraction below 1 or a whole number")
        if not any(n.get("GPU", 0) >= c.gpus_per_worker and n.get("CPU", 0) >= c.cpus_per_worker for n in nodes):
            raise UserError(f"cluster.gpus_per_worker: no node of {where} has {c.gpus_per_worker:g} GPU(s) and "
                            f"{c.cpus_per_worker:g} CPUs free for one worker")
    elif not any(n.get("CPU", 0) >= c.cpus_per_worker for n in nodes):
        raise UserError(f"cluster.cpus_per_worker: {c.cpus_per_worker:g}, but no node of {where} has that many CPUs")
    trial_cpu = c.workers_per_trial * c.cpus_per_worker
    if trial_cpu > total_cpu:
        raise UserError(f"cluster.workers_per_trial: a trial needs {c.workers_per_trial} x {c.cpus_per_worker:g} = "
                        f"{trial_cpu:g} CPUs, {where} has {total_cpu:g}")
    if c.address:
        # Each trial's driver holds a sliver of CPU on some node, which can cost that node a
        # whole worker slot; count the worst case so trials never wait on each other forever.
        def slots(k: int) -> int:
            whole = sum(int(n.get("CPU", 0) // c.cpus_per_worker) for n in nodes)
            broken = sum(1 for n in sorted(nodes, key=lambda n: -n.get("CPU", 0))[:k]
                         if (n.get("CPU", 0) - DRIVER_CPUS) // c.cpus_per_worker < n.get("CPU", 0) // c.cpus_per_worker)
            return whole - broken
        if slots(1) < c.workers_per_trial:
            raise UserError(f"cluster.workers_per_trial: a trial needs {c.workers_per_trial} worker(s) of "
                            f"{c.cpus_per_worker:g} CPUs plus {DRIVER_CPUS} CPU for its driver; {where} cannot place them")
        fit = max(k for k in range(1, int(total_cpu // trial_cpu) + 1) if k * c.workers_per_trial <= slots(k))
    else:
        # Local Ray declares one CPU more than the cores, for the trial drivers (see start_ray).
        fit = int(max(total_cpu - 1, trial_cpu) // trial_cpu)
    if use_gpu:
        trial_gpu = c.workers_per_trial * c.gpus_per_worker
        if trial_gpu > total_gpu:
            raise UserError(f"cluster.workers_per_trial: a trial needs {c.workers_per_trial} x {c.gpus_per_worker:g} "
                            f"= {trial_gpu:g} GPUs, {where} has {total_gpu:g}")
        workers_fit = sum(int(n.get("GPU", 0) // c.gpus_per_worker) for n in nodes)
        fit = min(fit, max(1, workers_fit // c.workers_per_trial))
    concurrent = c.max_concurrent_trials or max(1, fit)
    gpu = f", {c.gpus_per_worker:g} GPU" if use_gpu else ""
    print(f"placement: up to {concurrent} trial(s) at once, each {c.workers_per_trial} worker(s) x "
          f"({c.cpus_per_worker:g} CPU{gpu}) on {where}", flush=True)
    return use_gpu, concurrent


def _quiet_mlflow_retries() -> None:
    # MLflow's own http retries would stall the Tune loop for minutes while a server
    # restarts; the trial logger queues writes and retries itself (orchestrator/tracking.py).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def main(argv=None) -> int:
    args = parse_args(argv)
    _quiet_mlflow_retries()
    try:
        cfg, plans = load_and_check(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        from orchestrator.sweep import run_sweep

        quiet_console(args.verbose)
        ray = start_ray(cfg, args.verbose)
        use_gpu, concurrent = cluster_plan(cfg, ray)
        return run_sweep(cfg, plans, args, use_gpu=use_gpu, max_concurrent=concurrent, nodes=_alive_nodes(ray))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        from orchestrator.tracking import redact

        again = "".join(f" --{k.replace('_', '-')} {v}" for k, v in
                        (("output", args.output), ("address", args.address), ("tracking_uri", args.tracking_uri)) if v)
        print(f"\ninterrupted; finish it with: python -m orchestrator.launch {args.sweep} --resume"
              + redact(again), file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
