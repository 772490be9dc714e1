"""Built-in synthetic dataset: cardiac-like short-axis MRI stacks with measured labels.

Layout (the reference format of ``trainers.data``): ROOT/{training,validation,testing}.npy are
1-D '<U' arrays of paths relative to ROOT (80/10/10); ROOT/samples/NNNNNN.npz holds ``image``
float32 (D, H, W) in [0, 1] and ``labels`` float32 in the order of ``LABELS``: LVEDV, LVESV
(mL, LV cavity volume at end-diastole / end-systole), LVEF (%), MYOEDTHICK, MYOESTHICK (mm,
mean wall thickness at ED / ES) and ESED, the phase of the image:
**ESED = 1.0 means end-systole (ES), 0.0 means end-diastole (ED)**. Both phases of the
subject are rasterised for the labels although only one is imaged.

Geometry is in mm, so labels stay physical at any grid shape (``spacing_for``). The cavity
is a half prolate ellipsoid hanging from the basal plane; the epicardium is the same shape
grown by the wall thickness on every axis, so apical slices show muscle without cavity. The
basal plane lies 0-6 mm above the first slice (a stack planned from the mitral annulus): a
base cutting through slice 0 would leave blood meeting background with no muscle between,
which no intensity-based measurement can split. Sections are slightly elliptic, rotated and
off-centre. At ES the cavity shrinks by the ejection fraction and the long axis shortens;
the ES wall is solved so the myocardial volume equals the ED one (muscle is incompressible).

Phase rule (``measure_labels``): wall thickness / mean cavity radius on mid-ventricular
slices. ED walls are drawn as 0.21-0.28 of the radius (measured ratio 0.22-0.32); with
EF >= 45 % contraction and volume conservation give ES ratios >= 0.39, so ``ES_RATIO`` =
0.355 sits in the gap and one volume is enough to tell the phase.

Thickness (labels and measurement alike) is the area-equivalent annulus width
sqrt(A_epi/pi) - sqrt(A_cav/pi), averaged over slices whose cavity area is at least half the
largest one: how mid-ventricular thickness is read clinically, robust to 8 mm slices.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from orchestrator.errors import DataError, UserError

LABELS = ("LVEDV", "LVESV", "LVEF", "MYOEDTHICK", "MYOESTHICK", "ESED")
SPLITS = ("training", "validation", "testing")
VARIANTS = ("private", "public")
FOV_DEPTH_MM = 13 * 8.0     # 13 short-axis slices of 8 mm, as in a typical cine stack
FOV_INPLANE_MM = 172.8      # 1.8 mm pixels at 96 px, 3.6 mm at 48 px
ES_RATIO = 0.355            # thickness / cavity radius; above -> ES (see module docstring)
_MID_FRACTION = 0.5         # slices with >= this fraction of the peak cavity area count as "mid"

# Per-variant distributions. "public" mimics another scanner/population used for pretraining:
# larger hearts, brighter tissue, flatter blood-myocardium contrast and more noise.
_PARAMS = {
    "private": dict(edv=(100, 215), blood=(0.74, 0.90), myo=(0.34, 0.42), bg=(0.12, 0.20),
                    tex=(0.015, 0.03), noise=(0.015, 0.03), gain=(0.9, 1.08)),
    "public": dict(edv=(125, 240), blood=(0.66, 0.78), myo=(0.42, 0.48), bg=(0.20, 0.26),
                   tex=(0.02, 0.035), noise=(0.025, 0.04), gain=(0.95, 1.1)),
}


def spacing_for(shape) -> tuple[float, float, float]:
    """Voxel spacing in mm (depth, h, w): the physical field of view is fixed, so a coarser
    grid just means bigger voxels and the same heart in mL/mm."""
    d, h, w = (int(s) for s in shape)
    return (FOV_DEPTH_MM / d, FOV_INPLANE_MM / h, FOV_INPLANE_MM / w)


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise UserError(f"shape {shape!r} is invalid; expected three positive integers D H W") from None
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"shape {shape} is invalid; expected three positive integers D H W")
    return shape


# --------------------------------------------------------------------------- geometry
def _draw_subject(rng: np.random.Generator, variant: str) -> dict:
    p = _PARAMS[variant]
    u = rng.uniform
    s = {"z0": u(-6.0, 0.0), "L": u(72.0, 90.0), "ef": u(0.45, 0.70), "short": u(0.08, 0.14),
         "k": np.exp(u(-0.12, 0.12)), "rot": u(0, np.pi), "cx": u(-12, 12), "cy": u(-12, 12)}
    edv_mm3 = u(*p["edv"]) * 1000.0
    s["R"] = np.sqrt(3 * edv_mm3 / (2 * np.pi * s["L"]))   # half-ellipsoid volume = EDV
    # Wall drawn relative to the radius (not in mm): this is what keeps ED and ES apart.
    s["T"] = float(np.clip(u(0.21, 0.28) * s["R"], 5.0, 12.5))
    # Keep the apex (epicardium included) inside the stack with a little margin.
    s["L"] = min(s["L"], FOV_DEPTH_MM - s["z0"] - s["T"] - 2.0)
    s["L_es"] = s["L"] * (1 - s["short"])
    s["R_es"] = s["R"] * np.sqrt((1 - s["ef"]) / (1 - s["short"]))
    # Incompressible myocardium: solve (R+T)^2 (L+T) = const for the ES wall (a cubic in T).
    c = (s["R"] + s["T"]) ** 2 * (s["L"] + s["T"]) - s["R"] ** 2 * s["L"] + s["R_es"] ** 2 * s["L_es"]
    r, l = s["R_es"], s["L_es"]
    roots = np.roots([1.0, 2 * r + l, r * r + 2 * r * l, r * r * l - c])
    s["T_es"] = float(max(x.real for x in roots if abs(x.imag) < 1e-9 and x.real > 0))
    s.update({k: u(*p[k]) for k in ("blood", "myo", "bg", "tex", "noise", "gain")})
    s["rv"] = rng.random() < 0.8          # faint RV crescent in most subjects
    s["rv_w"] = u(10.0, 20.0)
    s["rv_angle"] = np.pi + u(-0.5, 0.5)   # image left, as in the usual short-axis orientation
    return s


def _fractions(s: dict, shape, es: bool, with_rv: bool = True):
    """Partial-volume occupancy (cavity, inside-epicardium, rv) in [0, 1], each (D, H, W).

    In-plane coverage uses a one-pixel linear ramp across the boundary; through-plane the
    8 mm slices are supersampled at ~1 mm and averaged, which is what makes apex and base
    slices look partially filled like real thick-slice MRI.
    """
    d, h, w = shape
    sd, sh, sw = spacing_for(shape)
    pix = np.sqrt(sh * sw)
    y = (np.arange(h) + 0.5 - h / 2) * sh - s["cy"]
    x = (np.arange(w) + 0.5 - w / 2) * sw - s["cx"]
    yy, xx = np.meshgrid(y, x, indexing="ij")
    c, sn = np.cos(s["rot"]), np.sin(s["rot"])
    xr, yr = c * xx + sn * yy, -sn * xx + c * yy
    q = np.hypot(xr / s["k"], yr * s["k"])   # area-preserving elliptic radius, mm
    ns = max(2, int(np.ceil(sd)))
    z = (np.arange(d * ns) + 0.5) * (sd / ns) - s["z0"]   # depth below the basal plane

    def profile(rad, length):
        t = np.clip(z / length, -1.0, 1.0)
        return np.where(z >= 0, rad * np.sqrt(1 - t * t), 0.0)

    R, L, T = (s["R_es"], s["L_es"], s["T_es"]) if es else (s["R"], s["L"], s["T"])
    r_cav, r_epi = profile(R, L), profile(R + T, L + T)
    qs = (q / pix - 0.5).astype(np.float32)

    def occupancy(radii):   # float32 and in place: this is the hot loop of synthesize()
        f = (radii / pix).astype(np.float32)[:, None, None] - qs[None]
        np.clip(f, 0.0, 1.0, out=f)
        return f.reshape(d, ns, h, w).mean(axis=1, dtype=np.float64)

    cav, epi = occupancy(r_cav), occupancy(r_epi)
    rv = np.zeros_like(cav)
    if s["rv"] and with_rv:
        # Crescent hugging the septum a few mm out (the gap keeps the LV measurable); it is
        # shorter than the LV and thins towards the apex like a real right ventricle.
        ang = np.arctan2(yy, xx)
        wedge = np.clip((np.cos(ang - s["rv_angle"]) - 0.35) / 0.3, 0.0, 1.0)
        width = profile(s["rv_w"], 0.7 * (L + T))
        inner = np.where(width > 0, r_epi + 6.0, 0.0)
        rv = (occupancy(inner + width) - occupancy(inner)) * wedge
    return cav, epi, rv


def _thickness(cav_area, epi_area) -> tuple[float, float]:
    """(mean wall thickness, mean cavity radius) in mm over mid-ventricular slices."""
    cav_area, epi_area = np.asarray(cav_area, float), np.asarray(epi_area, float)
    if cav_area.max() <= 0:
        return 0.0, 0.0
    mid = cav_area >= _MID_FRACTION * cav_area.max()
    r_cav = np.sqrt(cav_area[mid] / np.pi)
    r_epi = np.sqrt(np.maximum(epi_area[mid], cav_area[mid]) / np.pi)
    return float(np.mean(r_epi - r_cav)), float(np.mean(r_cav))


# --------------------------------------------------------------------------- samples
def _subject_volumes(rng: np.random.Generator, shape, variant: str, phases=(False, True)):
    """One subject imaged at each phase of `phases` (False: ED, True: ES): [(image, labels)].

    The two volumes share the subject's anatomy, labels (ESED aside), surrounding tissue and
    coil ramp, as two frames of one cine scan do; each has its own acquisition noise."""
    s = _draw_subject(rng, variant)
    sd, sh, sw = spacing_for(shape)
    vox_ml, pix_mm2 = sd * sh * sw / 1000.0, sh * sw
    vol, thick, fields = {}, {}, {}
    for phase in (False, True):   # both phases give the labels
        fields[phase] = _fractions(s, shape, phase, with_rv=phase in phases)
        cav, epi, _ = fields[phase]
        vol[phase] = float(cav.sum() * vox_ml)
        thick[phase], _ = _thickness(cav.sum((1, 2)) * pix_mm2, epi.sum((1, 2)) * pix_mm2)
    edv, esv = vol[False], vol[True]
    # Surrounding tissue: smooth random texture (fat/liver/lung-like blotches, ~7 mm scale).
    tex = ndimage.gaussian_filter(rng.standard_normal(shape), (0.5, 7.0 / sh, 7.0 / sw))
    tex *= s["tex"] / max(float(tex.std()), 1e-6)
    ramp = 1.0 + rng.uniform(-0.05, 0.05) * np.linspace(-1, 1, shape[2])[None, None, :]
    out = []
    for es in phases:
        labels = np.array([edv, esv, 100.0 * (edv - esv) / max(edv, 1e-6), thick[False], thick[True],
                           float(es)], dtype=np.float32)
        cav, epi, rv = fields[es]
        bg = s["bg"] + tex + 0.3 * (s["myo"] - s["bg"]) * rv   # faint RV: stays below myocardium
        img = bg * (1 - epi) + s["myo"] * (epi - cav) + s["blood"] * cav
        # Slight in-plane blur (point-spread function, ~1.2 mm) and a gentle coil-sensitivity ramp.
        img = ndimage.gaussian_filter(img, (0.0, 1.2 / sh, 1.2 / sw))
        img = img * ramp * s["gain"]
        # Magnitude images carry Rician noise: |signal + complex Gaussian|.
        n1, n2 = rng.standard_normal((2, *shape)) * s["noise"]
        img = np.hypot(img + n1, n2)
        out.append((np.clip(img, 0.0, 1.0).astype(np.float32), labels))
    return out


def _sample(rng: np.random.Generator, shape, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """One volume of a subject at a random phase (tests and the phantom encoder's training)."""
    return _subject_volumes(rng, shape, variant, phases=(bool(rng.random() < 0.5),))[0]


def subject_id(j: int) -> str:
    return f"s{j:06d}"


# What `data.subject_pattern` finds in a phantom sample's path (samples/s000012_ed.npz).
SUBJECT_PATTERN = r"(s\d+)_e[ds]\.npz$"


def synthesize(root, n: int = 256, shape=(13, 48, 48), seed: int = 0, variant: str = "private",
               overwrite: bool = False, labels=LABELS) -> dict:
    """Write a phantom dataset of ``n`` volumes under ``root`` and return a summary dict.

    Subjects: ceil(n / 2) of them, each imaged at end-diastole and end-systole
    (``samples/s000012_ed.npz``, ``..._es.npz``; the last subject only at ED when n is odd),
    with identical labels but ESED and a ``subject`` entry in each file. Splits (80/10/10)
    are by subject, so no patient is in two splits.

    ``labels`` picks and orders the stored label columns (a sweep's ``data.labels``); names
    the phantom does not model (AGE, SEX, ...) are stored as NaN, i.e. unknown.

    Subject j depends only on (seed, variant, j), so n and write order never change a sample.
    Index files are written last: an interrupted run leaves no loadable (half) dataset.
    """
    shape = _check_shape(shape)
    if variant not in VARIANTS:
        raise UserError(f"variant {variant!r} is unknown; expected one of {', '.join(VARIANTS)}")
    n, seed = int(n), int(seed)
    if n < 6:
        raise UserError(f"n={n} is too small; need at least 6 volumes (3 subjects, one per split)")
    if seed < 0:
        raise UserError(f"seed={seed} is invalid; expected a non-negative integer")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} exists and is not a folder; expected a data root folder")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise DataError(f"{root} is not empty; pass --overwrite (overwrite=True) to replace the dataset")
        # Remove only what we would write, never unrelated files the user keeps there.
        for split in SPLITS:
            (root / f"{split}.npy").unlink(missing_ok=True)
        if (root / "samples").is_dir():
            for f in (root / "samples").glob("*.npz"):
                f.unlink()
    (root / "samples").mkdir(parents=True, exist_ok=True)

    n_subj = (n + 1) // 2
    n_val = n_test = max(1, round(0.1 * n_subj))
    n_train = n_subj - n_val - n_test
    vcode = VARIANTS.index(variant)
    labels = tuple(labels)
    columns = [LABELS.index(name) if name in LABELS else None for name in labels]
    names = []   # per subject: its files
    for j in range(n_subj):
        phases = (False, True) if 2 * j + 1 < n else (False,)
        files = []
        for (image, truth), es in zip(_subject_volumes(np.random.default_rng([seed, vcode, j]), shape, variant,
                                                        phases), phases):
            name = f"samples/{subject_id(j)}_{'es' if es else 'ed'}.npz"
            stored = np.array([truth[c] if c is not None else np.nan for c in columns], dtype=np.float32)
            np.savez(root / name, image=image, labels=stored, subject=np.array(subject_id(j)))
            files.append(name)
        names.append(files)
    bounds = {"training": (0, n_train), "validation": (n_train, n_train + n_val),
              "testing": (n_train + n_val, n_subj)}
    sizes = {}
    for split, (a, b) in bounds.items():
        files = [f for subject in names[a:b] for f in subject]
        np.save(root / f"{split}.npy", np.array(files, dtype=str))
        sizes[split] = len(files)
    return {"root": str(root), "n": n, "shape": shape, "seed": seed, "variant": variant,
            "splits": sizes, "subjects": {k: b - a for k, (a, b) in bounds.items()}, "labels": labels}


# --------------------------------------------------------------------------- measurement
def _otsu3(values: np.ndarray, bins: int = 128):
    """Class means (dark, middle, bright) of a three-class Otsu split, or None if flat."""
    lo, hi = np.percentile(values, [0.5, 99.5])
    if not hi - lo > 1e-6:
        return None
    hist, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi + 1e-9))
    p, c = hist / max(hist.sum(), 1), (edges[:-1] + edges[1:]) / 2
    w, m = np.cumsum(p), np.cumsum(p * c)
    i, j = np.triu_indices(bins, 1)   # class 0 = bins[..i], 1 = (i..j], 2 = (j..]
    w0, w1, w2 = w[i], w[j] - w[i], 1 - w[j]
    m0, m1, m2 = m[i], m[j] - m[i], m[-1] - m[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where((w0 > 0) & (w1 > 0) & (w2 > 1e-12), m0**2 / w0 + m1**2 / w1 + m2**2 / w2, -np.inf)
    k = int(np.argmax(score))
    return (m0[k] / w0[k], m1[k] / w1[k], m2[k] / w2[k]) if np.isfinite(score[k]) else None


def _segment(sm: np.ndarray, t_myo: float, t_blood: float):
    """(cavity, inside-epicardium) boolean masks, or None when nothing is above t_blood."""
    h, w = sm.shape[1:]
    comp, ncomp = ndimage.label(sm > t_blood)
    if ncomp == 0:
        return None
    idx = np.arange(1, ncomp + 1)
    sizes = ndimage.sum_labels(np.ones_like(sm), comp, idx)
    centres = np.array(ndimage.center_of_mass(comp > 0, comp, idx)).reshape(-1, 3)
    # The LV sits near the centre of a cardiac FOV; bright blobs elsewhere (vessels, noise,
    # a bright RV in generated data) are ignored unless nothing central exists.
    central = (np.abs(centres[:, 1] - (h - 1) / 2) <= h / 4) & (np.abs(centres[:, 2] - (w - 1) / 2) <= w / 4)
    cav = comp == idx[int(np.argmax(np.where(central, sizes, -1.0) if central.any() else sizes))]
    # Epicardium per slice: the above-muscle-threshold region connected to the cavity, holes
    # filled (papillary-like noise inside the blood pool must not count as wall).
    epi = np.zeros_like(cav)
    for k in np.flatnonzero(cav.any(axis=(1, 2))):
        lab, _ = ndimage.label((sm[k] > t_myo) | cav[k])
        keep = np.unique(lab[cav[k]])
        epi[k] = ndimage.binary_fill_holes(np.isin(lab, keep[keep > 0]))
    return cav, epi


def measure_labels(volume, spacing=None) -> dict[str, float]:
    """Measure LV size, wall thickness and phase from ONE volume (D, H, W).

    Keys: ``LV_VOLUME`` (cavity, mL), ``MYO_THICK`` (mm), ``ESED`` (1.0 = ES, 0.0 = ED, from
    the thickness/radius rule), ``FOUND`` (0.0 when no cavity could be segmented; the other
    values are then 0), plus the observed-phase names: ``LVESV`` and ``MYOESTHICK`` when the
    estimate is ES, else ``LVEDV`` and ``MYOEDTHICK``. LVEF needs both phases, so it is absent.

    Thresholds come from the volume itself (three-class Otsu: tissue < myocardium < blood),
    so the function also works on generated volumes with other brightness or contrast.
    On phantoms at 13x48x48 (both variants, ~2400 samples) the cavity volume is within 8 %
    of the label, thickness within 1.3 mm and the phase always right; from 13x96x96 2 % and
    0.3 mm. Below ~32 px in-plane the wall is about one pixel and accuracy degrades.
    """
    vol = np.asarray(volume, dtype=np.float64)
    if vol.ndim != 3:
        raise DataError(f"volume has shape {vol.shape}; expected a 3-D volume (D, H, W)")
    vol = np.nan_to_num(vol, nan=0.0, posinf=1.0, neginf=0.0)
    sd, sh, sw = spacing_for(vol.shape) if spacing is None else (float(x) for x in spacing)
    d, h, w = vol.shape
    # Light in-plane smoothing: noise would otherwise flip boundary voxels across thresholds.
    sm = ndimage.gaussian_filter(vol, (0.0, 0.6, 0.6))
    central = sm[:, h // 4: h - h // 4 or None, w // 4: w - w // 4 or None]
    empty = {"LV_VOLUME": 0.0, "MYO_THICK": 0.0, "ESED": 0.0, "FOUND": 0.0, "LVEDV": 0.0, "MYOEDTHICK": 0.0}
    levels = _otsu3(central.ravel())
    if levels is None:   # a flat volume has no heart to measure
        return empty
    mu_bg, mu_myo, mu_blood = levels
    # Midpoints between class means put the boundary where a voxel is half one tissue, half
    # the other, so voxel counts match the partial-volume ground truth.
    seg = _segment(sm, (mu_bg + mu_myo) / 2, (mu_myo + mu_blood) / 2)
    if seg is None:
        return empty
    # One refinement: global Otsu classes are skewed by partial-volume voxels and background
    # texture, so re-read blood and muscle levels inside the LV that was just found.
    cav, epi = seg
    core, wall = ndimage.binary_erosion(cav), epi & ~cav
    mu_blood = float(np.median(sm[core])) if core.any() else mu_blood
    mu_myo = float(np.median(sm[wall])) if wall.any() else mu_myo
    cav, epi = _segment(sm, (mu_bg + mu_myo) / 2, (mu_myo + mu_blood) / 2) or seg
    pix = sh * sw
    thick, radius = _thickness(cav.sum((1, 2)) * pix, epi.sum((1, 2)) * pix)
    # Partial-volume volume: voxels deep inside count 1; on the boundary shell (one voxel
    # either side, through-plane included, where thick slices cut the apex and base) each
    # voxel counts its blood fraction read off the intensity between myocardium and blood.
    core = ndimage.binary_erosion(cav)
    shell = ndimage.binary_dilation(cav) & ~core
    frac = np.clip((sm[shell] - mu_myo) / max(mu_blood - mu_myo, 1e-6), 0.0, 1.0)
    volume_ml = float((core.sum() + frac.sum()) * sd * pix / 1000.0)
    es = radius > 0 and thick / radius > ES_RATIO
    out = {"LV_VOLUME": volume_ml, "MYO_THICK": thick, "ESED": float(es), "FOUND": 1.0}
    out.update({"LVESV": volume_ml, "MYOESTHICK": thick} if es else {"LVEDV": volume_ml, "MYOEDTHICK": thick})
    return out
