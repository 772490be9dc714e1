"""Tests for trainers/data.py: every bad input gives one readable DataError line."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import trainers.data as data
from orchestrator.errors import DataError
from trainers.data import SPLITS, VolumeDataset, read_sample, validate_dataset

SHAPE = (4, 6, 5)
LABELS = ["age", "sex"]


def _image(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def write_sample(path, image, labels, fmt="npz"):
    """Write one sample as .npz or as a pickled-dict .npy; returns the path."""
    if fmt == "npz":
        np.savez(path, image=image, labels=labels)
    else:
        with open(path, "wb") as f:  # np.save of a dict wraps it in a 0-d object array
            np.save(f, {"image": image, "labels": labels}, allow_pickle=True)
    return path


def make_dataset(root, sizes=(3, 2, 2), shape=SHAPE, n_labels=2, fmt="npz", absolute=False, labels=None):
    """Write a tiny valid dataset under ``root``.

    fmt: "npz", "npy" (pickled dicts) or "mixed" (alternating). Paths in the index
    files are relative to root unless ``absolute``. ``labels`` maps global sample
    number -> label vector (default: distinct finite values).
    Returns {split: [sample paths]} as written.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "samples").mkdir(exist_ok=True)
    written, k = {}, 0
    for split, n in zip(SPLITS, sizes):
        entries = []
        for _ in range(n):
            f = fmt if fmt != "mixed" else ("npz", "npy")[k % 2]
            lab = np.asarray((labels or {}).get(k, np.arange(n_labels) + k), dtype=np.float32)
            p = write_sample(root / "samples" / f"s{k}.{f}", _image(k, shape), lab, f)
            entries.append(str(p) if absolute else f"samples/{p.name}")
            k += 1
        np.save(root / f"{split}.npy", np.array(entries, dtype=str))
        written[split] = entries
    return written


def set_index(root, split, entries):
    np.save(root / f"{split}.npy", np.array(entries, dtype=str))


def expect_error(root, *phrases, **kw):
    kw.setdefault("label_names", LABELS)
    kw.setdefault("shape", SHAPE)
    with pytest.raises(DataError) as ei:
        validate_dataset(root, **kw)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    for phrase in phrases:
        assert phrase in msg, f"{phrase!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------- bad inputs

def test_root_missing(tmp_path):
    expect_error(tmp_path / "nope", "nope", "does not exist", "expected a directory")


def test_root_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    expect_error(tmp_path / "file", "file", "is not a directory")


def test_index_file_missing(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "validation.npy").unlink()
    expect_error(tmp_path, "validation.npy", "missing", "expected a 1-D string array")


@pytest.mark.parametrize("arr, phrase", [(np.zeros((2, 2), dtype=str), "shape (2, 2)"),
                                         (np.arange(3), "dtype int")])
def test_index_not_1d_strings(tmp_path, arr, phrase):
    make_dataset(tmp_path)
    np.save(tmp_path / "training.npy", arr)
    expect_error(tmp_path, "training.npy", phrase, "expected a 1-D array")


def test_index_pickled_refused_without_allow_pickle(tmp_path):
    written = make_dataset(tmp_path)
    np.save(tmp_path / "testing.npy", np.array(written["testing"], dtype=object), allow_pickle=True)
    expect_error(tmp_path, "testing.npy", "pickled", "data.allow_pickle: true")
    assert validate_dataset(tmp_path, LABELS, SHAPE, allow_pickle=True).n("testing") == 2


@pytest.mark.parametrize("split", SPLITS)
def test_empty_split(tmp_path, split):
    make_dataset(tmp_path)
    set_index(tmp_path, split, [])
    expect_error(tmp_path, f"{split}.npy", "0 samples", "at least 1")


def test_sample_missing(tmp_path):
    make_dataset(tmp_path)
    set_index(tmp_path, "training", ["samples/s0.npz", "samples/ghost.npz"])
    expect_error(tmp_path, "samples/ghost.npz", str(tmp_path / "samples" / "ghost.npz"), "does not exist")


def test_unsupported_extension(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "samples" / "x.nii.gz").write_bytes(b"\x1f\x8b")
    set_index(tmp_path, "validation", ["samples/x.nii.gz"])
    expect_error(tmp_path, "x.nii.gz", "unsupported sample format '.gz'", "expected .npz")


@pytest.mark.parametrize("content, phrase", [(b"PK\x03\x04 truncated garbage", "cannot read file (BadZipFile"),
                                             (b"junk", "not an .npz (zip) archive"),
                                             (b"", "not an .npz (zip) archive")])
def test_corrupt_file(tmp_path, content, phrase):
    make_dataset(tmp_path)
    (tmp_path / "samples" / "s1.npz").write_bytes(content)
    expect_error(tmp_path, "s1.npz", phrase, "expected a")


def test_corrupt_pickled_npy(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "samples" / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    set_index(tmp_path, "testing", ["samples/bad.npy"])
    expect_error(tmp_path, "bad.npy", "cannot read file", "expected a valid .npy", allow_pickle=True)


def test_npz_object_array_refused(tmp_path):
    make_dataset(tmp_path)
    np.savez(tmp_path / "samples" / "s0.npz", image=_image(0), labels=np.array([1, "x"], dtype=object))
    expect_error(tmp_path, "s0.npz", "'labels' is a pickled object array", "expected a numeric array", allow_pickle=True)


def test_npz_missing_key(tmp_path):
    make_dataset(tmp_path)
    np.savez(tmp_path / "samples" / "s2.npz", image=_image(2))
    expect_error(tmp_path, "s2.npz", "missing key(s) ['labels']", "expected keys 'image' and 'labels'")


def test_pickled_npy_without_allow_pickle(tmp_path):
    make_dataset(tmp_path, fmt="mixed")
    expect_error(tmp_path, "s1.npy", "pickled", "data.allow_pickle: true", "trusted")


def test_npy_not_a_dict(tmp_path):
    make_dataset(tmp_path)
    np.save(tmp_path / "samples" / "odd.npy", _image(0))
    set_index(tmp_path, "testing", ["samples/odd.npy"])
    expect_error(tmp_path, "odd.npy", "holds a ndarray", "expected a pickled dict", allow_pickle=True)


def test_npy_dict_missing_key(tmp_path):
    make_dataset(tmp_path)
    np.save(tmp_path / "samples" / "odd.npy", {"img": _image(0)}, allow_pickle=True)
    set_index(tmp_path, "testing", ["samples/odd.npy"])
    expect_error(tmp_path, "odd.npy", "keys ['img']", "expected a pickled dict", allow_pickle=True)


def test_image_not_3d(tmp_path):
    make_dataset(tmp_path)
    write_sample(tmp_path / "samples" / "s0.npz", _image(0, (6, 5)), np.zeros(2))
    expect_error(tmp_path, "s0.npz", "(6, 5) (2-D)", "expected a 3-D volume")


def test_image_wrong_shape(tmp_path):
    make_dataset(tmp_path)
    write_sample(tmp_path / "samples" / "s0.npz", _image(0, (4, 6, 6)), np.zeros(2))
    msg = expect_error(tmp_path, "s0.npz", "stored as (4, 6, 6)", "expected (D, H, W) = (4, 6, 5)")
    assert "transpose" not in msg


def test_image_permuted_shape_hint(tmp_path):
    make_dataset(tmp_path, shape=(48, 48, 13))
    expect_error(tmp_path, "s0.npz", "stored as (48, 48, 13); expected (D, H, W) = (13, 48, 48) - transpose to depth first",
                 shape=(13, 48, 48))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(tmp_path, bad):
    make_dataset(tmp_path)
    img = _image(4)
    img[1, 2, 3] = bad
    write_sample(tmp_path / "samples" / "s4.npz", img, np.zeros(2))
    expect_error(tmp_path, "s4.npz", "1 non-finite voxel", "expected finite values")


def test_values_out_of_range(tmp_path):
    make_dataset(tmp_path)
    img = _image(3)
    img[0, 0, :2] = [-2.0, 255.0]
    write_sample(tmp_path / "samples" / "s3.npz", img, np.zeros(2))
    expect_error(tmp_path, "s3.npz", "span [-2, 255]", "expected intensities normalised to [0, 1]")


def test_labels_not_1d(tmp_path):
    make_dataset(tmp_path)
    write_sample(tmp_path / "samples" / "s0.npz", _image(0), np.zeros((2, 1)))
    expect_error(tmp_path, "s0.npz", "labels have shape (2, 1)", "expected a 1-D array")


def test_labels_non_numeric(tmp_path):
    make_dataset(tmp_path)
    write_sample(tmp_path / "samples" / "s0.npz", _image(0), np.array(["old", "male"]))
    expect_error(tmp_path, "s0.npz", "dtype <U4", "expected numeric labels")


def test_labels_object_dtype(tmp_path):
    make_dataset(tmp_path)
    write_sample(tmp_path / "samples" / "s1.npy", _image(1), np.array([1, "x"], dtype=object), fmt="npy")
    set_index(tmp_path, "training", ["samples/s1.npy"])
    expect_error(tmp_path, "s1.npy", "dtype object", "expected numeric labels", allow_pickle=True)


def test_labels_wrong_count(tmp_path):
    make_dataset(tmp_path)
    write_sample(tmp_path / "samples" / "s5.npz", _image(5), np.zeros(3))
    expect_error(tmp_path, "s5.npz", "has 3 labels", "expected 2 (age, sex)")


def test_labels_inf(tmp_path):
    make_dataset(tmp_path)
    write_sample(tmp_path / "samples" / "s6.npz", _image(6), np.array([np.inf, np.nan]))
    expect_error(tmp_path, "s6.npz", "contain inf", "NaN means unknown")


def test_leak_same_file_in_two_splits(tmp_path):
    make_dataset(tmp_path)
    # Same file under a different spelling (absolute) still counts as the same sample.
    set_index(tmp_path, "testing", [str(tmp_path / "samples" / "s0.npz")])
    expect_error(tmp_path, "s0.npz", "train/test leak between training and testing", "exactly one split")


def test_leak_identical_content(tmp_path):
    make_dataset(tmp_path)
    write_sample(tmp_path / "samples" / "s3.npz", _image(1), np.array([9.0, 9.0]))  # copy of s1's image
    expect_error(tmp_path, "validation sample samples/s3.npz", "duplicates training sample samples/s1.npz",
                 "identical image", "between training and validation")


def test_first_problem_is_reported_in_index_order(tmp_path):
    make_dataset(tmp_path, sizes=(20, 2, 2))
    for k in (7, 15):
        (tmp_path / "samples" / f"s{k}.npz").write_bytes(b"junk")
    for _ in range(3):
        expect_error(tmp_path, "s7.npz", workers=4)


# ---------------------------------------------------------------- good inputs

def test_mixed_formats_nan_labels_and_paths(tmp_path):
    nan_labels = {0: [np.nan, 1.0], 3: [0.5, np.nan], 4: [np.nan, np.nan]}
    written = make_dataset(tmp_path, fmt="mixed", labels=nan_labels)
    # One absolute entry next to relative ones.
    abs_entry = str(tmp_path / "samples" / "s2.npz")
    set_index(tmp_path, "training", written["training"][:2] + [abs_entry])
    idx = validate_dataset(tmp_path, LABELS, SHAPE, allow_pickle=True, workers=2)
    assert (idx.n("training"), idx.n("validation"), idx.n("testing")) == (3, 2, 2)
    assert idx.shape == SHAPE and idx.label_names == LABELS
    assert all(p.is_absolute() and p.exists() for ps in idx.splits.values() for p in ps)
    assert idx.splits["training"][2] == tmp_path.resolve() / "samples" / "s2.npz"

    image, labels = read_sample(idx.splits["training"][1], allow_pickle=True)  # s1 is a pickled .npy
    assert image.dtype == np.float32 and image.shape == SHAPE
    np.testing.assert_array_equal(image, _image(1))
    np.testing.assert_array_equal(labels, [1.0, 2.0])

    ds = VolumeDataset(idx.splits["training"] + idx.splits["validation"], len(LABELS), allow_pickle=True)
    expected = {0: ([0, 1], [False, True]), 3: ([0.5, 0], [True, False]), 4: ([0, 0], [False, False]),
                1: ([1, 2], [True, True])}
    for i, (lab, mask) in expected.items():
        item = ds[i]
        assert item["index"] == i
        assert torch.equal(item["labels"], torch.tensor(lab, dtype=torch.float32))
        assert torch.equal(item["label_mask"], torch.tensor(mask))


def test_relative_paths_resolved_against_root_not_cwd(tmp_path, monkeypatch):
    make_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    idx = validate_dataset("data", LABELS, SHAPE)
    assert idx.root == (tmp_path / "data").resolve()
    assert idx.splits["validation"][0] == (tmp_path / "data" / "samples" / "s3.npz").resolve()


def test_absolute_paths(tmp_path):
    make_dataset(tmp_path, absolute=True)
    assert validate_dataset(tmp_path, LABELS, SHAPE).n("training") == 3


@pytest.mark.parametrize("preload", [True, False, None])
def test_volume_dataset_items(tmp_path, preload):
    make_dataset(tmp_path)
    idx = validate_dataset(tmp_path, LABELS, SHAPE)
    ds = VolumeDataset(idx.splits["training"], 2, preload=preload, cache_size=1)
    assert len(ds) == 3 and ds.preloaded == (preload is not False)
    for i in (0, 2, 1, 0, -1):
        item = ds[i]
        assert item["image"].shape == (1, *SHAPE) and item["image"].dtype == torch.float32
        assert item["labels"].shape == (2,) and item["labels"].dtype == torch.float32
        assert item["label_mask"].dtype == torch.bool and bool(item["label_mask"].all())
        np.testing.assert_array_equal(item["image"][0].numpy(), _image(item["index"]))
    item["image"].zero_()  # callers may modify tensors in place; the cache must not change
    assert ds[2]["image"].abs().sum() > 0
    with pytest.raises(IndexError):
        ds[3]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 1, *SHAPE) and batch["label_mask"].shape == (3, 2)


def test_volume_dataset_wrong_label_count(tmp_path):
    make_dataset(tmp_path, n_labels=3)
    with pytest.raises(DataError, match="has 3 labels; expected 2"):
        VolumeDataset([tmp_path / "samples" / "s0.npz"], 2, preload=True)


def test_cache_skips_unchanged_files(tmp_path, monkeypatch):
    root, cache = tmp_path / "d", tmp_path / "cache"
    make_dataset(root)
    calls = []
    real = data._load_raw
    monkeypatch.setattr(data, "_load_raw", lambda p, *a: calls.append(p.name) or real(p, *a))

    validate_dataset(root, LABELS, SHAPE, cache_dir=cache)
    assert len(calls) == 7  # each file read exactly once
    calls.clear()
    idx = validate_dataset(root, LABELS, SHAPE, cache_dir=cache)
    assert calls == [] and idx.n("training") == 3

    # A changed file is re-read (new mtime/size), and its new content is checked.
    img = _image(3)
    img[0, 0, 0] = np.nan
    write_sample(root / "samples" / "s3.npz", img, np.zeros(2))
    st = os.stat(root / "samples" / "s3.npz")
    os.utime(root / "samples" / "s3.npz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    expect_error(root, "s3.npz", "non-finite", cache_dir=cache)
    assert calls == ["s3.npz"]

    # Cached summaries still get the shape / label-count / leak checks of this run.
    calls.clear()
    write_sample(root / "samples" / "s3.npz", _image(3), np.zeros(2))
    validate_dataset(root, LABELS, SHAPE, cache_dir=cache)
    calls.clear()
    expect_error(root, "has 2 labels", "expected 3", label_names=["a", "b", "c"], cache_dir=cache)
    expect_error(root, "expected (D, H, W) = (5, 6, 4)", "transpose", shape=(5, 6, 4), cache_dir=cache)
    set_index(root, "testing", ["samples/s0.npz"])
    expect_error(root, "train/test leak", cache_dir=cache)
    assert calls == []


def test_cache_does_not_bypass_pickle_refusal(tmp_path):
    make_dataset(tmp_path / "d", fmt="mixed")
    validate_dataset(tmp_path / "d", LABELS, SHAPE, allow_pickle=True, cache_dir=tmp_path / "c")
    expect_error(tmp_path / "d", "s1.npy", "data.allow_pickle: true", cache_dir=tmp_path / "c")


def test_damaged_cache_is_ignored(tmp_path):
    make_dataset(tmp_path / "d")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / data._CACHE_FILE).write_text("{not json")
    assert validate_dataset(tmp_path / "d", LABELS, SHAPE, cache_dir=tmp_path / "c").n("testing") == 2
    assert "entries" in (tmp_path / "c" / data._CACHE_FILE).read_text()


class WritesMarker:
    """Unpickling this creates the file `path` (as `open(path, "w")`): a stand-in for a
    malicious pickle, harmless but visible."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def evil_object_array(marker):
    return np.array([WritesMarker(marker), None], dtype=object)


def test_evil_payload_is_live(tmp_path):
    """The payload the refusal tests below rely on does run when a file is unpickled."""
    marker = tmp_path / "pwned"
    np.save(tmp_path / "evil.npy", evil_object_array(marker), allow_pickle=True)
    np.load(tmp_path / "evil.npy", allow_pickle=True)
    assert marker.exists()


def test_read_sample_refuses_pickle_by_default(tmp_path):
    p = write_sample(tmp_path / "x.npy", _image(0), np.zeros(2), fmt="npy")
    with pytest.raises(DataError, match="allow_pickle"):
        read_sample(p)
    # The file must not even be opened: a malicious pickle would run on load.
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.npy"
    np.save(evil, evil_object_array(marker), allow_pickle=True)
    with pytest.raises(DataError, match="evil.npy"):
        read_sample(evil)
    assert not marker.exists(), "the pickle ran"


@pytest.mark.parametrize("where", ["sample.npy", "sample.npz", "index"])
def test_malicious_pickles_never_run_without_allow_pickle(tmp_path, where):
    make_dataset(tmp_path / "d")
    marker = tmp_path / "pwned"
    root = tmp_path / "d"
    if where == "sample.npy":
        np.save(root / "samples" / "evil.npy", evil_object_array(marker), allow_pickle=True)
        set_index(root, "training", ["samples/s0.npz", "samples/evil.npy"])
    elif where == "sample.npz":   # an object array inside an .npz is a pickle too, refused always
        np.savez(root / "samples" / "s0.npz", image=_image(0), labels=evil_object_array(marker))
    else:
        np.save(root / "training.npy", np.array(["samples/s0.npz", WritesMarker(marker)], dtype=object),
                allow_pickle=True)
    with pytest.raises(DataError):
        validate_dataset(root, LABELS, SHAPE)
    assert not marker.exists(), "the pickle ran"
    if where == "sample.npz":
        with pytest.raises(DataError):
            read_sample(root / "samples" / "s0.npz", allow_pickle=True)
        assert not marker.exists(), "the pickle in an .npz ran"


# ---------------------------------------------------------------- reads from many threads
def test_npz_reads_match_numpy_for_every_layout(tmp_path):
    """The .npz reader (ours, for the header lock) gives what np.load gives: C and Fortran
    order, compressed members, big-endian dtypes, integer labels."""
    image = _image(3)
    cases = {"c": dict(image=image, labels=np.array([1.0, 2.0])),
             "fortran": dict(image=np.asfortranarray(image), labels=np.array([3, 4], dtype=np.int16)),
             "big_endian": dict(image=image.astype(">f8"), labels=np.array([5.0, np.nan]))}
    for name, arrays in cases.items():
        for save in (np.savez, np.savez_compressed):
            path = tmp_path / f"{name}_{save.__name__}.npz"
            save(path, **arrays)
            got, labels = read_sample(path)
            ref = np.load(path)
            np.testing.assert_array_equal(got, ref["image"].astype(np.float32))
            np.testing.assert_array_equal(labels, ref["labels"].astype(np.float32))


def test_truncated_npz_member_is_one_line(tmp_path):
    import zipfile
    path = tmp_path / "t.npz"
    np.savez(path, image=_image(1), labels=np.array([1.0, 2.0]))
    with zipfile.ZipFile(path) as z:
        raw = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w") as z:  # a valid zip whose image member lost its tail
        z.writestr("image.npy", raw["image.npy"][:-40])
        z.writestr("labels.npy", raw["labels.npy"])
    with pytest.raises(DataError, match="truncated"):
        read_sample(path)


def test_npz_reads_survive_many_threads(tmp_path):
    """numpy parses .npy headers with ast.literal_eval, whose recursion bookkeeping CPython 3.11
    shares between threads (gh-106905): concurrent reads at different stack depths, with
    finalizers running mid-parse, failed in CI with "AST constructor recursion depth mismatch".
    The header lock makes the validation and preload thread pools safe."""
    import gc
    import sys
    from concurrent.futures import ThreadPoolExecutor

    path = write_sample(tmp_path / "s.npz", _image(0), np.array([1.0, 2.0]))

    class Finalized:  # a cycle whose __del__ runs Python code inside the collector
        def __del__(self):
            sum(range(50))

    def read(depth):
        if depth:
            return read(depth - 1)
        for _ in range(3):
            c = Finalized()
            c.self = c
        return read_sample(path)

    threshold, interval = gc.get_threshold(), sys.getswitchinterval()
    gc.set_threshold(5)
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: read(i % 7), range(3000)))
    finally:
        gc.set_threshold(*threshold)
        sys.setswitchinterval(interval)
    assert len(results) == 3000
