"""DP vs non-DP step time and peak memory, measured side by side in one run.

    python -m benchmarks.dp_overhead [--quick] [--json FILE] [--threads N]

For each model family and each per-sample gradient mode: the time of one optimizer step
with DP-SGD (per-sample gradients, clipping, noise) over the time of the same step without
DP, at equal physical batch, on the same process and inputs. Reported as a ratio because
absolute times depend on the machine; the ratio is what DP costs.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import statistics
import time

import torch

from models import build_adapter
from orchestrator.config import BetaVAEConfig, LDMConfig, VQVAEConfig
from trainers.privacy import Stepper, make_dp_stepper

N_LABELS = 6


def _ldm(shape):
    # the LDM trains in the latent space of a (frozen) beta-VAE, as in the two-stage study
    compression = build_adapter(BetaVAEConfig(channels=[16, 32], latent_channels=3, norm_num_groups=8), shape, 0)
    for p in compression.network.parameters():
        p.requires_grad_(False)
    return build_adapter(LDMConfig(channels=[32, 64], num_head_channels=16, label_embedding_dim=32), shape,
                         N_LABELS, compression=compression)


FAMILIES = {
    "beta_vae": lambda shape: build_adapter(BetaVAEConfig(channels=[16, 32], latent_channels=3, norm_num_groups=8),
                                            shape, N_LABELS),
    "vq_vae": lambda shape: build_adapter(VQVAEConfig(channels=[16, 32], num_embeddings=256, embedding_dim=4),
                                          shape, N_LABELS),
    "ldm": _ldm,
}
MODES = ["functorch", "hooks", "ghost"]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(stepper, adapter, batch, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        loss, _ = adapter.per_sample_loss(stepper.module, batch)
        stepper.backward(loss, getattr(adapter, "rows_per_sample", 1))
        stepper.microbatch_done(last=True)
        if i:  # the first step pays one-off costs (kernel selection, vmap tracing)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _one(family: str, mode, shape, batch_size: int, repeats: int, threads: int) -> tuple[float, float]:
    """Step time and peak RSS of one configuration, in a fresh process (so peaks don't mix)."""
    torch.set_num_threads(threads)
    batch = {"image": torch.rand(batch_size, 1, *shape), "labels": torch.rand(batch_size, N_LABELS) * 100,
             "label_mask": torch.rand(batch_size, N_LABELS) > 0.2}
    torch.manual_seed(0)
    adapter = FAMILIES[family](shape)
    opt = torch.optim.Adam([p for p in adapter.network.parameters() if p.requires_grad])
    if mode is None:
        stepper = Stepper(adapter.network, opt, 1)
    else:
        stepper = make_dp_stepper(mode, family, adapter.network, opt, 1, noise_multiplier=1.0, max_grad_norm=1.0,
                                  sample_rate=0.01, n_train=100 * batch_size, accountant="prv")
    return time_steps(stepper, adapter, batch, repeats), _peak_mb()


def measure(family: str, shape, batch_size: int, repeats: int, threads: int) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        base, base_mb = pool.apply(_one, (family, None, shape, batch_size, repeats, threads))
    rows = []
    for mode in MODES:
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            dp, dp_mb = pool.apply(_one, (family, mode, shape, batch_size, repeats, threads))
        rows.append({"family": family, "mode": mode, "shape": list(shape), "physical_batch": batch_size,
                     "nondp_step_s": round(base, 4), "dp_step_s": round(dp, 4),
                     "dp_over_nondp": round(dp / base, 2), "peak_mb": round(dp_mb, 1),
                     "nondp_peak_mb": round(base_mb, 1)})
        print(f"{family:<10} {mode:<10} non-DP {base:.3f}s  DP {dp:.3f}s  ratio {dp / base:.2f}x  "
              f"peak RSS {dp_mb:.0f} MB (non-DP {base_mb:.0f} MB)", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shape, few repeats (minutes on 2 cores)")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = one Ray worker's share)")
    args = p.parse_args(argv)
    shape, batch, repeats = ((13, 32, 32), 4, 3) if args.quick else ((13, 48, 48), 8, 5)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s); shape {shape}, physical batch {batch}")
    rows = []
    for family in FAMILIES:
        rows += measure(family, shape, batch, repeats, args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
