"""Encoding every step against cached latents: what `LatentCache` buys a latent diffusion step.

    python -m benchmarks.latent_cache [--quick] [--threads N] [--json FILE]

For the privacy_cost study's LDM at its size (13 x 32 x 32 volumes; the in-plane beta-VAE,
8/16/16 channels, frozen; the in-plane LDM, 16/32 channels, batch 32, `channels_last_3d`):
the time of one optimizer step that encodes its batch through the frozen compression model
(what every epoch did before trainers/data.py's LatentCache) and of one that reads the
batch's cached latents, alternated step by step in one process so load from elsewhere hits
both alike, non-DP and DP (book-keeping, Opacus's noise and clipping). Each side's time is
its fastest step; the ratio is the speed-up of a training step. Both sides compute the same
loss (tests/test_ldm.py checks it draw for draw).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks import write_json
from benchmarks.threads import N_LABELS, SHAPE, _ldm
from trainers.privacy import Stepper, make_dp_stepper

BATCH = 32


def _stepper(net, dp: bool):
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad])
    if not dp:
        return Stepper(net, opt, 1)
    return make_dp_stepper("bk", "ldm", net, opt, 1, noise_multiplier=1.0, max_grad_norm=1.0,
                           sample_rate=BATCH / 1024, n_train=1024, accountant="prv")


def measure(dp: bool, repeats: int) -> dict:
    torch.manual_seed(0)
    adapter = _ldm()
    net = adapter.network.to(memory_format=torch.channels_last_3d)
    stepper = _stepper(net, dp)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(BATCH, 1, *SHAPE, generator=g).contiguous(memory_format=torch.channels_last_3d),
             "labels": torch.rand(BATCH, N_LABELS, generator=g) * 100,
             "label_mask": torch.ones(BATCH, N_LABELS, dtype=torch.bool)}
    cached = {**batch, "latent": adapter.encode(batch["image"])}
    times = {"encode": [], "cached": []}
    for i in range(repeats + 1):
        for side, b in (("encode", batch), ("cached", cached)):
            t0 = time.perf_counter()
            loss, _ = adapter.per_sample_loss(stepper.module, b)
            stepper.backward(loss.float(), 1)
            stepper.microbatch_done(last=True)
            if i:   # the first round warms up
                times[side].append(time.perf_counter() - t0)
    enc, cache = min(times["encode"]), min(times["cached"])
    return {"dp": dp, "batch": BATCH, "shape": list(SHAPE), "threads": torch.get_num_threads(),
            "encode_step_s": enc, "cached_step_s": cache, "speedup": enc / cache,
            "encode_vol_per_s": BATCH / enc, "cached_vol_per_s": BATCH / cache}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 timed steps per side")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a DP trial's)")
    p.add_argument("--repeats", type=int, help="timed steps per side (default 5; 2 with --quick)")
    p.add_argument("--modes", nargs="+", default=["non-DP", "DP"], choices=["non-DP", "DP"])
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s); LDM on {SHAPE}, "
          f"batch {BATCH}, {repeats} timed steps each", flush=True)
    rows = [measure(m == "DP", repeats) for m in args.modes]
    print("| step | encoding the batch | cached latents | speed-up |\n|---|---|---|---|")
    for r in rows:
        print(f"| {'DP (bk)' if r['dp'] else 'non-DP'} | {r['encode_step_s']:.3f} s ({r['encode_vol_per_s']:.1f} vol/s) "
              f"| {r['cached_step_s']:.3f} s ({r['cached_vol_per_s']:.1f} vol/s) | {r['speedup']:.2f}x |")
    write_json(args.json, rows)
    torch.set_num_threads(before)
    return rows


if __name__ == "__main__":
    main()
