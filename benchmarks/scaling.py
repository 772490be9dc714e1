"""Throughput of one trial on 1 vs 2 Ray Train workers, DP and non-DP, measured in one run.

    python -m benchmarks.scaling [--quick] [--json FILE]

Runs the real training loop (`trainers.loop.train_worker`) through `TorchTrainer` on a local
Ray, four times: {non-DP, DP} x {1, 2 workers}, same stage, same phantom data. Reports the
samples/s the loop itself reports for its LAST epoch (epoch 1 pays warm-up: data loading,
kernel selection, functorch tracing) and the speedup of 2 workers over 1. Absolute figures
depend on the machine; the speedup is what a second worker buys.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import write_json

SHAPE = (13, 32, 32)
LABELS = ("LVEDV", "LVESV", "ESED")


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"cores": os.cpu_count(), "cpu": model, "torch": torch.__version__, "gpus": gpus,
            "gpu": torch.cuda.get_device_name(0) if gpus else None}


def stage_dict(dp: bool, epochs: int, batch: int) -> dict:
    # A fixed sigma (not target_epsilon) so no accountant search runs inside the timing.
    return {"model": {"kind": "beta_vae", "channels": [8, 16], "norm_num_groups": 4},
            "train": {"epochs": epochs, "batch_size": batch, "physical_batch_size": 8, "seed": 0,
                      "sample_grid": 0},
            "dp": {"enabled": dp, "noise_multiplier": 1.0, "max_grad_norm": 1.0}}


def run_one(dp: bool, workers: int, *, root: Path, tmp: Path, epochs: int, batch: int, use_gpu: bool) -> float:
    """One Ray Train run; returns rank 0's samples/s of the last epoch (global samples)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.config import DataConfig
    from trainers.loop import train_worker

    name = f"scaling-{'dp' if dp else 'nondp'}-{workers}w"
    # The keys train_worker reads, as orchestrator/sweep.py builds them for a real stage.
    meta = {"stage": name, "data": DataConfig(root=str(root), labels=list(LABELS), shape=SHAPE).model_dump(),
            "delta": 1e-3, "accountant": "prv", "workers": workers, "cpus_per_worker": 1, "use_gpu": use_gpu,
            "storage_path": str(tmp / "ray_results"), "max_failures": 0, "cache_dir": str(tmp / ".cache"),
            "run_prefix": name, "needs": None, "init_from": None, "scale_data": None}
    resources = {"CPU": 1, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker, train_loop_config={"stage": stage_dict(dp, epochs, batch), "meta": meta},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=name, storage_path=meta["storage_path"],
                                       failure_config=ray.train.FailureConfig(max_failures=0)))
    result = trainer.fit()
    # result.metrics is the last report (rank 0's, which carries the checkpoint): the last epoch.
    if result.metrics.get("epoch") != epochs:
        raise RuntimeError(f"{name}: last report is epoch {result.metrics.get('epoch')}, expected {epochs}")
    return float(result.metrics["perf/samples_per_s"])


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer volumes and epochs (~5 min on 2 cores)")
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args(argv)
    # quick: 64 training volumes, batch 16 -> 4 steps/epoch (2 micro-batches of 8 on 1 worker,
    # 1 per rank on 2); full: 4x the data, 3 epochs, so warm-up and noise weigh less.
    n, epochs, batch = (80, 2, 16) if args.quick else (320, 3, 32)

    m = machine()
    use_gpu = m["gpus"] >= 2
    gpu = f"{m['gpus']} x {m['gpu']}" if m["gpus"] else "none"
    print(f"machine: {m['cores']} cores, {m['cpu']}, torch {m['torch']}, GPU: {gpu}, "
          f"load average {os.getloadavg()[0]:.1f}")
    if m["gpus"] == 1:
        print("note: 1 GPU only; 2 workers need one each, so this compares CPU workers")
    print(f"trial: beta_vae [8, 16], shape {SHAPE}, {int(n * 0.8)} training volumes, batch {batch}, "
          f"physical 8, {epochs} epochs, 1 CPU{' + 1 GPU' if use_gpu else ''} and 1 torch thread per worker",
          flush=True)

    import ray

    from trainers.phantoms import synthesize

    rows = []
    with tempfile.TemporaryDirectory(prefix="dp-scaling-") as d:
        tmp = Path(d)
        synthesize(tmp / "data", n=n, shape=SHAPE, seed=0, labels=LABELS)
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
        # 2 workers x 1 CPU must fit; Train V2's controller actor takes no CPU. The dashboard
        # must run: Train V2's placement-group cleaner asks the State API (served by it)
        # whether the controller lives, and without an answer it removes the live workers.
        ray.init(num_cpus=max(2, m["cores"] or 1), include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=False)
        try:
            for dp in (False, True):
                base = None
                for workers in (1, 2):
                    t0 = time.perf_counter()
                    sps = run_one(dp, workers, root=tmp / "data", tmp=tmp, epochs=epochs, batch=batch,
                                  use_gpu=use_gpu)
                    base = base or sps
                    rows.append({"dp": dp, "workers": workers, "samples_per_s": round(sps, 2),
                                 "speedup_vs_1": round(sps / base, 2)})
                    print(f"  {'DP' if dp else 'non-DP'}, {workers} worker(s): {sps:.2f} samples/s "
                          f"(run {time.perf_counter() - t0:.0f}s)", flush=True)
        finally:
            ray.shutdown()

    # Other processes competing for the cores cap the 2-worker speedup; show how busy it was.
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (on {m['cores']} cores)")
    print(f"{'mode':<8}{'workers':>8}{'samples/s':>12}{'speedup':>10}")
    for r in rows:
        print(f"{'DP' if r['dp'] else 'non-DP':<8}{r['workers']:>8}{r['samples_per_s']:>12.2f}"
              f"{r['speedup_vs_1']:>9.2f}x")
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
