"""Built-in cardiac phantoms: reference format, determinism, and that measure_labels really
recovers the geometric labels from a single image (it later scores generated volumes)."""
from __future__ import annotations

import numpy as np
import pytest

from orchestrator import phantoms as CLI
from trainers import phantoms as P

SHAPE = (13, 48, 48)


def _load(root):
    """{split: [(relative path, image, labels)]}, reading exactly like a strict consumer."""
    out = {}
    for split in P.SPLITS:
        idx = np.load(root / f"{split}.npy", allow_pickle=False)
        assert idx.ndim == 1 and idx.dtype.kind == "U"
        items = []
        for rel in idx:
            with np.load(root / rel, allow_pickle=False) as z:
                assert sorted(z.files) == ["image", "labels", "subject"]
                assert str(z["subject"]) in str(rel)
                items.append((str(rel), z["image"], z["labels"]))
        out[split] = items
    return out


def _samples(n, variant="private", seed=1, shape=SHAPE):
    """Images and labels straight from the generator (same code path as synthesize)."""
    v = P.VARIANTS.index(variant)
    return [P._sample(np.random.default_rng([seed, v, i]), shape, variant) for i in range(n)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms") / "data"
    summary = P.synthesize(root, n=21, shape=SHAPE, seed=3)
    return root, summary


def test_format(dataset):
    root, summary = dataset
    assert summary["n"] == 21 and summary["labels"] == P.LABELS
    # 11 subjects (the last imaged at ED only), split by subject 9 / 1 / 1
    assert summary["subjects"] == {"training": 9, "validation": 1, "testing": 1}
    assert summary["splits"] == {"training": 18, "validation": 2, "testing": 1}
    data = _load(root)
    paths = [p for items in data.values() for p, _, _ in items]
    assert len(paths) == len(set(paths)) == 21          # splits are disjoint and complete
    for rel, image, labels in (x for items in data.values() for x in items):
        assert not rel.startswith("/") and rel.startswith("samples/") and rel.endswith(".npz")
        assert image.dtype == np.float32 and image.shape == SHAPE
        assert labels.dtype == np.float32 and labels.shape == (len(P.LABELS),)
        assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
        assert np.isfinite(labels).all()
        edv, esv, ef, th_ed, th_es, esed = labels
        assert esed == (1.0 if rel.endswith("_es.npz") else 0.0) and esv < edv and th_es > th_ed
        assert ef == pytest.approx(100 * (edv - esv) / edv, rel=1e-4)


def test_subjects_two_frames_one_split(dataset):
    """Each subject: an ED and an ES volume, labels equal but ESED, images of one heart at two
    phases (different pictures), all in one split; the pattern finds the subject in the path."""
    import re

    root, _ = dataset
    by_subject = {}
    for split, items in _load(root).items():
        for rel, image, labels in items:
            sid = re.search(P.SUBJECT_PATTERN, rel).group(1)
            by_subject.setdefault(sid, []).append((split, rel, image, labels))
    assert len(by_subject) == 11
    for sid, vols in by_subject.items():
        assert len({v[0] for v in vols}) == 1, sid           # never two splits
        if len(vols) == 2:
            (_, _, im_ed, lab_ed), (_, _, im_es, lab_es) = sorted(vols, key=lambda v: v[1])
            np.testing.assert_array_equal(lab_ed[:5], lab_es[:5])
            assert (lab_ed[5], lab_es[5]) == (0.0, 1.0)
            assert not np.array_equal(im_ed, im_es)
            # the measured phase of each frame follows its label
            assert P.measure_labels(im_ed)["ESED"] == 0.0 and P.measure_labels(im_es)["ESED"] == 1.0
    assert sum(len(v) == 1 for v in by_subject.values()) == 1   # n odd: the last subject has ED only


def test_deterministic_and_order_independent(dataset, tmp_path):
    root, _ = dataset
    P.synthesize(tmp_path / "a", n=6, shape=SHAPE, seed=3)   # fewer subjects: same first ones
    for name in ("samples/s000000_ed.npz", "samples/s000002_es.npz"):
        with np.load(root / name) as a, np.load(tmp_path / "a" / name) as b:
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["labels"], b["labels"])
    P.synthesize(tmp_path / "b", n=6, shape=SHAPE, seed=4)
    with np.load(root / "samples/s000000_ed.npz") as a, np.load(tmp_path / "b/samples/s000000_ed.npz") as b:
        assert not np.array_equal(a["image"], b["image"])


@pytest.mark.parametrize("shape", [(13, 96, 96), (8, 33, 35), (5, 16, 16)])
def test_any_shape(tmp_path, shape):
    s = P.synthesize(tmp_path / "d", n=6, shape=shape, seed=0)
    assert s["splits"] == {"training": 2, "validation": 2, "testing": 2}
    for items in _load(tmp_path / "d").values():
        _, image, labels = items[0]
        assert image.shape == shape and 0.0 <= image.min() and image.max() <= 1.0
        # Spacing scales with the grid, so labels stay in physical (full-size heart) ranges.
        assert 80 < labels[0] < 240 and 4 < labels[3] < 13


def test_spacing():
    assert P.spacing_for((13, 96, 96)) == pytest.approx((8.0, 1.8, 1.8))
    assert P.spacing_for((13, 48, 48)) == pytest.approx((8.0, 3.6, 3.6))
    assert P.spacing_for((26, 48, 24)) == pytest.approx((4.0, 3.6, 7.2))


def test_label_ranges():
    labels = np.array([lab for _, lab in _samples(120)])
    edv, esv, ef, th_ed, th_es, esed = labels.T
    assert 85 < edv.min() and edv.max() < 230           # mL, adult LV at end-diastole
    assert 40 < ef.min() and ef.max() < 72               # %
    assert 4.5 < th_ed.min() and th_es.max() < 17        # mm
    assert 0.3 < esed.mean() < 0.7                       # both phases present


@pytest.mark.parametrize("variant", ["private", "public"])
def test_measurement_recovers_labels(variant):
    """Tolerances leave margin over what ~2400 samples (7 seeds, both variants) gave at
    13x48x48: worst relative volume error 7.8 %, worst thickness error 1.3 mm (mean bias
    < 0.2 mm), correlations >= 0.999 (volume) and >= 0.997 (thickness), phase 100 %."""
    samples = _samples(64, variant=variant, seed=11)
    true_vol, true_th, true_es, vol, th, es = [], [], [], [], [], []
    for image, lab in samples:
        m = P.measure_labels(image)
        assert m["FOUND"] == 1.0
        phase_es = lab[5] == 1.0
        true_vol.append(lab[1] if phase_es else lab[0])
        true_th.append(lab[4] if phase_es else lab[3])
        true_es.append(lab[5])
        vol.append(m["LV_VOLUME"])
        th.append(m["MYO_THICK"])
        es.append(m["ESED"])
        # The observed-phase keys carry the same numbers.
        key_v, key_t = ("LVESV", "MYOESTHICK") if m["ESED"] == 1.0 else ("LVEDV", "MYOEDTHICK")
        assert m[key_v] == m["LV_VOLUME"] and m[key_t] == m["MYO_THICK"]
    true_vol, vol, true_th, th = map(np.asarray, (true_vol, vol, true_th, th))
    rel = np.abs(vol - true_vol) / true_vol
    assert rel.max() < 0.10, rel.max()
    assert np.corrcoef(vol, true_vol)[0, 1] > 0.99
    assert np.corrcoef(th, true_th)[0, 1] > 0.95
    assert np.abs(th - true_th).max() < 2.0 and np.abs(th - true_th).mean() < 0.75
    assert np.mean(np.asarray(es) == np.asarray(true_es)) >= 0.95


def test_measure_other_spacing_and_degenerate_inputs():
    image, lab = _samples(1, seed=5)[0]
    m = P.measure_labels(image)
    # Doubling every spacing scales volume by 8 and thickness by 2: units really come from spacing.
    m2 = P.measure_labels(image, spacing=tuple(2 * s for s in P.spacing_for(image.shape)))
    assert m2["LV_VOLUME"] == pytest.approx(8 * m["LV_VOLUME"], rel=1e-6)
    assert m2["MYO_THICK"] == pytest.approx(2 * m["MYO_THICK"], rel=1e-6)
    for bad in (np.zeros(SHAPE), np.full(SHAPE, np.nan)):
        assert P.measure_labels(bad)["FOUND"] == 0.0
    with pytest.raises(P.DataError):
        P.measure_labels(np.zeros((48, 48)))


def test_public_variant_shifts_distribution():
    priv, pub = _samples(40, "private"), _samples(40, "public")
    mean = lambda s: np.mean([im.mean() for im, _ in s])  # noqa: E731
    assert mean(pub) > mean(priv) + 0.04                  # brighter tissue
    assert np.mean([lab[0] for _, lab in pub]) > np.mean([lab[0] for _, lab in priv]) + 10  # bigger hearts
    assert pub[0][0].shape == priv[0][0].shape and pub[0][1].shape == priv[0][1].shape


def test_refuses_too_small_n_and_bad_variant(tmp_path):
    with pytest.raises(P.UserError, match="at least 6"):
        P.synthesize(tmp_path / "x", n=5)
    with pytest.raises(P.UserError, match="variant"):
        P.synthesize(tmp_path / "x", n=6, variant="other")


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert CLI.main([str(out), "--n", "8", "--shape", "8", "24", "24", "--seed", "2", "--variant", "public"]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "8" in line and str(out) in line
    assert np.load(out / "training.npy").shape == (4,)

    assert CLI.main([str(out), "--n", "8", "--shape", "8", "24", "24"]) == 2   # exists, no --overwrite
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "--overwrite" in err

    assert CLI.main([str(out), "--n", "6", "--shape", "8", "24", "24", "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"s00000{j}_{p}.npz" for j in range(3)
                                                                   for p in ("ed", "es")]

    for argv in ([str(out), "--n", "abc"], [str(out), "--shape", "8", "24"], [str(tmp_path / "y"), "--n", "1"],
                 [str(tmp_path / "y"), "--variant", "nope"]):
        assert CLI.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, err
