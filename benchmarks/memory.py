"""Peak memory of DP-SGD at growing logical batch, same physical batch, measured in one run.

    python -m benchmarks.memory [--json FILE]

The claim under test (README, "How privacy is handled"): a logical (Poisson) batch is split
into physical micro-batches with Opacus's virtual-step protocol, so memory depends on the
physical batch only. Each logical batch size runs a few DP steps exactly as
`trainers/loop.py` does, in a fresh process, and reports what the steps added to the
process's memory: the peak RSS while they run (sampled every millisecond) minus the RSS
before them, after one warm-up step (interpreter, libraries, model, data and one-off costs
would otherwise dominate and hide any growth). The ratio of that
increment to the smallest logical batch's is what a larger batch costs (ideally 1.0).
`--physical 0` turns micro-batching off (one physical batch = the logical batch), the
contrast that shows the measurement can see growth.
"""
from __future__ import annotations

import argparse
import multiprocessing
import warnings
import time

import torch

from benchmarks import write_json

SHAPE = (5, 16, 16)
N_LABELS = 3


def _one(logical: int, physical: int, steps: int, n_train: int, threads: int, mode: str) -> dict:
    """`steps` DP steps at one logical batch; runs in its own process so peaks don't mix."""
    from models import build_adapter
    from orchestrator.config import BetaVAEConfig
    from benchmarks.dp_overhead import PeakMemory
    from trainers.privacy import PoissonSampler, make_dp_stepper

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Synthetic data held in memory: the same n_train for every size, so the dataset's share
    # of the peak is constant and only the logical batch varies.
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n_train, 1, *SHAPE, generator=gen)
    labels = torch.rand(n_train, N_LABELS, generator=gen) * 100
    torch.manual_seed(0)
    adapter = build_adapter(BetaVAEConfig(channels=[4, 8], latent_channels=2, norm_num_groups=4), SHAPE, N_LABELS)
    model = adapter.network.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stepper = make_dp_stepper(mode, "beta_vae", model, opt, 1, noise_multiplier=1.0, max_grad_norm=1.0,
                              sample_rate=logical / n_train, n_train=n_train, accountant="prv")
    sampler = PoissonSampler(n_train, logical, rank=0, world_size=1, seed=0)
    physical = physical or 10 * logical  # 0: no micro-batching (every Poisson batch in one piece)

    def micro(idx):
        batch = {"image": images[idx].to(device), "labels": labels[idx].to(device),
                 "label_mask": torch.ones(len(idx), N_LABELS, dtype=torch.bool, device=device)}
        loss, _ = adapter.per_sample_loss(stepper.module, batch)
        stepper.backward(loss, getattr(adapter, "rows_per_sample", 1))

    # One warm-up step at the smallest size, so one-off costs (the 3D conv samplers time their
    # methods on a layer's first batch, allocator pools, oneDNN primitives) are in the baseline.
    micro(torch.arange(min(8, physical)))
    stepper.microbatch_done(last=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    peak = PeakMemory(device)
    base_mb = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else peak.rss_mb()
    t0, seen = time.perf_counter(), 0
    # The micro-batch loop of trainers/loop.py, without Ray.
    with peak.track():
        seen = _steps(stepper, sampler, steps, physical, micro)
    assert stepper.steps == steps + 1, "every sampling event must be one accounted step"
    peak_mb = peak.peak_mb  # CUDA: allocated memory; CPU: resident set
    return {"peak_mb": peak_mb, "base_mb": base_mb, "increment_mb": peak_mb - base_mb,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
            "samples": seen, "seconds": time.perf_counter() - t0}


def _steps(stepper, sampler, steps, physical, micro) -> int:
    seen = 0
    for step, local in enumerate(sampler.epoch(0)):
        if step >= steps:
            break
        chunks = [local[i:i + physical] for i in range(0, len(local), physical)] or [local]
        for j, chunk in enumerate(chunks):
            if len(chunk) == 0:
                stepper.empty_microbatch()
            else:
                micro(torch.as_tensor(chunk))
                seen += len(chunk)
            stepper.microbatch_done(last=j == len(chunks) - 1)
    return seen


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 512, 4096], help="logical batch sizes")
    p.add_argument("--physical", type=int, default=8, help="physical (micro-)batch; 0: no micro-batching")
    p.add_argument("--mode", default="auto", help="grad_sample_mode")
    p.add_argument("--steps", type=int, default=2, help="DP steps per logical batch size")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each measuring process")
    args = p.parse_args(argv)
    sizes = sorted(args.sizes)
    n_train = 2 * sizes[-1]  # q = 1/2 at the largest size: a genuine Poisson sample, not the whole set
    print(f"beta_vae [4, 8], shape {SHAPE}, DP-SGD ({args.mode}), n_train {n_train}, physical batch "
          f"{args.physical}, {args.steps} step(s) per size, torch {torch.__version__}, "
          f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}", flush=True)

    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: ru_maxrss starts from zero
    rows = []
    for logical in sizes:
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            r = pool.apply(_one, (logical, args.physical, args.steps, n_train, args.threads, args.mode))
        row = {"logical_batch": logical, "physical_batch": args.physical or logical, "peak_mb": round(r["peak_mb"], 1),
               "increment_mb": round(r["increment_mb"], 1)}
        if r["cuda_peak_mb"] is not None:
            row["cuda_peak_mb"] = round(r["cuda_peak_mb"], 1)
        rows.append(row)
        print(f"  logical {logical}: {r['samples']} samples in {r['seconds']:.1f}s, peak RSS {r['peak_mb']:.0f} MB, "
              f"{r['increment_mb']:.1f} MB over the {r['base_mb']:.0f} MB before the measured steps",
              flush=True)
    for row in rows:
        row["peak_vs_smallest"] = round(row["peak_mb"] / rows[0]["peak_mb"], 3)
        row["increment_vs_smallest"] = (round(row["increment_mb"] / rows[0]["increment_mb"], 3)
                                         if rows[0]["increment_mb"] > 0 else None)   # 0 MB: nothing to divide by
        if "cuda_peak_mb" in row:
            row["cuda_peak_vs_smallest"] = round(row["cuda_peak_mb"] / rows[0]["cuda_peak_mb"], 3)

    cuda = "cuda_peak_mb" in rows[0]
    print(f"\n{'logical':>8}{'physical':>10}{'peak RSS MB':>13}{'increment MB':>14}{'vs smallest':>13}"
          + (f"{'CUDA MB':>10}" if cuda else ""))
    for r in rows:
        print(f"{r['logical_batch']:>8}{r['physical_batch']:>10}{r['peak_mb']:>13.1f}{r['increment_mb']:>14.1f}"
              + (f"{r['increment_vs_smallest']:>12.3f}x" if r["increment_vs_smallest"] is not None else f"{'-':>13}")
              + (f"{r['cuda_peak_mb']:>10.1f}" if cuda else ""))
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
