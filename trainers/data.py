"""Dataset reference format, validation and the torch Dataset for 3D volumes.

Layout: a data root holds ``training.npy``, ``validation.npy`` and ``testing.npy``,
each a 1-D string array of sample paths (absolute, or relative to the root).
A sample is an ``.npz`` with ``image`` (D, H, W) and ``labels`` (L,), or a
``.npy`` holding a pickled dict with those keys (only with ``allow_pickle``,
because unpickling runs arbitrary code). NaN labels mean "unknown".

Subjects (the unit of privacy with ``privacy.unit: subject``, and the people that group
privacy counts): ``data.subject_pattern`` (a regex whose first group, searched in the
sample's path, is the subject id) or a ``subject`` entry in the sample file (a string or
integer). A subject's volumes must all lie in one split.

Validation runs before any Ray worker starts, so a bad file fails the launch
with one readable line instead of a traceback deep inside a trial hours later.
It must stay cheap on thousands of volumes: every file is read exactly once
(shape, min/max, finiteness and a content hash from the same array), reads
run in a thread pool (numpy/zlib/hashlib release the GIL), and an optional
JSON cache keyed by (path, size, mtime_ns) lets a re-launch skip unchanged files.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from orchestrator.errors import DataError

SPLITS = ("training", "validation", "testing")
SAMPLE_SUFFIXES = (".npz", ".npy")
PRELOAD_LIMIT_BYTES = 2 * 1024**3
_CACHE_FILE = "dataset_validation_cache.json"
_CACHE_VERSION = 2  # bump when the checks change so old "valid" verdicts are dropped


@dataclass
class DatasetIndex:
    root: Path
    splits: dict[str, list[Path]]  # absolute, resolved sample paths per split
    label_names: list[str]
    shape: tuple[int, int, int]
    subjects: Optional[dict[str, list[str]]] = None   # subject id of each sample per split; None: not declared

    def n(self, split: str) -> int:
        return len(self.splits[split])

    def n_subjects(self, split: str) -> Optional[int]:
        return len(set(self.subjects[split])) if self.subjects else None

    def group_size(self, split: str) -> Optional[int]:
        """The most volumes one subject has in `split` (group privacy's k); None without subjects."""
        if not self.subjects:
            return None
        counts: dict[str, int] = {}
        for s in self.subjects[split]:
            counts[s] = counts.get(s, 0) + 1
        return max(counts.values(), default=0)

    def units(self, split: str) -> Optional[list[np.ndarray]]:
        """The sample indices of each subject of `split`, in order of first appearance."""
        if not self.subjects:
            return None
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(self.subjects[split]):
            groups.setdefault(s, []).append(i)
        return [np.asarray(v, dtype=np.int64) for v in groups.values()]


# numpy parses every .npy header with ast.literal_eval, and CPython 3.11's AST constructor
# keeps its recursion depth in state shared by all threads: two threads building ASTs at
# once can fail with "SystemError: AST constructor recursion depth mismatch" (CPython
# gh-106905; seen in CI). Headers are parsed under this lock; payloads still read in parallel.
_HEADER_LOCK = threading.Lock()


def _read_member(zf: zipfile.ZipFile, key: str, name: str) -> np.ndarray:
    """Array `key` of the .npz shown as `name` in errors; object arrays are refused, never unpickled."""
    with zf.open(f"{key}.npy") as f:
        with _HEADER_LOCK:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = header(f)
        if dtype.hasobject:
            raise DataError(f"{name}: array {key!r} is a pickled object array; expected a numeric array")
        flat = np.empty(int(np.prod(shape, dtype=np.int64)), dtype=dtype)
        got = f.readinto(memoryview(flat.view(np.uint8)))
        if got != flat.nbytes:
            raise ValueError(f"array {key!r} is truncated ({got} of {flat.nbytes} bytes)")
    return flat.reshape(shape, order="F" if fortran else "C")


def _pickle_hint(name: str) -> str:
    return f"{name} is a pickled object; pickles can run code when loaded, so set `data.allow_pickle: true` only if the file is trusted"


def _load_raw(path: Path, name: str, allow_pickle: bool) -> tuple[np.ndarray, np.ndarray, Optional[str]]:
    """Read one sample file and check its structure; values are checked by the caller.

    ``name`` is how the file is shown in errors (as the user wrote it).
    Returns the arrays with their stored dtypes so dtype problems can be reported, and the
    sample's own `subject` entry (None when it has none).
    """
    suffix = path.suffix.lower()
    if suffix not in SAMPLE_SUFFIXES:
        raise DataError(f"{name}: unsupported sample format {path.suffix or '(no extension)'!r}; expected .npz (or pickled .npy)")
    if suffix == ".npy" and not allow_pickle:
        # Refuse before opening: np.load(allow_pickle=True) would already execute the pickle.
        raise DataError(_pickle_hint(name))
    try:
        if suffix == ".npz":
            with open(path, "rb") as fh:
                # Check the zip magic ourselves: on other bytes np.load falls back to
                # unpickling (or a misleading "pickled data" error). Object arrays inside
                # an .npz are never valid samples, so the .npz path never unpickles.
                magic = fh.read(4)
                if not magic.startswith(b"PK"):
                    raise DataError(f"{name}: not an .npz (zip) archive (starts with {magic!r}); expected a file written by np.savez")
                fh.seek(0)
                with zipfile.ZipFile(fh) as z:
                    files = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
                    missing = [k for k in ("image", "labels") if k not in files]
                    if missing:
                        raise DataError(f"{name}: npz is missing key(s) {missing} (found {sorted(files)}); expected keys 'image' and 'labels'")
                    arrays = {"subject": None}
                    for key in ("image", "labels") + (("subject",) if "subject" in files else ()):
                        arrays[key] = _read_member(z, key, name)
            image, labels, subject = arrays["image"], arrays["labels"], arrays["subject"]
        else:
            with _HEADER_LOCK:  # opted-in pickles: the whole load parses an AST
                obj = np.load(path, allow_pickle=True)
            if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 0:
                obj = obj.item()  # np.save(dict) wraps the dict in a 0-d object array
            if not isinstance(obj, dict) or not {"image", "labels"} <= obj.keys():
                found = f"dict with keys {sorted(map(str, obj))}" if isinstance(obj, dict) else f"{type(obj).__name__}"
                raise DataError(f"{name}: .npy sample holds a {found}; expected a pickled dict with keys 'image' and 'labels'")
            image, labels, subject = np.asarray(obj["image"]), np.asarray(obj["labels"]), obj.get("subject")
    except DataError:
        raise
    except Exception as e:  # zip/pickle/format errors: report, don't crash with a traceback
        raise DataError(f"{name}: cannot read file ({type(e).__name__}: {e}); expected a valid {suffix} sample") from None
    if image.ndim != 3:
        raise DataError(f"{name}: image has shape {tuple(image.shape)} ({image.ndim}-D); expected a 3-D volume (D, H, W)")
    if image.dtype.kind not in "biuf":
        raise DataError(f"{name}: image has dtype {image.dtype}; expected a numeric (float) array")
    if labels.ndim != 1:
        raise DataError(f"{name}: labels have shape {tuple(labels.shape)}; expected a 1-D array of label values")
    if labels.dtype.kind not in "biuf":
        raise DataError(f"{name}: labels have dtype {labels.dtype} (e.g. {labels.ravel()[:3].tolist()}); expected numeric labels (NaN for unknown)")
    return image, labels, _subject_id(subject, name)


def _subject_id(value, name: str) -> Optional[str]:
    """A sample file's `subject` entry as a string id: one string or integer."""
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in "Uiu":
        raise DataError(f"{name}: `subject` is {arr.dtype} of shape {arr.shape}; expected one string or integer "
                        "subject id")
    return str(arr.reshape(()).item())


def read_sample(path, allow_pickle: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (D, H, W), labels float32 (L,)); NaN labels are kept."""
    path = Path(path)
    image, labels, _ = _load_raw(path, str(path), allow_pickle)
    return np.asarray(image, dtype=np.float32), np.asarray(labels, dtype=np.float32)


def _summarize(path: Path, name: str, allow_pickle: bool) -> dict:
    """Content checks that depend only on the file (so they can be cached)."""
    image, labels, subject = _load_raw(path, name, allow_pickle)
    # min/max propagate NaN and expose inf, so two reductions also cover finiteness.
    lo, hi = float(image.min()), float(image.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        n_bad = int(np.count_nonzero(~np.isfinite(image)))
        raise DataError(f"{name}: image has {n_bad} non-finite voxel(s) (NaN/inf); expected finite values in [0, 1]")
    if lo < 0.0 or hi > 1.0:
        raise DataError(f"{name}: image values span [{lo:.4g}, {hi:.4g}]; expected intensities normalised to [0, 1]")
    if np.isinf(labels.astype(np.float64)).any():
        raise DataError(f"{name}: labels {labels.tolist()} contain inf; expected finite values (NaN means unknown)")
    # sha256 (hardware-accelerated, ~2x blake2b here); only accidental duplicates matter.
    digest = hashlib.sha256(f"{image.dtype.str}{image.shape}".encode())
    digest.update(memoryview(np.ascontiguousarray(image)).cast("B"))
    return {"shape": list(image.shape), "n_labels": int(labels.shape[0]), "hash": digest.hexdigest()[:32],
            "subject": subject}


def _load_cache(cache_dir) -> dict:
    if cache_dir is None:
        return {}
    try:
        data = json.loads((Path(cache_dir) / _CACHE_FILE).read_text())
        return data["entries"] if data.get("version") == _CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # a missing or damaged cache only costs a re-read


def _save_cache(cache_dir, old: dict, live: dict, paths: set[str]) -> None:
    # Keep entries of files outside this run (other splits / datasets) and every key
    # used this run; drop stale (path, size, mtime) keys of files that changed.
    entries = {k: v for k, v in old.items() if k.rsplit("|", 2)[0] not in paths}
    entries.update(live)
    target = Path(cache_dir) / _CACHE_FILE
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": _CACHE_VERSION, "entries": entries}))
        os.replace(tmp, target)  # atomic: concurrent launches never see half a file
    except OSError:
        pass  # the cache is an optimisation, never a reason to fail a launch


def _read_index(index_file: Path, shown: str, split: str, allow_pickle: bool) -> list[str]:
    if not index_file.is_file():
        raise DataError(f"index file {shown} is missing; expected a 1-D string array of {split} sample paths")
    with open(index_file, "rb") as fh:
        magic = fh.read(6)
    if magic != b"\x93NUMPY":  # else np.load falls back to unpickling, or says "pickled data"
        raise DataError(f"index file {shown} is not a .npy file (starts with {magic!r}); expected a 1-D string array "
                        f"of {split} sample paths written by np.save")
    try:
        with _HEADER_LOCK:
            arr = np.load(index_file, allow_pickle=allow_pickle)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataError(f"index file {shown} is a pickled object array; save it with np.save(path, np.array(paths, dtype=str)), "
                            "or set `data.allow_pickle: true` if the file is trusted") from None
        raise DataError(f"index file {shown}: cannot read ({e}); expected a .npy 1-D string array") from None
    except Exception as e:
        raise DataError(f"index file {shown}: cannot read ({type(e).__name__}: {e}); expected a .npy 1-D string array") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 1:
        found = f"shape {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise DataError(f"index file {shown} holds {found}; expected a 1-D array of sample paths")
    if arr.dtype.kind == "S":
        arr = np.char.decode(arr, "utf-8")
    if not (arr.dtype.kind == "U" or (arr.dtype == object and all(isinstance(p, str) for p in arr))):
        raise DataError(f"index file {shown} has dtype {arr.dtype}; expected a 1-D array of path strings")
    if arr.size == 0:
        raise DataError(f"index file {shown} lists 0 samples; expected at least 1 sample in the {split} split")
    return [str(p) for p in arr]


def validate_dataset(root, label_names, shape, allow_pickle: bool = False, splits=SPLITS,
                     cache_dir=None, workers: int | None = None, subject_pattern: Optional[str] = None) -> DatasetIndex:
    """Check the whole dataset up front; raise DataError on the first problem.

    `subject_pattern`: a regex whose first group, searched in each sample's path as the
    index file writes it, is the sample's subject; without it, samples that carry a
    `subject` entry declare their subjects (all of them must)."""
    shape = tuple(int(s) for s in shape)
    label_names = list(label_names)
    root_abs = Path(root).expanduser().resolve()
    if not root_abs.is_dir():
        what = "does not exist" if not root_abs.exists() else "is not a directory"
        raise DataError(f"data root {root} {what}; expected a directory with {', '.join(s + '.npy' for s in splits)}")

    # (split, shown name, resolved path) in index order, so "first problem" is deterministic.
    samples: list[tuple[str, str, Path]] = []
    written_paths: list[str] = []
    for split in splits:
        index_file = root_abs / f"{split}.npy"
        for written in _read_index(index_file, str(Path(root) / f"{split}.npy"), split, allow_pickle):
            p = Path(written).expanduser()
            resolved = (p if p.is_absolute() else root_abs / p).resolve()
            shown = written if str(resolved) == written else f"{written} ({resolved})"
            samples.append((split, f"{split} sample {shown}", resolved))
            written_paths.append(written)

    cache = _load_cache(cache_dir)
    live: dict[str, dict] = {}  # keys seen this run (cache hits and fresh reads)
    n_read = [0]

    def check(item):
        split, name, path = item
        try:
            st = path.stat()
        except OSError:
            st = None
        if st is None or not path.is_file():
            raise DataError(f"{name} does not exist{'' if st is None else ' as a file'}; expected a readable .npz file")
        if path.suffix.lower() == ".npy" and not allow_pickle:
            raise DataError(_pickle_hint(name))  # checked before the cache: the setting may have changed
        key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
        summary = cache.get(key)
        if summary is None:
            summary = _summarize(path, name, allow_pickle)
            n_read[0] += 1
        live[key] = summary  # only content-valid files get here; dict writes are thread-safe
        if tuple(summary["shape"]) != shape:
            stored = tuple(summary["shape"])
            hint = " - transpose to depth first" if sorted(stored) == sorted(shape) else ""
            raise DataError(f"{name}: image stored as {stored}; expected (D, H, W) = {shape}{hint}")
        if summary["n_labels"] != len(label_names):
            raise DataError(f"{name}: has {summary['n_labels']} labels; expected {len(label_names)} ({', '.join(label_names)})")
        return summary

    n_workers = max(1, workers or min(8, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(n_workers, thread_name_prefix="validate")
    try:
        summaries = list(pool.map(check, samples))  # re-raises the first failure in index order
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if cache_dir is not None and n_read[0]:
            _save_cache(cache_dir, cache, live, {str(p) for _, _, p in samples})

    # The same file, or byte-identical image content, twice: across splits it is a
    # train/test leak; within a split one person's record counts twice, and DP-SGD's
    # per-record guarantee silently becomes a 2-fold group guarantee for them.
    seen_path: dict[Path, int] = {}
    seen_hash: dict[str, int] = {}
    for i, ((split, name, path), summary) in enumerate(zip(samples, summaries)):
        for seen, key, how in ((seen_path, path, "same file"), (seen_hash, summary["hash"], "identical image")):
            j = seen.setdefault(key, i)
            if j == i:
                continue
            other_split, other_name, _ = samples[j]
            if other_split != split:
                raise DataError(f"{name} duplicates {other_name} ({how}) - train/test leak between {other_split} and "
                                f"{split}; expected every sample in exactly one split")
            raise DataError(f"{name} duplicates {other_name} ({how}) within the {split} split - a record present "
                            "twice gets only two-fold group privacy; expected every record once")

    index: dict[str, list[Path]] = {s: [] for s in splits}
    for split, _, path in samples:
        index[split].append(path)
    subjects = _subjects(samples, written_paths, summaries, subject_pattern, splits)
    return DatasetIndex(root=root_abs, splits=index, label_names=label_names, shape=shape, subjects=subjects)


def _subjects(samples, written_paths, summaries, pattern: Optional[str], splits) -> Optional[dict[str, list[str]]]:
    """The subject of every sample per split, or None when the dataset declares none. A
    subject in two splits is a train/test leak of a person (refused)."""
    if pattern is not None:
        regex = re.compile(pattern)
        ids = []
        for (_, name, _), written in zip(samples, written_paths):
            m = regex.search(written)
            if m is None or not m.groups() or m.group(1) is None or m.group(1) == "":
                raise DataError(f"{name}: path does not match data.subject_pattern {pattern!r}; expected the "
                                "subject id as the pattern's first group")
            ids.append(m.group(1))
    else:
        ids = [summary.get("subject") for summary in summaries]
        if all(i is None for i in ids):
            return None
        missing = next((i for i, v in enumerate(ids) if v is None), None)
        if missing is not None:
            raise DataError(f"{samples[missing][1]} has no `subject` entry while other samples do; expected every "
                            "sample to name its subject (or set data.subject_pattern)")
    first_split: dict[str, str] = {}
    for (split, name, _), sid in zip(samples, ids):
        other = first_split.setdefault(sid, split)
        if other != split:
            raise DataError(f"subject {sid!r} has volumes in the {other} and {split} splits ({name}) - a person in "
                            "two splits leaks between them; expected all of a subject's volumes in one split")
    out: dict[str, list[str]] = {s: [] for s in splits}
    for (split, _, _), sid in zip(samples, ids):
        out[split].append(sid)
    return out


class VolumeDataset(torch.utils.data.Dataset):
    """Volumes as float32 [1, D, H, W]; labels with NaN -> 0 plus a known-mask.

    Small datasets (< ~2 GiB as float32) are preloaded into one array, which also
    shares copy-on-write with forked DataLoader workers; larger ones are read
    lazily with a small LRU cache.
    """

    def __init__(self, paths, n_labels: int, allow_pickle: bool = False,
                 preload: bool | None = None, cache_size: int = 32):
        self.paths = [Path(p) for p in paths]
        self.n_labels = int(n_labels)
        self.allow_pickle = allow_pickle
        self.cache_size = cache_size
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._images = self._labels = None
        if preload is None:
            if not self.paths:
                preload = False
            else:  # one sample tells us the size; validation already made all shapes equal
                first = self._read(0)
                self._cache[0] = first
                preload = first[0].nbytes * len(self.paths) < PRELOAD_LIMIT_BYTES
        if preload and self.paths:
            first = self._cache.get(0) or self._read(0)
            # Fill one preallocated array in place: np.stack would briefly need 2x the RAM.
            self._images = np.empty((len(self.paths), *first[0].shape), dtype=np.float32)
            self._labels = np.empty((len(self.paths), self.n_labels), dtype=np.float32)

            def fill(i):
                image, labels = first if i == 0 else self._read(i)
                if image.shape != first[0].shape:
                    raise DataError(f"{self.paths[i]}: image shape {image.shape}; expected {first[0].shape} like {self.paths[0]}")
                self._images[i], self._labels[i] = image, labels

            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                list(pool.map(fill, range(len(self.paths))))
            self._cache.clear()
        self.preloaded = self._images is not None

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image, labels = read_sample(self.paths[i], self.allow_pickle)
        if labels.shape[0] != self.n_labels:
            raise DataError(f"{self.paths[i]}: has {labels.shape[0]} labels; expected {self.n_labels}")
        return image, labels

    def __len__(self) -> int:
        return len(self.paths)

    def _get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self._images is not None:
            return self._images[i], self._labels[i]
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        item = self._read(i)
        self._cache[i] = item
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return item

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        image, labels = self._get(i)
        known = ~np.isnan(labels)
        return {
            "image": torch.from_numpy(np.array(image, dtype=np.float32)).unsqueeze(0),  # copy: never alias the cache
            "labels": torch.from_numpy(np.where(known, labels, 0.0).astype(np.float32)),
            "label_mask": torch.from_numpy(known),
            "index": i,
        }


def collate(dataset, indices, device):
    """The samples `indices` of `dataset` stacked into one batch on `device` (with their
    cached latents where `dataset` is a LatentCache)."""
    items = [dataset[int(i)] for i in indices]
    keys = ("image", "labels", "label_mask") + (("latent",) if items and "latent" in items[0] else ())
    return {k: torch.stack([it[k] for it in items]).to(device) for k in keys}


class LatentCache(torch.utils.data.Dataset):
    """A dataset whose items also carry `latent`: a frozen compression model's posterior
    mean of the volume, computed once (in chunks of `batch_size`) instead of every epoch.

    A latent diffusion stage's encoder is frozen and deterministic, so encoding each volume
    once gives the training step the very input it would compute itself, minus the encoder's
    forward pass (a quarter of a CPU step at the privacy_cost study's size). The latent is a
    per-sample function of one volume: DP-SGD's per-sample gradients and Poisson sampling
    over indices are unchanged. Images stay available (utility, canaries, the sample grid)."""

    def __init__(self, dataset, encode, device, batch_size: int = 32):
        self.dataset = dataset
        chunks = [range(s, min(s + batch_size, len(dataset))) for s in range(0, len(dataset), batch_size)]
        with torch.no_grad():
            self.latents = (torch.cat([encode(collate(dataset, c, device)["image"]).cpu() for c in chunks])
                            if chunks else torch.empty(0))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "latent": self.latents[i]}

    def __getattr__(self, name):   # paths, n_labels, preloaded ...: the wrapped dataset's
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
