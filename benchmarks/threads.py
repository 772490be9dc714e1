"""One thread against several: what `cluster.spread_cpus` buys a lone non-DP trial.

    python -m benchmarks.threads [--quick] [--threads N] [--json FILE]

For the privacy_cost study's two networks at its size (13 x 32 x 32: the in-plane beta-VAE,
8/16/16 channels, batch 16; the in-plane LDM, 16/32 channels, on that beta-VAE's frozen
latent, batch 32), both in `channels_last_3d`: the time of one non-DP optimizer step with 1
torch thread and with N, alternated step by step in one process so load from elsewhere hits
both alike. Each side's time is its fastest step; the ratio is the speed-up a trial gets when
it is given N CPUs instead of 1.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks import write_json
from models import build_adapter
from orchestrator.config import BetaVAEConfig, LDMConfig
from trainers.privacy import Stepper

SHAPE = (13, 32, 32)
N_LABELS = 6


def _compression():
    return build_adapter(BetaVAEConfig(downsample="in_plane", channels=[8, 16, 16], latent_channels=2,
                                       norm_num_groups=4), SHAPE, N_LABELS)


def _ldm():
    compression = _compression()
    for p in compression.network.parameters():
        p.requires_grad_(False)
    compression.network.to(memory_format=torch.channels_last_3d)
    return build_adapter(LDMConfig(downsample="in_plane", channels=[16, 32], num_head_channels=8, norm_num_groups=8,
                                   label_embedding_dim=16, label_conditioning="embedding", num_train_timesteps=200),
                         SHAPE, N_LABELS, compression=compression)


FAMILIES = {"beta_vae": (_compression, 16), "ldm": (_ldm, 32)}


def measure(family: str, threads: int, repeats: int) -> dict:
    build, batch_size = FAMILIES[family]
    torch.manual_seed(0)
    adapter = build()
    net = adapter.network.to(memory_format=torch.channels_last_3d)
    stepper = Stepper(net, torch.optim.Adam([p for p in net.parameters() if p.requires_grad]), 1)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(batch_size, 1, *SHAPE, generator=g).contiguous(memory_format=torch.channels_last_3d),
             "labels": torch.rand(batch_size, N_LABELS, generator=g) * 100,
             "label_mask": torch.ones(batch_size, N_LABELS, dtype=torch.bool)}
    times = {1: [], threads: []}
    for i in range(repeats + 1):
        for n in (1, threads):
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            loss, _ = adapter.per_sample_loss(stepper.module, batch)
            stepper.backward(loss.float(), 1)
            stepper.microbatch_done(last=True)
            if i:   # the first round warms up
                times[n].append(time.perf_counter() - t0)
    one, many = min(times[1]), min(times[threads])
    return {"family": family, "batch": batch_size, "shape": list(SHAPE), "threads": threads,
            "one_thread_step_s": one, "n_threads_step_s": many, "speedup": one / many,
            "one_thread_vol_per_s": batch_size / one, "n_threads_vol_per_s": batch_size / many}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 timed steps per side")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="the wide side's threads")
    p.add_argument("--repeats", type=int, help="timed steps per side (default 5; 2 with --quick)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    print(f"{os.cpu_count()} cores, torch {torch.__version__}; shape {SHAPE}, 1 vs {args.threads} threads, "
          f"{repeats} timed steps each", flush=True)
    rows = [measure(f, args.threads, repeats) for f in args.families]
    print(f"| network, batch | 1 thread | {args.threads} threads | speed-up |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']}, {r['batch']} | {r['one_thread_step_s']:.2f} s ({r['one_thread_vol_per_s']:.1f} vol/s) "
              f"| {r['n_threads_step_s']:.2f} s ({r['n_threads_vol_per_s']:.1f} vol/s) | {r['speedup']:.2f}x |")
    write_json(args.json, rows)
    torch.set_num_threads(1)
    return rows


if __name__ == "__main__":
    main()
