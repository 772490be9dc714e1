"""What an audit costs: the same trial without canaries, with gradient canaries and with input
canaries, side by side in one run.

    python -m benchmarks.audit_cost [--quick] [--repeats N] [--epochs E] [--shape D H W] [--max-steps S] [--json FILE]

Each trial is the real training loop (`trainers.loop.train_worker`, Ray's API stubbed as in
tests/helpers.run_loop): the tiny beta-VAE (4/8 channels) on 200 phantom training volumes
5 x 16 x 16 (`--shape`), DP-SGD (bk) at sigma 1, batch 16 (q = 0.08), evaluation off. The three sides
run in turn (after one warm-up trial), `--repeats` rounds, so load from other processes hits them alike; each side's
time is its fastest round (other load only ever adds time). Input canaries are at the most
the sweep file admits, M = n_train / 2 = 100 (each included canary is one more training
record, M/2 = 50 of them in expectation: 1.25x the records per step, plus scoring the M
canaries once); gradient canaries are M = 1000.

Reported: the trial's wall time (setup to last report) and its training time (the sum of
`time/epoch_s`: train, validate and the audit's scoring), and their ratios to the side
without canaries. The goal is at most 1.3x. An input canary costs what a record costs, plus
the fixed cost of one more micro-batch per step (forward, backward and hooks on a few
volumes): on a tiny model that fixed cost is most of a step, so run a larger `--shape`
to see the cost of a model whose step time grows with its batch.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pytest
import torch

from benchmarks import write_json
from tests.helpers import TINY_AE, phantom_data, run_loop

SIDES = {"none": None, "gradient": {"canaries": 1000, "kind": "gradient"},
         "input": {"canaries": 100, "kind": "input"}}


def trial(mp, folder: Path, data: dict, audit, epochs: int, max_steps: int = 0) -> tuple[float, dict]:
    stage = {"name": "ae", "model": dict(TINY_AE), "eval": {"enabled": False},
             "train": {"epochs": epochs, "batch_size": 16, "physical_batch_size": 16, "seed": 0, "sample_grid": 0,
                       "max_steps_per_epoch": max_steps or None},
             "dp": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "grad_sample_mode": "bk"}}
    if audit is not None:
        stage["audit"] = audit
    t0 = time.perf_counter()
    reports = run_loop(mp, folder, stage, data, delta=1e-5)
    wall = time.perf_counter() - t0
    metrics = [m for m, _ in reports]
    return wall, {"train_s": sum(m["time/epoch_s"] for m in metrics), **metrics[-1]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch, 2 rounds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=[5, 16, 16], metavar=("D", "H", "W"))
    parser.add_argument("--max-steps", type=int, default=0, help="steps per epoch at most (0: all 13)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    epochs, repeats = (1, 2) if args.quick else (args.epochs, args.repeats)
    torch.set_num_threads(1)
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        data = phantom_data(Path(tmp) / "data", n=250, shape=tuple(args.shape))
        trial(mp, Path(tmp) / "warmup", data, SIDES["input"], 1, 2)   # imports and first calls: counted for no side
        for r in range(repeats):
            for side, audit in SIDES.items():
                wall, m = trial(mp, Path(tmp) / f"{side}{r}", data, audit, epochs, args.max_steps)
                print(f"round {r + 1} {side:>8}: wall {wall:6.2f} s, train {m['train_s']:6.2f} s", flush=True)
                if side not in best or wall < best[side]["wall_s"]:
                    best[side] = {"wall_s": wall, "train_s": m["train_s"], "steps": m["privacy/steps"],
                                  "epsilon": m["privacy/epsilon"], "audit/epsilon_lower": m.get("audit/epsilon_lower")}
    base = best["none"]
    print(f"\nshape {tuple(args.shape)}, {epochs} epochs x {base['steps'] // epochs} steps, "
          f"fastest of {repeats} rounds")
    print("| canaries | trial wall (s) | ratio | training (s) | ratio | claimed eps | audit/epsilon_lower |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for side, b in best.items():
        b["wall_ratio"], b["train_ratio"] = b["wall_s"] / base["wall_s"], b["train_s"] / base["train_s"]
        lower = "" if b["audit/epsilon_lower"] is None else f"{b['audit/epsilon_lower']:.2f}"
        name = "none" if SIDES[side] is None else f"{side}, M = {SIDES[side]['canaries']}"
        print(f"| {name} | {b['wall_s']:.2f} | {b['wall_ratio']:.2f}x | {b['train_s']:.2f} | {b['train_ratio']:.2f}x "
              f"| {b['epsilon']:.3g} | {lower} |")
    write_json(args.json, best)
    return best


if __name__ == "__main__":
    main()
