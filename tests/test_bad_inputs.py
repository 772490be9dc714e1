"""Reliability suites for bad input.

The contract (README, ARCHITECTURE): an invalid sweep file or dataset gives exactly one line
on stderr, `error: ...`, naming the key or file and what was expected; exit code 2; no
traceback; nothing starts (every check runs in `orchestrator.launch.load_and_check`, before
`start_ray`, which these tests replace by a function that fails the test if called).

Every bad case is the valid baseline below (`good_sweep` on a tiny phantom dataset, which
`test_baseline_is_valid` proves passes `load_and_check`) with exactly one defect.

`python tests/test_bad_inputs.py` prints every case's message, to read them as a user would.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

import orchestrator.launch as launch
from trainers.phantoms import synthesize

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (13, 16, 16)
LABELS = ["LVEDV", "LVESV", "ESED"]
N = 12  # phantoms: 6 subjects at ED and ES, split 4 / 1 / 1 by subject = 8 / 2 / 2 volumes


# ----------------------------------------------------------------------------- baseline
def make_phantoms(root: Path) -> Path:
    synthesize(root, n=N, shape=SHAPE, seed=0, labels=LABELS)
    return root


def good_sweep(data_root: Path, out: Path) -> dict:
    """A valid three-stage study: DP beta-VAE -> DP LDM in its latent space -> DP fine-tuning."""
    ldm_model = {"kind": "ldm", "channels": [8, 16], "norm_num_groups": 4, "num_head_channels": 4,
                 "label_embedding_dim": 8}
    small_train = {"epochs": 1, "lr": 1e-3, "batch_size": 4, "physical_batch_size": 2}
    return {
        "name": "bad-inputs",
        "output": str(out),
        "data": {"root": str(data_root), "labels": list(LABELS), "shape": list(SHAPE)},
        "privacy": {"delta": 1e-3, "accountant": "rdp"},
        "cluster": {"workers_per_trial": 1},
        "stages": [
            {"name": "ae",
             "model": {"kind": "beta_vae", "channels": [4, 8], "latent_channels": 2, "norm_num_groups": 4},
             "train": dict(small_train),
             "dp": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0},
             "search": {"method": "grid",
                        "parameters": {"dp.noise_multiplier": {"values": [0.8, 1.5]},
                                       "model.latent_channels": {"values": [2, 3]}}}},
            {"name": "ldm", "needs": "ae", "select": "best",
             "model": dict(ldm_model),
             "train": dict(small_train),
             "dp": {"enabled": True, "noise_multiplier": 1.0}},
            {"name": "ldm_ft", "needs": "ae", "init_from": "ldm",
             "model": dict(ldm_model),
             "train": {**small_train, "finetune": "attention"},
             "dp": {"enabled": True, "noise_multiplier": 1.0}},
        ],
    }


DELETE = object()


def at(path: str, value):
    """A change setting the dotted `path` (list indices as numbers) to `value` (DELETE: remove it)."""
    def change(raw):
        node = raw
        parts = path.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
        last = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return change


def each(*changes):
    def change(raw):
        for c in changes:
            c(raw)
    return change


def rename(path: str, new_key: str):
    """A change renaming the key at dotted `path` (a typo), keeping its value."""
    def change(raw):
        node = raw
        parts = path.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if p.isdigit() else node[p]
        node[new_key] = node.pop(parts[-1])
    return change


def add_stage(stage: dict):
    return lambda raw: raw["stages"].append(stage)


VQ = {"kind": "vq_vae", "channels": [4, 8], "num_embeddings": 16, "embedding_dim": 2}
LDM3 = {"name": "ldm3", "model": {"kind": "ldm", "channels": [8, 16], "norm_num_groups": 4, "num_head_channels": 4},
        "train": {"epochs": 1, "batch_size": 4, "physical_batch_size": 2}, "dp": {"enabled": True, "noise_multiplier": 1.0}}


def junk_network(key: str, **extra):
    """A file that exists but is no TorchScript network (e.g. a state_dict or a typo'd path)."""
    def change(raw):
        junk = Path(raw["output"]).parent / "junk.pt"
        junk.write_text("not a TorchScript archive")
        raw["stages"][1].setdefault("eval", {}).update({key: str(junk), **extra})
    return change


def text(s: str):
    """A case given as the sweep file's literal text."""
    return lambda raw: s


# ------------------------------------------------------------------------------ sweep cases
# (id, change of the baseline sweep, fragments the message must contain)
SWEEP_CASES = [
    # unknown keys, with a suggestion
    ("top-unknown-key", at("colour", "blue"), ["colour: unknown key"]),
    ("top-typo", rename("stages", "stagse"), ["stagse: unknown key", "did you mean 'stages'"]),
    ("nested-typo", rename("stages.0.dp.noise_multiplier", "noise_multipler"),
     ["stages[ae].dp.noise_multipler: unknown key", "did you mean 'noise_multiplier'"]),
    ("model-key-typo", rename("stages.0.model.latent_channels", "latnt_channels"),
     ["stages[ae].model.latnt_channels: unknown key", "did you mean 'latent_channels'"]),
    ("ldm-key-of-other-family", at("stages.1.model.latent_channels", 2),
     ["stages[ldm].model.latent_channels: unknown key"]),
    # wrong types and ranges
    ("epochs-string", at("stages.0.train.epochs", "two"), ["stages[ae].train.epochs", "integer", "'two'"]),
    ("epochs-fraction", at("stages.0.train.epochs", 2.5), ["stages[ae].train.epochs", "integer"]),
    ("epochs-zero", at("stages.0.train.epochs", 0), ["stages[ae].train.epochs", "greater than or equal to 1"]),
    ("lr-list", at("stages.0.train.lr", [1e-3, 1e-4]), ["stages[ae].train.lr", "number"]),
    ("lr-zero", at("stages.0.train.lr", 0), ["stages[ae].train.lr", "greater than 0"]),
    ("dp-enabled-string", at("stages.0.dp.enabled", "sometimes"), ["stages[ae].dp.enabled", "boolean"]),
    ("sigma-negative", at("stages.0.dp.noise_multiplier", -1.0), ["stages[ae].dp.noise_multiplier", "greater than 0"]),
    ("sigma-zero", at("stages.0.dp.noise_multiplier", 0), ["stages[ae].dp.noise_multiplier", "greater than 0"]),
    ("clip-zero", at("stages.0.dp.max_grad_norm", 0), ["stages[ae].dp.max_grad_norm", "greater than 0"]),
    ("clip-negative", at("stages.0.dp.max_grad_norm", -1.0), ["stages[ae].dp.max_grad_norm", "greater than 0"]),
    ("target-eps-negative", each(at("stages.0.dp.noise_multiplier", None), at("stages.0.dp.target_epsilon", -1)),
     ["stages[ae].dp.target_epsilon", "greater than 0"]),
    ("sigma-and-target-eps", at("stages.0.dp.target_epsilon", 5.0),
     ["stages[ae].dp", "exactly one of `noise_multiplier` or `target_epsilon`"]),
    ("neither-sigma-nor-eps", at("stages.1.dp.noise_multiplier", DELETE),
     ["stages[ldm].dp", "exactly one of `noise_multiplier` or `target_epsilon`"]),
    ("multiplicity-zero", at("stages.1.dp.noise_multiplicity", 0), ["stages[ldm].dp.noise_multiplicity"]),
    ("grad-mode-unknown", at("stages.0.dp.grad_sample_mode", "fast"), ["stages[ae].dp.grad_sample_mode", "'fast'"]),
    # privacy
    ("delta-one", at("privacy.delta", 1), ["privacy.delta", "less than 1"]),
    ("delta-zero", at("privacy.delta", 0), ["privacy.delta", "greater than 0"]),
    ("delta-above-1/n", at("privacy.delta", 0.5), ["privacy.delta: 0.5 is not below 1/n_train = 1/8"]),
    ("accountant-unknown", at("privacy.accountant", "moments"), ["privacy.accountant", "'prv', 'rdp' or 'gdp'", "'moments'"]),
    ("target-eps-unreachable", each(at("stages.0.dp.noise_multiplier", None), at("stages.0.dp.target_epsilon", 1e-4),
                                    at("stages.0.search.parameters", {})),
     ["stages[ae].dp.target_epsilon: 0.0001 is unreachable", "epochs"]),
    # batches
    ("physical-above-logical", at("stages.0.train.physical_batch_size", 8),
     ["stages[ae].train.physical_batch_size: 8 is larger than batch_size 4"]),
    ("batch-above-n-train", at("stages.0.train.batch_size", 64),
     ["stages[ae].train.batch_size: 64 is larger than the 8 training samples"]),
    # the stage graph
    ("needs-cycle", at("stages.0.init_from", "ldm_ft"), ["stages: dependency cycle", "ae", "ldm_ft"]),
    ("needs-self", at("stages.0.init_from", "ae"), ["stages[ae].init_from: a stage cannot depend on itself"]),
    ("needs-unknown", at("stages.1.needs", "aee"), ["stages[ldm].needs: unknown stage 'aee'", "did you mean 'ae'"]),
    ("init-from-unknown", at("stages.2.init_from", "ldn"), ["stages[ldm_ft].init_from: unknown stage 'ldn'",
                                                            "did you mean 'ldm'"]),
    ("select-without-needs", at("stages.1.needs", DELETE), ["stages[ldm].select: only meaningful with `needs`"]),
    ("select-unknown", at("stages.1.select", "all"), ["stages[ldm].select", "'best' or 'each'"]),
    ("needs-an-ldm", add_stage({**LDM3, "needs": "ldm"}),
     ["stages[ldm3].needs: stage 'ldm' trains ldm; expected a compression model"]),
    ("needs-on-non-ldm", add_stage({"name": "ae2", "needs": "ae", "model": {"kind": "beta_vae"}}),
     ["stages[ae2].needs: only an ldm stage uses a compression model"]),
    ("init-from-other-kind", at("stages.2.init_from", "ae"),
     ["stages[ldm_ft].init_from: stage 'ae' trains beta_vae; expected the same model kind (ldm)"]),
    ("duplicate-stage-names", at("stages.2.name", "ldm"), ["stages: duplicate stage name 'ldm'"]),
    ("stages-empty", at("stages", []), ["stages", "at least 1"]),
    ("stages-mapping", lambda raw: raw.update(stages={s["name"]: s for s in raw["stages"]}),
     ["stages", "valid list"]),
    ("name-missing", at("name", DELETE), ["name: required key is missing"]),
    ("stage-name-missing", at("stages.1.name", DELETE), ["stages[1].name: required key is missing"]),
    ("stage-name-empty", at("stages.1.name", ""), ["stages[1].name", "at least 1 character"]),
    # search
    ("search-path-typo", at("stages.0.search.parameters", {"model.latnt_channels": {"values": [2, 3]}}),
     ["stages[ae].search.parameters.model.latnt_channels: no such key", "did you mean 'model.latent_channels'"]),
    ("search-path-head-typo", at("stages.0.search.parameters", {"modle.latent_channels": {"values": [2, 3]}}),
     ["stages[ae].search.parameters.modle.latent_channels: no such key", "did you mean 'model'"]),
    ("search-value-type", at("stages.0.search.parameters", {"train.batch_size": {"values": [4, "big"]}}),
     ["stages[ae].search.parameters", "train.batch_size", "integer", "'big'"]),
    ("search-value-invalid", at("stages.0.search.parameters", {"dp.noise_multiplier": {"values": [1.0, -2.0]}}),
     ["stages[ae].search.parameters", "dp.noise_multiplier", "-2.0", "greater than 0"]),
    ("search-value-breaks-batch", at("stages.0.search.parameters", {"train.batch_size": {"values": [4, 1]}}),
     ["stages[ae].search.parameters: with {'train.batch_size': 1}", "train.physical_batch_size: 2 is larger than batch_size 1"]),
    ("search-grid-distribution",
     at("stages.0.search.parameters", {"train.lr": {"distribution": "log_uniform", "min": 1e-4, "max": 1e-2}}),
     ["stages[ae].search.parameters.train.lr: grid search needs `values` or `value`"]),
    ("search-min-above-max", each(at("stages.0.search.method", "random"), at("stages.0.search.parameters", {
        "train.lr": {"distribution": "uniform", "min": 1e-2, "max": 1e-4}})),
     ["stages[ae].search.parameters.train.lr.min: expected min < max"]),
    ("search-log-uniform-nonpositive", each(at("stages.0.search.method", "random"), at("stages.0.search.parameters", {
        "train.lr": {"distribution": "log_uniform", "min": 0, "max": 1e-2}})),
     ["stages[ae].search.parameters.train.lr.min: log_uniform needs min > 0"]),
    ("search-unknown-distribution", each(at("stages.0.search.method", "random"), at("stages.0.search.parameters", {
        "train.lr": {"distribution": "normal", "min": 1e-4, "max": 1e-2}})),
     ["stages[ae].search.parameters.train.lr.distribution", "'normal'"]),
    ("search-float-distribution-on-int", each(at("stages.0.search.method", "random"), at("stages.0.search.parameters", {
        "train.epochs": {"distribution": "uniform", "min": 1, "max": 3}})),
     ["stages[ae].search.parameters.train.epochs: uniform draws fractional numbers", "int_uniform"]),
    ("search-values-empty", at("stages.0.search.parameters", {"train.lr": {"values": []}}),
     ["stages[ae].search.parameters.train.lr.values: expected a non-empty list"]),
    ("search-values-and-value", at("stages.0.search.parameters", {"train.lr": {"values": [1e-3], "value": 1e-3}}),
     ["stages[ae].search.parameters.train.lr", "exactly one of `values`, `value`, or `distribution`"]),
    ("search-min-without-distribution", at("stages.0.search.parameters", {"train.lr": {"values": [1e-3], "min": 0}}),
     ["stages[ae].search.parameters.train.lr.min/max: only valid with `distribution`"]),
    ("search-method-unknown", at("stages.0.search.method", "bayes"), ["stages[ae].search.method", "'bayes'"]),
    ("search-mode-unknown", at("stages.0.search.mode", "minimize"), ["stages[ae].search.mode", "'min' or 'max'"]),
    ("search-num-samples-zero", at("stages.0.search.num_samples", 0), ["stages[ae].search.num_samples"]),
    # the YAML itself
    ("yaml-broken", text("name: x\nstages:\n  - name: a\n    dp: {enabled: true, noise_multiplier: [1\n"),
     ["line 5", "invalid YAML"]),
    ("yaml-bad-indent", text("name: x\nstages:\n  - name: a\n     model: {kind: beta_vae}\n"),
     ["line 4", "invalid YAML"]),
    ("yaml-duplicate-key", text("name: x\nstages:\n  - name: a\n    dp: {enabled: true, noise_multiplier: 1.0}\n"
                                "    dp: {enabled: false}\n"), ["sweep.yaml line 5: invalid YAML: duplicate key 'dp'"]),
    ("yaml-list", text("- name: x\n- stages: []\n"), ["expected a mapping", "list"]),
    ("yaml-scalar", text("just some words\n"), ["expected a mapping", "str"]),
    ("yaml-empty", text(""), ["expected a mapping", "got an empty file"]),
    ("yaml-comments-only", text("# TODO: write the study\n"), ["expected a mapping", "got an empty file"]),
    ("sweep-missing", "MISSING", ["nothing-here.yaml: sweep file not found"]),
    ("sweep-is-directory", "DIRECTORY", ["cannot read sweep file"]),
    # data section
    ("shape-two-entries", at("data.shape", [13, 16]), ["data.shape: expected three sizes (D, H, W), got [13, 16]"]),
    ("shape-four-entries", at("data.shape", [13, 16, 16, 1]), ["data.shape: expected three sizes (D, H, W)"]),
    ("shape-zero", at("data.shape", [13, 0, 16]), ["data.shape: expected three positive sizes (D, H, W), got [13, 0, 16]"]),
    ("shape-string", at("data.shape", "13x16x16"), ["data.shape"]),
    ("labels-not-unique", at("data.labels", ["LVEDV", "LVEDV", "ESED"]), ["data.labels: names must be unique", "'LVEDV' is listed more than once"]),
    ("labels-string", at("data.labels", "LVEDV"), ["data.labels", "list"]),
    ("data-typo", rename("data.root", "roots"), ["data.roots: unknown key", "did you mean 'root'"]),
    ("stage-data-typo", at("stages.1.data", {"roots": "x"}),
     ["stages[ldm].data.roots: unknown key", "did you mean 'root'"]),
    ("stage-data-shape", at("stages.1.data", {"shape": [13, 0, 16]}), ["stages[ldm].data.shape: expected three positive sizes"]),
    ("synthesize-n-too-small", at("data.synthesize", {"n": 5}), ["data.synthesize.n", "greater than or equal to 6"]),
    # subjects
    ("subject-pattern-not-regex", at("data.subject_pattern", "(s\\d+"), ["data.subject_pattern", "is not a regular expression"]),
    ("subject-pattern-no-group", at("data.subject_pattern", "s\\d+"), ["data.subject_pattern", "has no group"]),
    ("subject-pattern-no-match", at("data.subject_pattern", "patient-(\\d+)"),
     ["s000000_ed.npz", "does not match data.subject_pattern", "first group"]),
    ("unit-not-known", at("privacy.unit", "patient"), ["privacy.unit", "'record' or 'subject'"]),
    ("unit-searched", at("stages.0.search.parameters", {"privacy.unit": {"values": ["record", "subject"]}}),
     ["search.parameters.privacy.unit: the unit of privacy is not a hyperparameter"]),
    ("unit-subject-ghost", lambda raw: (raw["privacy"].update(unit="subject"),
                                        raw["stages"][0]["dp"].update(grad_sample_mode="ghost")),
     ["stages[ae].dp.grad_sample_mode: ghost clipping computes one norm per volume"]),
    ("unit-subject-batch-above-subjects", lambda raw: (raw["privacy"].update(unit="subject"),
                                                       raw["stages"][0]["train"].update(batch_size=6)),
     ["stages[ae].train.batch_size: 6 is larger than the 4 training subjects"]),
    ("synthesize-variant", at("data.synthesize", {"variant": "privat"}), ["data.synthesize.variant", "'privat'"]),
    # models
    ("model-kind-unknown", at("stages.0.model.kind", "beta_vea"),
     ["stages[ae].model.kind", "'beta_vea'", "did you mean 'beta_vae'"]),
    ("model-kind-missing", at("stages.0.model.kind", DELETE), ["stages[ae].model.kind: required key is missing"]),
    ("channels-empty", at("stages.0.model.channels", []), ["stages[ae].model.channels: expected a non-empty list of positive integers"]),
    ("norm-groups-not-dividing", at("stages.0.model.norm_num_groups", 3),
     ["stages[ae].model.norm_num_groups: 3 must divide every channel count, not [4, 8]"]),
    ("ema-codebook-with-dp", at("stages.0.model", {**VQ, "codebook": "ema"}),
     ["stages[ae].model.codebook: `ema`", "expected `gradient` when dp.enabled is true"]),
    ("adversarial-with-dp", at("stages.0.model.adversarial_weight", 0.1),
     ["stages[ae].model.adversarial_weight:", "expected 0 when dp.enabled is true"]),
    ("perceptual-without-network", at("stages.0.model.perceptual_weight", 0.5),
     ["stages[ae].model.perceptual_network: perceptual_weight > 0 needs a local TorchScript"]),
    ("perceptual-network-missing", each(at("stages.0.model.perceptual_weight", 0.5),
                                        at("stages.0.model.perceptual_network", "nets/missing.pt")),
     ["stages[ae].model.perceptual_network", "missing.pt does not exist"]),
    ("beta-end-below-start", at("stages.1.model.beta_end", 0.001), ["stages[ldm].model.beta_end: expected beta_end > beta_start"]),
    ("attention-levels-length", at("stages.1.model.attention_levels", [True]),
     ["stages[ldm].model.attention_levels: expected one entry per level"]),
    ("label-dropout-above-1", at("stages.1.model.label_dropout", 1.5), ["stages[ldm].model.label_dropout"]),
    ("vq-res-channels-length", each(at("stages.0.model", {**VQ, "num_res_channels": [4]}),
                                    at("stages.0.search.parameters", {})),
     ["stages[ae].model.num_res_channels: expected one entry per level"]),
    ("noise-multiplicity-on-beta-vae", at("stages.0.dp.noise_multiplicity", 2),
     ["stages[ae].dp.noise_multiplicity:", "expected 1 for beta_vae"]),
    ("ghost-with-multiplicity", each(at("stages.1.dp.noise_multiplicity", 2), at("stages.1.dp.grad_sample_mode", "ghost")),
     ["stages[ldm].dp.grad_sample_mode: ghost clipping", "noise_multiplicity > 1"]),
    ("finetune-attention-on-vq-vae", each(at("stages.0.model", VQ), at("stages.0.train.finetune", "attention"),
                                          at("stages.0.search.parameters", {})),
     ["stages[ae].train.finetune: `attention` needs an ldm model, not vq_vae"]),
    # evaluation
    ("eval-label-network-without-outputs", at("stages.1.eval", {"label_network": "nets/regressor.pt"}),
     ["stages[ldm].eval.label_network_outputs: expected the label names"]),
    ("eval-feature-network-missing", at("stages.1.eval", {"feature_network": "nets/fd.pt"}),
     ["stages[ldm].eval.feature_network", "fd.pt does not exist"]),
    ("eval-feature-network-not-torchscript", junk_network("feature_network"),
     ["stages[ldm].eval.feature_network", "is not a TorchScript file"]),
    ("eval-label-network-not-torchscript", junk_network("label_network", label_network_outputs=["LVEDV"]),
     ["stages[ldm].eval.label_network", "is not a TorchScript file"]),
    ("eval-label-outputs-unknown", at("stages.1.eval", {"label_network_outputs": ["LVEDV", "HEIGHT"]}),
     ["stages[ldm].eval.label_network_outputs", "'HEIGHT' is not one of data.labels"]),
    ("eval-n-samples-one", at("stages.1.eval", {"n_samples": 1}), ["stages[ldm].eval.n_samples", "greater than or equal to 2"]),
    ("random-count-typo", each(at("stages.0.search.method", "random"),
                               at("stages.0.search.num_samples", {"distribution": "poisson", "mena": 4})),
     ["stages[ae].search.num_samples.mena: unknown key", "did you mean 'mean'"]),
    # cluster, output
    ("gpus-per-worker-zero", at("cluster.gpus_per_worker", 0), ["cluster.gpus_per_worker", "greater than 0"]),
    ("workers-zero", at("cluster.workers_per_trial", 0), ["cluster.workers_per_trial", "greater than or equal to 1"]),
    ("use-gpu-unknown", at("cluster.use_gpu", "maybe"), ["cluster.use_gpu", "'auto'", "got 'maybe'"]),
    ("output-is-a-file", "OUTPUT_FILE", ["output: ", "is not a directory; expected a folder"]),
    ("unfinished-launch", "UNFINISHED", ["holds an unfinished launch", "--resume"]),
    ("synthesize-into-non-empty-folder", "SYNTH_NONEMPTY", ["half-written has no training.npy but is not empty", "data.synthesize"]),
]


# ---------------------------------------------------------------------------- dataset cases
def sample_path(root: Path, i: int) -> Path:
    return root / "samples" / f"s{i // 2:06d}_{'es' if i % 2 else 'ed'}.npz"   # volume i: subject i // 2


def rewrite(i: int, image=None, labels=None, **extra):
    """A defect: sample i rewritten with `image(old_image)` / `labels(old_labels)`."""
    def change(root: Path, raw: dict):
        with np.load(sample_path(root, i)) as z:
            old_image, old_labels = z["image"], z["labels"]
        arrays = {"image": image(old_image) if image else old_image,
                  "labels": labels(old_labels) if labels else old_labels, **extra}
        np.savez(sample_path(root, i), **{k: v for k, v in arrays.items() if v is not None})
    return change


def set_voxel(value):
    def f(img):
        img = img.copy()
        img[6, 8, 8] = value
        return img
    return f


def index_of(root: Path, split: str) -> list[str]:
    return [str(p) for p in np.load(root / f"{split}.npy")]


def set_index(split: str, entries):
    def change(root: Path, raw: dict):
        np.save(root / f"{split}.npy", entries(root) if callable(entries) else entries)
    return change


def write_pickled_npy(root: Path, raw: dict):
    with np.load(sample_path(root, 4)) as z:
        obj = {"image": z["image"], "labels": z["labels"]}
    np.save(root / "samples" / "s000002_ed.npy", obj, allow_pickle=True)
    np.save(root / "training.npy", np.array([p.replace("s000002_ed.npz", "s000002_ed.npy") for p in index_of(root, "training")]))


def pickled_not_a_dict(root: Path, raw: dict):
    raw["data"]["allow_pickle"] = True
    with np.load(sample_path(root, 4)) as z:
        obj = np.empty(2, dtype=object)  # a list of the two arrays, not a dict
        obj[0], obj[1] = z["image"], z["labels"]
    np.save(root / "samples" / "s000002_ed.npy", obj, allow_pickle=True)
    np.save(root / "training.npy", np.array([p.replace("s000002_ed.npz", "s000002_ed.npy") for p in index_of(root, "training")]))


def truncate(root: Path, raw: dict):
    data = sample_path(root, 5).read_bytes()
    sample_path(root, 5).write_bytes(data[: len(data) // 2])


def duplicate_content(root: Path, raw: dict):
    shutil.copy(sample_path(root, 2), root / "samples" / "copy_of_s000001_ed.npz")
    np.save(root / "testing.npy", np.array(["samples/copy_of_s000001_ed.npz"]))


def unsupported_suffix(root: Path, raw: dict):
    (root / "samples" / "s000003_es.nii.gz").write_bytes(b"\x1f\x8b\x08\x00")
    np.save(root / "training.npy", np.array([p.replace("s000003_es.npz", "s000003_es.nii.gz") for p in index_of(root, "training")]))


def root_missing(root: Path, raw: dict):
    raw["data"]["root"] = str(root.parent / "no-such-data")


def root_is_file(root: Path, raw: dict):
    shutil.rmtree(root)
    root.write_text("not a folder")


def sweep_change(change):
    return lambda root, raw: change(raw)


def directory_as_sample(root: Path, raw: dict):
    (root / "samples" / "folder.npz").mkdir()
    np.save(root / "validation.npy", np.array(["samples/folder.npz"]))


def text_not_zip(root: Path, raw: dict):
    sample_path(root, 3).write_text("image,labels\n0.1,0.2\n")


# (id, change of the copied dataset (and maybe the sweep), fragments the message must contain)
DATA_CASES = [
    ("volume-hwd", rewrite(3, image=lambda im: np.transpose(im, (1, 2, 0))),
     ["s000001_es.npz", "(16, 16, 13)", "expected (D, H, W) = (13, 16, 16)", "transpose to depth first"]),
    ("wrong-depth", rewrite(3, image=lambda im: im[:12]), ["s000001_es.npz", "(12, 16, 16)", "expected (D, H, W) = (13, 16, 16)"]),
    ("channel-axis", rewrite(3, image=lambda im: im[None]), ["s000001_es.npz", "(1, 13, 16, 16)", "3-D volume"]),
    ("nan-voxel", rewrite(6, image=set_voxel(np.nan)), ["s000003_ed.npz", "1 non-finite voxel", "expected finite values"]),
    ("inf-voxel", rewrite(6, image=set_voxel(np.inf)), ["s000003_ed.npz", "non-finite", "expected finite values"]),
    ("values-0-255", rewrite(1, image=lambda im: im * 255), ["s000000_es.npz", "expected intensities normalised to [0, 1]"]),
    ("values-negative", rewrite(1, image=lambda im: im * 2 - 1), ["s000000_es.npz", "expected intensities normalised to [0, 1]"]),
    ("image-strings", rewrite(1, image=lambda im: np.full(im.shape, "x")), ["s000000_es.npz", "dtype", "numeric"]),
    ("sample-missing", lambda root, raw: sample_path(root, 8).unlink(), ["s000004_ed.npz", "does not exist"]),
    ("sample-is-directory", directory_as_sample, ["folder.npz", "does not exist as a file"]),
    ("index-missing", lambda root, raw: (root / "validation.npy").unlink(), ["validation.npy", "missing",
                                                                              "1-D string array"]),
    ("split-empty", set_index("testing", np.array([], dtype=str)), ["testing.npy", "0 samples", "at least 1"]),
    ("index-2d", set_index("training", lambda root: np.array(index_of(root, "training")).reshape(2, 4)),
     ["training.npy", "shape (2, 4)", "expected a 1-D array of sample paths"]),
    ("index-numbers", set_index("training", np.arange(10)), ["training.npy", "dtype", "path strings"]),
    ("index-pickled", set_index("testing", lambda root: np.array(index_of(root, "testing"), dtype=object)),
     ["testing.npy", "pickled", "data.allow_pickle"]),
    ("index-not-npy", lambda root, raw: (root / "training.npy").write_text("samples/s000000_ed.npz\n"),
     ["training.npy is not a .npy file", "1-D string array"]),
    ("label-count-vs-data-labels", sweep_change(at("data.labels", ["LVEDV", "LVESV", "ESED", "AGE"])),
     ["s000000_ed.npz", "has 3 labels; expected 4 (LVEDV, LVESV, ESED, AGE)"]),
    ("label-count-one-sample", rewrite(2, labels=lambda lab: lab[:2]), ["s000001_ed.npz", "has 2 labels; expected 3"]),
    ("labels-strings", rewrite(2, labels=lambda lab: np.array(["150", "60", "ED"])), ["s000001_ed.npz", "labels", "numeric"]),
    ("labels-2d", rewrite(2, labels=lambda lab: lab[None]), ["s000001_ed.npz", "labels", "1-D"]),
    ("labels-inf", rewrite(2, labels=lambda lab: np.array([np.inf, 1.0, 0.0])), ["s000001_ed.npz", "inf", "finite"]),
    ("pickled-npy-without-allow-pickle", write_pickled_npy, ["s000002_ed.npy", "pickled", "data.allow_pickle: true"]),
    ("pickled-npy-not-a-dict", pickled_not_a_dict, ["s000002_ed.npy", "expected a pickled dict with keys 'image' and 'labels'"]),
    ("subject-in-two-splits", lambda root, raw: (
        np.save(root / "testing.npy", np.array(index_of(root, "testing") + index_of(root, "training")[-1:])),
        np.save(root / "training.npy", np.array(index_of(root, "training")[:-1]))),
     ["subject 's000003' has volumes in the training and testing splits", "expected all of a subject's volumes"]),
    ("same-file-in-two-splits", set_index("testing", np.array(["samples/s000000_ed.npz"])),
     ["s000000_ed.npz", "same file", "leak between training and testing"]),
    ("same-image-two-paths", duplicate_content,
     ["copy_of_s000001_ed.npz", "identical image", "leak between training and testing"]),
    ("npz-truncated", truncate, ["s000002_es.npz", "cannot read", "expected a valid .npz sample"]),
    ("npz-not-a-zip", text_not_zip, ["s000001_es.npz", "not an .npz (zip) archive"]),
    ("npz-without-image", rewrite(5, image=lambda im: None, volume=np.zeros(SHAPE, np.float32)),
     ["s000002_es.npz", "missing key(s) ['image']", "expected keys 'image' and 'labels'"]),
    ("unsupported-suffix", unsupported_suffix, ["s000003_es.nii.gz", "unsupported sample format", ".npz"]),
    ("root-missing", root_missing, ["no-such-data", "does not exist", "expected a directory"]),
    ("root-is-a-file", root_is_file, ["is not a directory"]),
]



# ------------------------------------------------------------------------------ machinery
def write_case_sweep(tmp: Path, data_root: Path, change) -> list[str]:
    """Write the sweep file of a case under `tmp`; returns the launch argv."""
    out = tmp / "out"
    raw = good_sweep(data_root, out)
    if change == "MISSING":
        return [str(tmp / "nothing-here.yaml")]
    sweep = tmp / "sweep.yaml"
    if change == "DIRECTORY":
        sweep.mkdir()
        return [str(sweep)]
    if change == "OUTPUT_FILE":
        out.write_text("not a folder")
    elif change == "UNFINISHED":
        out.mkdir()
        (out / launch.STATE_FILE).write_text(json.dumps({"status": "running"}))
    elif change == "SYNTH_NONEMPTY":
        # an interrupted phantom write leaves samples but no index files
        fresh = tmp / "half-written"
        (fresh / "samples").mkdir(parents=True)
        (fresh / "samples" / "s000000_ed.npz").write_bytes(b"PK")
        raw["data"].update(root=str(fresh), synthesize={"kind": "phantom", "n": N})
    else:
        result = change(raw)
        if isinstance(result, str):
            sweep.write_text(result)
            return [str(sweep)]
    sweep.write_text(yaml.safe_dump(raw, sort_keys=False))
    return [str(sweep)]


def write_data_case(tmp: Path, source: Path, change) -> list[str]:
    root = tmp / "data"
    shutil.copytree(source, root)
    raw = good_sweep(root, tmp / "out")
    change(root, raw)
    sweep = tmp / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(raw, sort_keys=False))
    return [str(sweep)]


def run_main(argv, capsys) -> tuple[int, str, str]:
    code = launch.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, expected: list[str]) -> str:
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in expected:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("phantom") / "data")


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Nothing may start: reaching `start_ray` fails the test."""
    def refuse(cfg):
        raise AssertionError("start_ray was reached: the input passed validation")
    monkeypatch.setattr(launch, "start_ray", refuse)


# ---------------------------------------------------------------------------------- tests
def test_baseline_is_valid(phantom, tmp_path):
    """Each bad case is this sweep and dataset with one defect."""
    for kind in ("sweep", "data"):
        tmp = tmp_path / kind
        tmp.mkdir()
        if kind == "sweep":
            argv = write_case_sweep(tmp, phantom, lambda raw: None)
        else:
            argv = write_data_case(tmp, phantom, lambda root, raw: None)
        cfg, plans = launch.load_and_check(launch.parse_args(argv))
        assert [s.name for s in cfg.stages] == ["ae", "ldm", "ldm_ft"]
        assert {p.n_train for p in plans.values()} == {8}   # 12 phantoms = 6 subjects, 4 of them training


def test_there_are_enough_cases():
    assert len(SWEEP_CASES) >= 30 and len(DATA_CASES) >= 15
    assert len({c[0] for c in SWEEP_CASES + DATA_CASES}) == len(SWEEP_CASES) + len(DATA_CASES)


@pytest.mark.parametrize("change,expected", [c[1:] for c in SWEEP_CASES], ids=[c[0] for c in SWEEP_CASES])
def test_bad_sweep_is_one_line_exit_2(phantom, tmp_path, capsys, change, expected):
    argv = write_case_sweep(tmp_path, phantom, change)
    code, out, err = run_main(argv, capsys)
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / "out" / launch.STATE_FILE).exists() or change == "UNFINISHED"


@pytest.mark.parametrize("change,expected", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_dataset_is_one_line_exit_2(phantom, tmp_path, capsys, change, expected):
    argv = write_data_case(tmp_path, phantom, change)
    code, out, err = run_main(argv, capsys)
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / "out" / launch.STATE_FILE).exists()


def test_bad_dataset_is_reported_again_when_cached(phantom, tmp_path, capsys):
    """The validation cache keeps only verdicts of valid files: a second launch fails the same way."""
    argv = write_data_case(tmp_path, phantom, {c[0]: c[1] for c in DATA_CASES}["nan-voxel"])
    first = run_main(argv, capsys)
    second = run_main(argv, capsys)
    assert first == second and first[0] == 2


def test_unreachable_epsilon_prints_no_warnings(phantom, tmp_path, capsys, recwarn):
    """Solving sigma makes Opacus warn; those lines must not join the one `error:` line."""
    import trainers.loop  # noqa: F401 - its import-time warnings are not this test's

    recwarn.clear()
    change, expected = {c[0]: c[1:] for c in SWEEP_CASES}["target-eps-unreachable"]
    code, out, err = run_main(write_case_sweep(tmp_path, phantom, change), capsys)
    assert_one_line_error(code, err, expected)
    assert not recwarn.list, [str(w.message) for w in recwarn.list]


SUBPROCESS_CASES = ["yaml-broken", "nested-typo", "search-value-type", "nan-voxel"]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_cli_prints_no_traceback(phantom, tmp_path, case):
    """The real command line: one line on stderr, exit 2, no traceback, Ray never started."""
    sweeps = {c[0]: c for c in SWEEP_CASES}
    if case in sweeps:
        _, change, expected = sweeps[case]
        argv = write_case_sweep(tmp_path, phantom, change)
    else:
        _, change, expected = {c[0]: c for c in DATA_CASES}[case]
        argv = write_data_case(tmp_path, phantom, change)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.launch", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert_one_line_error(proc.returncode, proc.stderr, expected)
    assert "Ray" not in proc.stdout and "dashboard" not in proc.stdout, proc.stdout
    assert not (tmp_path / "out" / launch.STATE_FILE).exists()


# ------------------------------------------------------------------------------- review
def all_messages() -> list[tuple[str, str]]:
    """(case id, stderr) of every case, for reading them as a user would."""
    import contextlib
    import io

    launch.start_ray = lambda cfg: (_ for _ in ()).throw(AssertionError("start_ray was reached"))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        source = make_phantoms(d / "phantom")
        for group, cases, write in (("sweep", SWEEP_CASES, write_case_sweep), ("data", DATA_CASES, write_data_case)):
            for name, change, _ in cases:
                tmp = d / group / name
                tmp.mkdir(parents=True)
                argv = write(tmp, source, change)
                err = io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    try:
                        code = launch.main(argv)
                    except BaseException as exc:  # noqa: BLE001 - show it in the review
                        code = f"raised {type(exc).__name__}: {exc}"
                rows.append((f"{group}:{name}", f"[{code}] {err.getvalue().strip()}"))
    return rows


if __name__ == "__main__":
    for name, msg in all_messages():
        print(f"{name:45s} {msg}")
