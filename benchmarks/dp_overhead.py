"""DP vs non-DP step time and peak memory, measured side by side in one run.

    python -m benchmarks.dp_overhead [--quick] [--json FILE] [--threads N] [--device cuda] [--bf16]

For each model family and each per-sample gradient mode: the time of one optimizer step
with DP-SGD (per-sample gradients, clipping, noise) over the time of the same step without
DP, at equal physical batch and inputs. Each (family, mode) runs in a fresh process that
holds both a DP and a non-DP copy of the model and alternates their steps, so load from
other processes hits both sides alike. Each side's time is its fastest step (other load only
ever adds time, and the machines these numbers come from are shared); the median is kept in
the JSON too. The ratio of the two is what DP costs.

The baseline is the fastest non-DP step we can run: each family's non-DP step is first timed
in the default layout and in `channels_last_3d`, and the faster layout is used by both sides.
Peak memory is the process's resident set (CUDA: allocated memory) sampled while each side's
steps run, so each side's peak is its own.
The full run also times each family at the paper's volume size, 13 x 96 x 96 (`--reference`).
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import statistics
import threading
import time
import warnings

import torch

from benchmarks import write_json
from models import build_adapter
from orchestrator.config import BetaVAEConfig, LDMConfig, VQVAEConfig
from trainers.privacy import Stepper, make_dp_stepper

N_LABELS = 6
REFERENCE_SHAPE = (13, 96, 96)


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
MODES = ["functorch", "hooks", "ghost", "bk"]
LAYOUTS = {"default": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


class PeakMemory:
    """Peak memory while a block runs: CUDA allocated bytes, or this process's RSS sampled
    from /proc every millisecond (large tensors are returned to the OS when freed, so the
    current RSS follows them; ru_maxrss would mix the two sides)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    @contextlib.contextmanager
    def track(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            yield
            torch.cuda.synchronize()
            self.peak_mb = max(self.peak_mb, torch.cuda.max_memory_allocated() / 2**20)
            return
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                self.peak_mb = max(self.peak_mb, self.rss_mb())
                stop.wait(0.001)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
            self.peak_mb = max(self.peak_mb, self.rss_mb())


class Side:
    """One model copy (DP or not) and its step."""

    def __init__(self, family, mode, shape, layout, device, bf16, batch):
        torch.manual_seed(0)
        self.adapter = FAMILIES[family](shape)
        net = self.adapter.network.to(device=device, memory_format=LAYOUTS[layout])
        comp = getattr(self.adapter, "compression", None)
        if comp is not None:
            comp.network.to(device=device, memory_format=LAYOUTS[layout])
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad])
        if mode is None:
            self.stepper = Stepper(net, opt, 1)
        else:
            self.stepper = make_dp_stepper(mode, family, net, opt, 1, noise_multiplier=1.0, max_grad_norm=1.0,
                                           sample_rate=0.01, n_train=100 * len(batch["image"]), accountant="prv")
        self.batch = {k: v.to(device) for k, v in batch.items()}
        self.batch["image"] = self.batch["image"].contiguous(memory_format=LAYOUTS[layout])
        self.device, self.bf16 = device, bf16
        self.memory, self.times = PeakMemory(device), []

    def step(self, timed: bool) -> None:
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with self.memory.track():
            t0 = time.perf_counter()
            with autocast:
                loss, _ = self.adapter.per_sample_loss(self.stepper.module, self.batch)
            self.stepper.backward(loss.float(), getattr(self.adapter, "rows_per_sample", 1))
            self.stepper.microbatch_done(last=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            if timed:
                self.times.append(time.perf_counter() - t0)

    @property
    def best(self) -> float:
        return min(self.times)


def _batch(shape, batch_size):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(batch_size, 1, *shape, generator=g),
            "labels": torch.rand(batch_size, N_LABELS, generator=g) * 100,
            "label_mask": torch.rand(batch_size, N_LABELS, generator=g) > 0.2}


def _pair(family, modes, shape, batch_size, repeats, threads, layouts, device, bf16) -> list[dict]:
    """In one fresh process: sides built for each (mode, layout), stepped in turn `repeats`
    times after one warm-up step each (kernel selection, vmap tracing)."""
    torch.set_num_threads(threads)
    # Opacus's hooks on a first layer whose input needs no gradient: expected, not news
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")  # Opacus functorch
    device = torch.device(device)
    batch = _batch(shape, batch_size)
    sides = [Side(family, m, shape, lay, device, bf16, batch) for m in modes for lay in layouts]
    for s in sides:
        s.step(timed=False)
    for _ in range(repeats):
        for s in sides:
            s.step(timed=True)
    return [{"mode": m, "layout": lay, "step_s": s.best, "median_s": statistics.median(s.times), "peak_mb": s.memory.peak_mb}
            for (m, lay), s in zip([(m, lay) for m in modes for lay in layouts], sides)]


def _run(*args):
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per configuration
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(_pair, args)


def measure(family: str, modes, shape, batch_size: int, repeats: int, threads: int, device: str, bf16: bool) -> list[dict]:
    layouts = _run(family, [None], shape, batch_size, max(2, repeats // 2), threads, list(LAYOUTS), device, bf16)
    layout = min(layouts, key=lambda r: r["step_s"])["layout"]
    print(f"{family:<10} non-DP layouts: " + ", ".join(f"{r['layout']} {r['step_s']:.3f}s" for r in layouts)
          + f" -> {layout}", flush=True)
    rows = []
    for mode in modes:
        base, dp = _run(family, [None, mode], shape, batch_size, repeats, threads, [layout], device, bf16)
        rows.append({"family": family, "mode": mode, "shape": list(shape), "physical_batch": batch_size,
                     "layout": layout, "device": device, "bf16": bf16,
                     "nondp_step_s": round(base["step_s"], 4), "dp_step_s": round(dp["step_s"], 4),
                     "nondp_median_s": round(base["median_s"], 4), "dp_median_s": round(dp["median_s"], 4),
                     "dp_over_nondp": round(dp["step_s"] / base["step_s"], 2),
                     "peak_mb": round(dp["peak_mb"], 1), "nondp_peak_mb": round(base["peak_mb"], 1),
                     "peak_ratio": round(dp["peak_mb"] / base["peak_mb"], 2)})
        print(f"{family:<10} {mode:<10} non-DP {base['step_s']:.3f}s  DP {dp['step_s']:.3f}s  "
              f"ratio {dp['step_s'] / base['step_s']:.2f}x  peak {dp['peak_mb']:.0f} MB (non-DP {base['peak_mb']:.0f} MB)",
              flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown, one line per (shape, family, mode); the fastest mode per family is `auto`'s pick."""
    out = ["| size, batch | family | mode | non-DP step | DP step | DP / non-DP | peak MB DP (non-DP) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        best = min((x for x in rows if x["family"] == r["family"] and x["shape"] == r["shape"]),
                   key=lambda x: x["dp_step_s"])
        mark = "**" if r is best else ""
        out.append(f"| {'x'.join(map(str, r['shape']))}, {r['physical_batch']} | {r['family']} | {mark}{r['mode']}{mark} "
                   f"| {r['nondp_step_s']:.2f} s | {r['dp_step_s']:.2f} s | {mark}{r['dp_over_nondp']:.2f}x{mark} "
                   f"| {r['peak_mb']:.0f} ({r['nondp_peak_mb']:.0f}) |")
    return "\n".join(out)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shape, few repeats (minutes on 2 cores)")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = one Ray worker's share)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--shape", type=int, nargs=3, help="override the volume size (D H W)")
    p.add_argument("--batch", type=int, help="override the physical batch")
    p.add_argument("--repeats", type=int, help="override the timed steps per side")
    p.add_argument("--reference", choices=["auto", "on", "off"], default="auto",
                   help=f"also run {REFERENCE_SHAPE} (auto: in the full run only)")
    p.add_argument("--reference-batch", type=int, default=8, help="physical batch at the reference size")
    p.add_argument("--reference-modes", nargs="+", default=["bk"], choices=MODES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="forward under bfloat16 autocast (both sides)")
    args = p.parse_args(argv)
    shape, batch, repeats = ((13, 32, 32), 4, 3) if args.quick else ((13, 48, 48), 8, 5)
    shape, batch, repeats = tuple(args.shape or shape), args.batch or batch, args.repeats or repeats
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else (platform.processor() or platform.machine())
    print(f"machine: {dev}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s), "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}; shape {shape}, physical batch {batch}, {repeats} timed steps",
          flush=True)
    rows = []
    for family in args.families:
        rows += measure(family, args.modes, shape, batch, repeats, args.threads, args.device, args.bf16)
    if args.reference == "on" or (args.reference == "auto" and not args.quick):
        print(f"reference size {REFERENCE_SHAPE}, physical batch {args.reference_batch}", flush=True)
        for family in args.families:
            rows += measure(family, args.reference_modes, REFERENCE_SHAPE, args.reference_batch, 2, args.threads,
                            args.device, args.bf16)
    print(table(rows))
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
