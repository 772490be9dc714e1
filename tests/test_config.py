"""The sweep-file schema: shipped files validate; each bad field is one clear line, exit 2."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.sweep_file import ConfigError, load_sweep, parse_sweep, reference_markdown
from orchestrator.launch import main

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))

GOOD = {
    "name": "t",
    "data": {"root": "data/x", "labels": ["A", "B"], "shape": [5, 16, 16]},
    "stages": [{
        "name": "ae",
        "model": {"kind": "beta_vae", "channels": [4, 8], "norm_num_groups": 4},
        "train": {"epochs": 1, "batch_size": 8, "physical_batch_size": 4},
        "dp": {"enabled": True, "noise_multiplier": 1.0},
        "search": {"parameters": {"dp.noise_multiplier": {"values": [0.5, 1.0]}}},
    }],
}


def with_change(path: str, value):
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    node = raw
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    last = parts[-1]
    if value is DELETE:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return raw


DELETE = object()


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_shipped_sweep_validates(path):
    cfg = load_sweep(path)
    assert cfg.stages
    # each shipped file starts with a comment giving the command that runs it
    assert path.read_text().startswith("#") and "orchestrator.launch" in path.read_text().split("\n", 3)[1]


def test_good_config_parses_and_fills_defaults():
    cfg = parse_sweep(GOOD)
    assert cfg.privacy.accountant == "prv" and cfg.cluster.address is None
    assert cfg.stages[0].dp.max_grad_norm == 1.0


BAD = [
    ("stages.0.dp.noise_multipler", 1.0, "stages[ae].dp.noise_multipler: unknown key (did you mean 'noise_multiplier'?)"),
    ("stages.0.dp.noise_multiplier", -1, "stages[ae].dp.noise_multiplier"),
    ("stages.0.dp.noise_multiplier", 0, "greater than 0"),
    ("stages.0.dp.max_grad_norm", 0, "stages[ae].dp.max_grad_norm"),
    ("stages.0.train.physical_batch_size", 64, "larger than batch_size"),
    ("stages.0.train.epochs", "two", "stages[ae].train.epochs"),
    ("privacy.accountant", "moments", "privacy.accountant"),
    ("privacy.delta", 2, "privacy.delta"),
    ("stages.0.needs", "vae", "unknown stage 'vae'"),
    ("stages.0.select", "best", "select: only meaningful with `needs`"),
    ("stages.0.model.kind", "gan", "stages[ae].model.kind"),
    ("stages.0.model.norm_num_groups", 3, "must divide every channel count"),
    ("stages.0.search.method", "bayes", "stages[ae].search.method"),
    ("stages.0.search.parameters", {"dp.noise_multiplier": {"values": [1.0, -2.0]}}, "noise_multiplier"),
    ("stages.0.search.parameters", {"model.latent_chanels": {"values": [1, 2]}}, "did you mean 'model.latent_channels'"),
    ("stages.0.search.parameters", {"dp.noise_multiplier": {"distribution": "uniform", "min": 0.5, "max": 1}},
     "grid search needs `values`"),
    ("stages.0.search.parameters", {"train.lr": {"values": []}}, "non-empty"),
    ("stages.0.dp.target_epsilon", 3.0, "exactly one of `noise_multiplier` or `target_epsilon`"),
    ("stages.0.name", DELETE, "stages[0].name: required key is missing"),
    ("stages", [], "stages"),
    ("data.shape", [13, 48], "data.shape"),
    ("cluster.workers_per_trial", 0, "cluster.workers_per_trial"),
    ("colour", "blue", "colour: unknown key"),
]


@pytest.mark.parametrize("path,value,expected", BAD, ids=[b[0] + "=" + str(b[1])[:20] for b in BAD])
def test_bad_field_is_one_clear_line(path, value, expected):
    with pytest.raises(ConfigError) as err:
        parse_sweep(with_change(path, value), source="s.yaml")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("s.yaml: ")
    assert expected in msg, msg


def test_needs_cycle_is_named():
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    second = dict(raw["stages"][0], name="b", needs="ae")
    raw["stages"][0]["needs"] = "b"
    raw["stages"].append(second)
    with pytest.raises(ConfigError, match="dependency cycle"):
        parse_sweep(raw)


def test_cli_exit_2_one_line_no_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - name: a\n    dp: {enabled: true, noise_multiplier: [1\n")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "line" in err and "\n" not in err
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_bad_dataset_is_exit_2_before_ray(tmp_path):
    sweep = tmp_path / "s.yaml"
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    raw["data"]["root"] = str(tmp_path / "nowhere")
    sweep.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "orchestrator.launch", str(sweep)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Ray" not in proc.stdout


def test_readme_reference_matches_schema():
    readme = (ROOT / "README.md").read_text()
    assert reference_markdown() in readme, "regenerate with: python -m orchestrator.config --reference"


LDM_STAGES = [
    {"name": "ae", "model": {"kind": "beta_vae", "channels": [4, 8], "norm_num_groups": 4}, "dp": {"enabled": False}},
    {"name": "pre", "needs": "ae", "model": {"kind": "ldm", "label_ranges": {"A": [50, 300]}}, "dp": {"enabled": False}},
    {"name": "fine", "needs": "ae", "init_from": "pre", "model": {"kind": "ldm", "label_ranges": {"A": [50, 300]}},
     "dp": {"enabled": False}},
]


@pytest.mark.parametrize("path,value,expected", [
    ("stages.1.model.label_ranges", {"LVEDV": [50, 300]}, "stages[pre].model.label_ranges.LVEDV: not a label"),
    ("stages.1.model.label_ranges", {"A": [300, 50]}, "label_ranges.A: expected [low, high] with finite low < high"),
    ("stages.2.model.label_ranges", {"A": [0, 1]}, "the label embedder's weights only fit the label map"),
])
def test_label_ranges_are_checked(path, value, expected):
    raw = dict(yaml.safe_load(yaml.safe_dump(GOOD)), stages=yaml.safe_load(yaml.safe_dump(LDM_STAGES)))
    assert parse_sweep(raw).stages[1].model.label_ranges == {"A": (50.0, 300.0)}
    node = raw["stages"][int(path.split(".")[1])]["model"]
    node["label_ranges"] = value
    with pytest.raises(ConfigError) as err:
        parse_sweep(raw, source="s.yaml")
    assert "\n" not in str(err.value) and expected in str(err.value), str(err.value)
