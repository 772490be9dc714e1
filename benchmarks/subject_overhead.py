"""Patient-level vs record-level DP step time per volume, measured side by side in one run.

    python -m benchmarks.subject_overhead [--quick] [--json FILE] [--threads N]

The same data (phantom-shaped volumes, two per subject as ED and ES frames) and the same
network (the demo's beta-VAE) trained one DP-SGD micro-batch at a time, twice: each volume
its own unit of privacy (`privacy.unit: record`), and the two frames of a subject summed and
clipped as one (`privacy.unit: subject`, the stepper's `units=`). Both steppers live in one
process and alternate steps, so load from other processes hits both alike; each side's time
is its fastest step over the repeats (the median is kept too). The ratio subject / record of
the time per volume is what patient-level privacy costs (the goal is within 1.1x).
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from benchmarks import write_json
from models import build_adapter
from orchestrator.config import BetaVAEConfig
from trainers.privacy import make_dp_stepper

SHAPE = (13, 32, 32)
MODES = ["bk", "hooks", "functorch"]


def _adapter():
    torch.manual_seed(0)
    return build_adapter(BetaVAEConfig(channels=[8, 16], latent_channels=3, norm_num_groups=4), SHAPE, 6)


def _stepper(adapter, mode):
    return make_dp_stepper(mode, "beta_vae", adapter.network, torch.optim.Adam(adapter.network.parameters(), lr=1e-4),
                           1, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, n_train=80,
                           accountant="rdp", noise_seed=0)


def _step(stepper, adapter, batch, units) -> float:
    t0 = time.perf_counter()
    loss, _ = adapter.per_sample_loss(stepper.module, batch)
    stepper.backward(loss, units=units)
    stepper.microbatch_done(last=True)
    return time.perf_counter() - t0


def measure(mode: str, batch_volumes: int, repeats: int) -> dict:
    torch.manual_seed(1)
    batch = {"image": torch.rand(batch_volumes, 1, *SHAPE), "labels": torch.rand(batch_volumes, 6),
             "label_mask": torch.ones(batch_volumes, 6, dtype=torch.bool)}
    units = torch.arange(batch_volumes // 2).repeat_interleave(2)   # subject u: volumes 2u (ED), 2u + 1 (ES)
    sides = {}
    for name in ("record", "subject"):   # the same initial weights on both sides
        adapter = _adapter()
        sides[name] = (adapter, _stepper(adapter, mode))
    times = {k: [] for k in sides}
    for i in range(repeats + 1):   # the first round warms up (bk times its kernels on it)
        for name, (adapter, stepper) in sides.items():
            t = _step(stepper, adapter, batch, units if name == "subject" else None)
            if i:
                times[name].append(t)
    per_volume = {k: min(v) / batch_volumes for k, v in times.items()}
    return {"mode": mode, "shape": "x".join(map(str, SHAPE)), "volumes_per_step": batch_volumes,
            "record_s_per_volume": per_volume["record"], "subject_s_per_volume": per_volume["subject"],
            "record_median_s": statistics.median(times["record"]), "subject_median_s": statistics.median(times["subject"]),
            "subject_over_record": per_volume["subject"] / per_volume["record"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.subject_overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="bk only, 3 repeats")
    ap.add_argument("--modes", nargs="+", default=None, choices=MODES)
    ap.add_argument("--batch", type=int, default=8, help="volumes per micro-batch (even: whole subjects)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    modes = args.modes or (["bk"] if args.quick else MODES)
    repeats = args.repeats or (3 if args.quick else 8)
    rows = [measure(mode, args.batch - args.batch % 2, repeats) for mode in modes]
    print("| mode | shape, volumes | record s/volume | subject s/volume | subject / record |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['shape']}, {r['volumes_per_step']} | {r['record_s_per_volume']:.4f} | "
              f"{r['subject_s_per_volume']:.4f} | {r['subject_over_record']:.2f}x |")
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
