"""Draw volumes from a trained generator.

    python -m orchestrator.sample --output DIR --run RUN_ID --labels LVEDV=150,ESED=1 --n 4 --out FILE.npz [--png GRID.png]
    python -m orchestrator.sample --checkpoint PATH ...

`--output DIR --run RUN_ID`: an LDM trial's MLflow run id in the sweep whose output folder
is DIR (its checkpoint is the run's `orchestrator.checkpoint` tag). Writes `images`
(n, D, H, W) in [0, 1] and the `labels` used (n, L; labels not named are NaN = unknown).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from orchestrator.errors import UserError


def parse_labels(text: str, names: list[str]) -> np.ndarray:
    values = np.full(len(names), np.nan, dtype=np.float32)
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        key, sep, val = item.partition("=")
        if not sep:
            raise UserError(f"--labels: {item!r} is not NAME=VALUE")
        if key not in names:
            raise UserError(f"--labels: unknown label {key!r}; this generator knows {', '.join(names)}")
        try:
            values[names.index(key)] = float(val)
        except ValueError:
            raise UserError(f"--labels: {key}={val!r} is not a number")
    return values


def checkpoint_of_run(output: Path, run_id: str) -> str:
    state = output / "launch.json"
    uri = json.loads(state.read_text())["tracking_uri"] if state.exists() else f"sqlite:///{output.resolve() / 'mlflow.db'}"
    from orchestrator.tracking import client_for

    try:
        run = client_for(uri).get_run(run_id)
    except Exception:
        raise UserError(f"--run: no MLflow run {run_id!r} in {uri}")
    ckpt = run.data.tags.get("orchestrator.checkpoint")
    if not ckpt:
        raise UserError(f"--run: run {run_id} has no checkpoint (tag orchestrator.checkpoint); is it a finished trial?")
    return ckpt


def write_png(images: np.ndarray, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i][images.shape[1] // 2], cmap="gray", vmin=0, vmax=1)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.sample", description=__doc__.splitlines()[0])
    p.add_argument("--output", help="the sweep's output folder")
    p.add_argument("--run", help="MLflow run id of an ldm trial")
    p.add_argument("--checkpoint", help="a trial checkpoint folder (or its state.pt) instead of --output/--run")
    p.add_argument("--labels", default="", help="NAME=VALUE,... (labels not named are unknown)")
    p.add_argument("--n", type=int, default=4, help="number of volumes")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--png", help="also write a grid of mid slices here")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        if args.checkpoint:
            ckpt = args.checkpoint
        elif args.output and args.run:
            ckpt = checkpoint_of_run(Path(args.output), args.run)
        else:
            raise UserError("give --checkpoint PATH, or --output DIR with --run RUN_ID")
        if args.n < 1:
            raise UserError("--n: expected at least 1")
        import torch

        from trainers.checkpoints import load_generator

        try:
            adapter, state = load_generator(ckpt)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(str(exc))
        names = list(state["labels"])
        values = parse_labels(args.labels, names)
        labels = torch.tensor(np.tile(values, (args.n, 1)))
        mask = ~torch.isnan(labels)
        with torch.no_grad():
            images = adapter.sample(torch.nan_to_num(labels), mask, generator=torch.Generator().manual_seed(args.seed),
                                    num_inference_steps=args.steps, guidance_scale=args.guidance)
        images = images[:, 0].numpy().astype(np.float32)
        np.savez(args.out, images=images, labels=np.tile(values, (args.n, 1)), label_names=np.array(names))
        if args.png:
            write_png(images, args.png)
        print(f"wrote {args.n} volumes {images.shape[1:]} to {args.out}")
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
