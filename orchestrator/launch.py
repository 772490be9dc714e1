"""`python -m orchestrator.launch SWEEP.yaml [--output DIR] [--smoke-test] [--resume] [--address ADDR]`

Turns one sweep file into a whole study: validate (exit 2 on bad input, before anything
starts), start or join Ray, open the MLflow parent run, run each stage's Tune sweep in
dependency order, and print a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
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
    return p.parse_args(argv)


def load_and_check(args):
    """Everything that can fail on user input, before Ray starts."""
    from orchestrator.config import load_sweep
    from orchestrator.preflight import apply_smoke_test, preflight

    cfg = load_sweep(args.sweep)
    if args.output:
        cfg.output = args.output
    if args.address:
        cfg.cluster.address = args.address
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


def start_ray(cfg):
    import ray

    c = cfg.cluster
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    if c.address:
        ray.init(address=c.address, log_to_driver=True)
        print(f"joined Ray cluster at {c.address}", flush=True)
    else:
        cores = os.cpu_count() or 1
        # Declare a little more than the cores so the trial drivers (a sliver of CPU each)
        # never block Train workers from taking every real core.
        num_cpus = c.num_cpus or cores
        ctx = ray.init(num_cpus=num_cpus + 1, include_dashboard=True, dashboard_host=c.dashboard_host,
                       log_to_driver=True)
        url = getattr(ctx, "dashboard_url", None)
        if url:
            url = url if url.startswith("http") else f"http://{url}"
            token = Path.home() / ".ray" / "auth_token"
            auth = f" (sign in with the token in {token})" if token.exists() else ""
            print(f"Ray dashboard: {url}{auth}", flush=True)
        if c.dashboard_host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: the Ray dashboard listens on {c.dashboard_host}, reachable from other machines",
                  flush=True)
    return ray


def cluster_plan(cfg, ray):
    res = ray.cluster_resources()
    c = cfg.cluster
    use_gpu = (res.get("GPU", 0) > 0) if c.use_gpu == "auto" else bool(c.use_gpu)
    if use_gpu and res.get("GPU", 0) < c.workers_per_trial:
        raise UserError(f"cluster.use_gpu: a trial needs {c.workers_per_trial} GPU(s), the cluster has "
                        f"{res.get('GPU', 0):g}")
    cpus = res.get("CPU", 0) - (1 if not c.address else 0)
    per_trial = c.workers_per_trial * c.cpus_per_worker
    if per_trial > res.get("CPU", 0):
        raise UserError(f"cluster.workers_per_trial: a trial needs {per_trial:g} CPUs, the cluster has "
                        f"{res.get('CPU', 0):g}")
    fit = int(res.get("GPU", 0) // c.workers_per_trial) if use_gpu else int(max(cpus, per_trial) // per_trial)
    return use_gpu, c.max_concurrent_trials or max(1, fit)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, plans = load_and_check(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        from orchestrator.sweep import run_sweep

        ray = start_ray(cfg)
        use_gpu, concurrent = cluster_plan(cfg, ray)
        return run_sweep(cfg, plans, args, use_gpu=use_gpu, max_concurrent=concurrent)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"\ninterrupted; finish it with: python -m orchestrator.launch {args.sweep} --resume"
              + (f" --output {args.output}" if args.output else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
