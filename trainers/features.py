"""Feature networks for the Frechet distance, and label measurers for controllability.

Feature extractors (``load_feature_extractor``) map volumes (B, 1, D, H, W) in [0, 1] to
features (B, F) as float64 numpy:

- ``path=None``: the built-in ``phantom3d`` encoder, a small 3D CNN shipped as
  ``trainers/assets/phantom_encoder.pt``. It was trained once, here, on PUBLIC-variant phantoms
  only to regress the six phantom labels (standardised), so its deep features describe
  anatomy (cavity size, wall, phase); its 120 features pool every stage, so intensity,
  noise and blur count too. Any (D, H, W) is first resized to the canonical 16 x 48 x 48.
  Retrain with ``python -m trainers.features --train`` (about 3 min on 2 CPU cores); how it
  was made and how well it does: ``trainers/assets/README.md``.
- ``path=FILE, mode="volume"``: a local 3D TorchScript network on (B, 1, D, H, W).
- ``path=FILE, mode="slices"``: a local 2D TorchScript network (e.g. an Inception-v3 the user
  exported with torchvision elsewhere) on selected depth slices, the reference paper's way:
  each slice is repeated to 3 channels and resized to ``size`` x ``size`` (299 for
  Inception); the per-slice features are AVERAGED over the slices, so F stays the network's
  width (2048 for Inception; concatenating 7 slices would make 14k-dim covariances that
  32..1000 samples cannot estimate). Slices stay in [0, 1]: put any input normalisation the
  network expects inside the exported module.

Label measurers (``load_label_measurer``) map volumes to ``{label: np.ndarray (B,)}``: the
phantom measurement (``trainers.phantoms.measure_labels``) or a local TorchScript regressor.
Nothing is ever downloaded.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ASSET = Path(__file__).resolve().parent / "assets" / "phantom_encoder.pt"
CANONICAL_SHAPE = (16, 48, 48)
PHANTOM_LABELS = ("LVEDV", "LVESV", "LVEF", "MYOEDTHICK", "MYOESTHICK", "ESED")
# Labels one phantom volume shows: the imaged phase's volume/thickness, and the phase itself.
_MEASURABLE = ("LVEDV", "LVESV", "MYOEDTHICK", "MYOESTHICK", "ESED")
_CHUNK = 64  # volumes per forward pass: bounds memory for large evaluation sets


def as_volumes(volumes) -> torch.Tensor:
    """(B, 1, D, H, W) float32 CPU tensor from a tensor/array of (B, 1, D, H, W) or (B, D, H, W)."""
    x = torch.as_tensor(np.asarray(volumes) if not torch.is_tensor(volumes) else volumes)
    x = x.detach().to("cpu", torch.float32)
    if x.ndim == 4:
        x = x.unsqueeze(1)
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"volumes have shape {tuple(x.shape)}; expected (B, 1, D, H, W) or (B, D, H, W)")
    return x


def resize_volumes(x: torch.Tensor, shape) -> torch.Tensor:
    """Resize (B, C, D, H, W) to ``shape``: area-average the axes that shrink (trilinear
    interpolation alone would alias noise when e.g. 96 -> 48), then trilinear for the rest."""
    shape = tuple(int(s) for s in shape)
    if tuple(x.shape[2:]) == shape:
        return x
    smaller = tuple(min(a, b) for a, b in zip(x.shape[2:], shape))
    if smaller != tuple(x.shape[2:]):
        x = F.adaptive_avg_pool3d(x, smaller)
    if smaller != shape:
        x = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    return x


# --------------------------------------------------------------------------- built-in encoder
class PhantomEncoder(nn.Module):
    """Small 3D CNN (0.1 M parameters, 0.43 MB): 4 strided conv stages -> global average pool
    -> linear head regressing the standardised phantom labels.

    ``features`` (120-d) are the average-pooled outputs of ALL four stages (8 + 16 + 32 + 64
    channels), each standardised by its mean/std on the public training phantoms: the deep
    stage carries anatomy (what the labels taught it), the shallow ones intensity, noise and
    sharpness. With the deep stage alone the Frechet distance barely moved for blur, noise or
    a 20 % darker image (1.1-1.3x the real-vs-real value); with all stages it moves 3-10x.
    BatchNorm (not instance norm) keeps absolute intensity visible.
    """

    def __init__(self, width: int = 16, n_deep: int = 64, n_out: int = len(PHANTOM_LABELS)):
        super().__init__()
        chans = (1, width // 2, width, 2 * width, n_deep)
        strides = ((1, 2, 2), 2, 2, 2)   # 16x48x48 -> 16x24x24 -> 8x12x12 -> 4x6x6 -> 2x3x3
        # A second conv in the two middle stages only: at full resolution it would triple the
        # training time on a CPU, and at 64 channels double the file size.
        second = (False, True, True, False)
        self.stages = nn.ModuleList()
        for cin, cout, s, twice in zip(chans[:-1], chans[1:], strides, second):
            blocks = [nn.Conv3d(cin, cout, 3, stride=s, padding=1, bias=False), nn.BatchNorm3d(cout), nn.LeakyReLU(0.1)]
            if twice:
                blocks += [nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.LeakyReLU(0.1)]
            self.stages.append(nn.Sequential(*blocks))
        self.head = nn.Linear(n_deep, n_out)
        n_features = sum(chans[1:])
        # Label standardisation of the training set, so predictions can be read in mL / mm,
        # and feature standardisation, so every feature weighs the same in the distance.
        self.register_buffer("label_mean", torch.zeros(n_out))
        self.register_buffer("label_std", torch.ones(n_out))
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))

    def pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = resize_volumes(x, CANONICAL_SHAPE)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x.mean(dim=(2, 3, 4)))
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.cat(self.pooled(x), dim=1) - self.feature_mean) / self.feature_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # standardised label predictions
        return self.head(self.pooled(x)[-1])

    def predict_labels(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x) * self.label_std + self.label_mean


class FeatureExtractor:
    """``extractor(volumes) -> np.ndarray (B, F)`` float64; ``extractor.name`` says which."""

    def __init__(self, fn, name: str, device="cpu"):
        self._fn, self.name, self.device = fn, name, torch.device(device)

    @torch.no_grad()
    def __call__(self, volumes) -> np.ndarray:
        x = as_volumes(volumes)
        out = [self._fn(x[i:i + _CHUNK].to(self.device)).detach().to("cpu", torch.float64)
               for i in range(0, x.shape[0], _CHUNK)]
        feats = torch.cat([o.reshape(o.shape[0], -1) for o in out]) if out else torch.zeros(0, 0)
        return feats.numpy()


def _first_tensor(out):
    # torchvision's Inception returns a namedtuple in training mode; take the logits/features.
    return out[0] if isinstance(out, (tuple, list)) else out


def default_slices(depth: int) -> list[int]:
    """The middle ~7/13 of the stack: slices 3..9 of 13, as the reference paper used."""
    n = max(1, min(depth, round(7 * depth / 13)))
    start = (depth - n) // 2
    return list(range(start, start + n))


def _load_torchscript(path, what: str, device):
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} {path} is not a file; expected a local TorchScript file (nothing is downloaded)")
    try:
        net = torch.jit.load(str(p), map_location="cpu")
    except Exception as e:  # a state_dict or a pickle is not TorchScript: say so in one line
        raise ValueError(f"{what} {path}: cannot load as TorchScript ({type(e).__name__}: {e}); "
                         "expected a file written by torch.jit.script(net).save(path)") from None
    return net.eval().to(device)


def load_phantom_encoder(path=None, device="cpu") -> PhantomEncoder:
    """The built-in encoder from its state_dict (``weights_only``: no code runs on load)."""
    net = PhantomEncoder()
    net.load_state_dict(torch.load(str(path or ASSET), map_location="cpu", weights_only=True))
    return net.eval().to(device)


def load_feature_extractor(path: str | None = None, mode: str = "volume", slices: list[int] | None = None,
                           device="cpu", size: int = 299) -> FeatureExtractor:
    """A feature extractor for the Frechet distance (see the module docstring).

    ``slices``/``size`` apply to ``mode="slices"`` only; slice indices outside the volume's
    depth raise ``ValueError`` when called.
    """
    if mode not in ("volume", "slices"):
        raise ValueError(f"mode {mode!r} is unknown; expected 'volume' or 'slices'")
    device = torch.device(device)
    if path is None:
        if mode != "volume":
            raise ValueError("mode 'slices' needs a 2D network file (path); the built-in phantom3d encoder is 3D")
        net = load_phantom_encoder(device=device)
        return FeatureExtractor(net.features, "phantom3d", device)
    net = _load_torchscript(path, "feature network", device)
    if mode == "volume":
        return FeatureExtractor(lambda x: _first_tensor(net(x)), f"torchscript3d:{Path(path).name}", device)

    def per_slices(x: torch.Tensor) -> torch.Tensor:
        b, _, d, h, w = x.shape
        idx = list(slices) if slices is not None else default_slices(d)
        if not idx or min(idx) < -d or max(idx) >= d:
            raise ValueError(f"slices {idx} do not fit a depth of {d}; expected indices in 0..{d - 1}")
        s = x[:, 0, idx].reshape(b * len(idx), 1, h, w)
        s = F.interpolate(s, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
        f = _first_tensor(net(s))
        return f.reshape(b, len(idx), -1).mean(dim=1)

    return FeatureExtractor(per_slices, f"torchscript2d:{Path(path).name}", device)


# --------------------------------------------------------------------------- label measurers
class LabelMeasurer:
    """``measurer(volumes) -> {label: np.ndarray (B,)}``, NaN where a label is not measurable."""

    def __init__(self, fn, labels: list[str], name: str):
        self._fn, self.labels, self.name = fn, list(labels), name

    def __call__(self, volumes) -> dict[str, np.ndarray]:
        return self._fn(as_volumes(volumes))


def load_label_measurer(path: str | None, label_names: list[str], outputs: list[str] | None = None,
                        device="cpu") -> LabelMeasurer | None:
    """Measure labels on (generated) volumes, for the control metrics; None if none can be.

    ``path=None``: ``measure_labels`` per volume; of the phantom labels in ``label_names``,
    LVEDV/MYOEDTHICK are measured on volumes it reads as ED (NaN on ES ones), LVESV/MYOESTHICK
    on ES ones, ESED always; LVEF needs both phases and is skipped. A volume where no LV is
    found measures 0 (as ``measure_labels`` reports it), which counts against the generator.
    ``path=FILE``: a TorchScript regressor (B, 1, D, H, W) -> (B, len(outputs)); ``outputs``
    names its columns, and those also in ``label_names`` are returned.
    """
    if path is None:
        from trainers.phantoms import measure_labels
        labels = [n for n in label_names if n in _MEASURABLE]
        if not labels:
            return None

        def measure(x: torch.Tensor) -> dict[str, np.ndarray]:
            rows = [measure_labels(v[0].numpy()) for v in x]
            return {n: np.array([r.get(n, np.nan) for r in rows], dtype=np.float64) for n in labels}

        return LabelMeasurer(measure, labels, "phantom")
    if not outputs:
        raise ValueError("outputs: expected the names of the label network's output columns")
    outputs = list(outputs)
    labels = [n for n in outputs if n in label_names]
    if not labels:
        return None
    net = _load_torchscript(path, "label network", device)

    @torch.no_grad()
    def regress(x: torch.Tensor) -> dict[str, np.ndarray]:
        y = torch.cat([_first_tensor(net(x[i:i + _CHUNK].to(device))).detach().to("cpu", torch.float64)
                       for i in range(0, x.shape[0], _CHUNK)]).reshape(x.shape[0], -1)
        if y.shape[1] != len(outputs):
            raise ValueError(f"label network {path} returned {y.shape[1]} columns; expected {len(outputs)} ({', '.join(outputs)})")
        return {n: y[:, outputs.index(n)].numpy() for n in labels}

    return LabelMeasurer(regress, labels, f"torchscript:{Path(path).name}")


# --------------------------------------------------------------------------- training (once)
def _phantoms(n: int, shape, seed: int, variant: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{split: (volumes (N, 1, D, H, W), labels (N, 6))} of a fresh phantom set."""
    from trainers.phantoms import synthesize
    from trainers.data import read_sample
    with tempfile.TemporaryDirectory() as root:
        synthesize(root, n, shape, seed, variant)
        out = {}
        for split in ("training", "validation", "testing"):
            pairs = [read_sample(Path(root) / p) for p in np.load(Path(root) / f"{split}.npy")]
            out[split] = (torch.from_numpy(np.stack([a for a, _ in pairs]))[:, None],
                          torch.from_numpy(np.stack([b for _, b in pairs])))
    return out


def r2_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    res = ((pred - truth) ** 2).sum(0)
    tot = ((truth - truth.mean(0)) ** 2).sum(0)
    return {n: float(1 - r / t) if t > 0 else float("nan") for n, r, t in zip(PHANTOM_LABELS, res, tot)}


@torch.no_grad()
def evaluate_r2(net: PhantomEncoder, volumes: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    net.eval()
    pred = torch.cat([net.predict_labels(volumes[i:i + _CHUNK]) for i in range(0, len(volumes), _CHUNK)])
    return r2_scores(pred.double().numpy(), labels.double().numpy())


def train_encoder(n: int = 1000, shapes=((13, 48, 48), (13, 32, 32)), epochs: int = 16, seed: int = 0,
                  batch_size: int = 32, lr: float = 3e-3, log=print) -> tuple[PhantomEncoder, dict]:
    """Train the built-in encoder on public phantoms (n per shape); returns (net, report)."""
    t0 = time.time()
    torch.manual_seed(seed)
    xs, ys, held = [], [], {}
    for k, shape in enumerate(shapes):
        data = _phantoms(n, shape, seed + k, "public")
        # Resize once: the canonical grid makes shapes stackable and epochs cheaper.
        xs.append(resize_volumes(data["training"][0], CANONICAL_SHAPE))
        ys.append(data["training"][1])
        held[shape] = data["testing"]
    x, y = torch.cat(xs), torch.cat(ys)
    net = PhantomEncoder()
    net.label_mean.copy_(y.mean(0))
    net.label_std.copy_(y.std(0).clamp_min(1e-6))
    y_std = (y - net.label_mean) / net.label_std
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        order, total = torch.randperm(len(x), generator=gen), 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:
                continue   # BatchNorm needs two samples
            xb = x[idx]
            # Mild per-volume gamma/gain/offset jitter, so the labels transfer to other
            # scanners' contrast; the shallow-stage features still see intensity.
            u = torch.rand(3, len(idx), 1, 1, 1, 1, generator=gen) * 2 - 1
            xb = xb.clamp_min(0) ** torch.exp(0.2 * u[0]) * (1 + 0.1 * u[1]) + 0.04 * u[2]
            loss = F.smooth_l1_loss(net(xb), y_std[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs} loss {total / len(x):.4f} ({time.time() - t0:.0f} s)")
    with torch.no_grad():   # feature standardisation: statistics of the public training set
        net.eval()
        f = torch.cat([torch.cat(net.pooled(x[i:i + _CHUNK]), 1) for i in range(0, len(x), _CHUNK)])
        net.feature_mean.copy_(f.mean(0))
        std = f.std(0)
        net.feature_std.copy_(std + 0.01 * std.mean())   # floor: a near-constant unit must not dominate
    train_time = time.time() - t0
    report = {"n_per_shape": n, "shapes": [list(s) for s in shapes], "seed": seed, "epochs": epochs,
              "train_time_s": round(train_time, 1), "n_train": len(x)}
    for shape, (xv, yv) in held.items():
        report[f"r2_public_{'x'.join(map(str, shape))}"] = evaluate_r2(net, xv, yv)
    for shape in shapes:
        data = _phantoms(max(30, n // 4), shape, 10_000 + seed, "private")
        xv, yv = (torch.cat([data[split][j] for split in data]) for j in (0, 1))
        report[f"r2_private_{'x'.join(map(str, shape))}"] = evaluate_r2(net, xv, yv)
    return net.eval(), report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.features",
                                description="Train the built-in phantom3d feature encoder on public phantoms.")
    p.add_argument("--train", action="store_true", help="train and save the encoder's state_dict")
    p.add_argument("--out", default=str(ASSET), help=f"output file (default: {ASSET})")
    p.add_argument("--quick", action="store_true", help="a tiny run for tests (few samples, 1 epoch)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.train:
        p.print_help()
        return 0
    kw = dict(n=24, shapes=((8, 24, 24),), epochs=1) if args.quick else {}
    net, report = train_encoder(seed=args.seed, **kw)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out)
    print(f"saved {out} ({out.stat().st_size / 1024:.0f} KiB)")
    for k, v in report.items():
        print(f"{k}: " + (", ".join(f"{a} {b:.3f}" for a, b in v.items()) if isinstance(v, dict) else str(v)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
