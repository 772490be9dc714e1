"""What starting one Ray Train run costs on a local cluster: the stock TorchTrainer against the
trainer a local launch uses (`orchestrator.trial._local_trainer_class`), side by side in one run.

    python -m benchmarks.trial_start [--runs N] [--workers W] [--json FILE]

On one local Ray, alternates N runs of each trainer (stock, local, stock, local, ...), every
run a Train worker group of W gloo workers whose train function reports one metric and
returns: all that is left is what Ray Train costs to start and stop a run. Reports, per
trainer, the median wall time of `fit()` and the actors each run started (by class), and the
ratio local / stock. A sweep pays this once per trial; the test suite's end-to-end tests run
about 40 trials.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import Counter

from benchmarks import write_json


def _report_once(config: dict) -> None:
    import ray.train

    ray.train.report({"done": 1})


def _actor_classes() -> Counter:
    """Every actor the cluster has started (dead ones included), by class."""
    from ray.util.state import list_actors

    return Counter(a.class_name for a in list_actors(limit=10000, raise_on_missing_output=False))


def run_one(trainer_class, workers: int, storage: str, name: str) -> float:
    import ray.train
    from ray.train.torch import TorchConfig

    trainer = trainer_class(
        _report_once, train_loop_config={},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(name=name, storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=0)))
    t0 = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="runs of each trainer (default 3)")
    p.add_argument("--workers", type=int, default=1, help="Train workers per run (default 1)")
    p.add_argument("--json", help="write the result as JSON here")
    args = p.parse_args(argv)

    import ray
    from ray.train.torch import TorchTrainer

    from orchestrator.trial import _local_trainer_class

    local = _local_trainer_class()
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")   # as a local launch sets it
    # the dashboard serves the state API that lists the actors each run started
    ray.init(num_cpus=max(args.workers, os.cpu_count() or 1) + 1, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False, logging_level="WARNING")
    walls = {"stock": [], "local": []}
    actors = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_one(TorchTrainer, args.workers, tmp, "warm-up")   # first run imports and caches
            for i in range(args.runs):
                for label, cls in (("stock", TorchTrainer), ("local", local)):
                    before = _actor_classes()
                    walls[label].append(run_one(cls, args.workers, tmp, f"{label}-{i}"))
                    actors[label] = dict(_actor_classes() - before)
    finally:
        ray.shutdown()
    result = {"workers": args.workers, "runs": args.runs,
              **{f"{k}_median_s": statistics.median(v) for k, v in walls.items()},
              "walls_s": walls, "actors_per_run": actors}
    result["local_over_stock"] = result["local_median_s"] / result["stock_median_s"]
    print(f"Ray Train run start+stop, {args.workers} worker(s), median of {args.runs}: "
          f"stock {result['stock_median_s']:.1f} s, local {result['local_median_s']:.1f} s "
          f"(local / stock = {result['local_over_stock']:.2f})")
    for label in ("stock", "local"):
        print(f"  actors per run, {label}: " + ", ".join(f"{k} x{n}" for k, n in sorted(actors[label].items())))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
