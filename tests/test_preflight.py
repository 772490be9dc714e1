"""Checks that need the data: each is one line, exit 2, before Ray starts."""
import pytest
import yaml

from orchestrator.launch import main

N = 20  # phantoms -> 16 training volumes


def sweep(tmp_path, **stage):
    raw = {
        "name": "pf", "output": str(tmp_path / "out"),
        "data": {"root": str(tmp_path / "data"), "labels": ["LVEDV"], "shape": [5, 16, 16],
                 "synthesize": {"kind": "phantom", "n": N, "seed": 0}},
        "privacy": {"delta": 1e-3},
        "stages": [{"name": "ae", "model": {"kind": "beta_vae", "channels": [4, 8], "norm_num_groups": 4},
                    "train": {"epochs": 1, "batch_size": 4, "physical_batch_size": 2},
                    "dp": {"enabled": True, "noise_multiplier": 1.0}, **stage}],
    }
    return raw


def run(tmp_path, raw, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main([str(path)])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("change,expected", [
    (lambda r: r["privacy"].update(delta=0.1), "privacy.delta: 0.1 is not below 1/n_train = 1/16"),
    (lambda r: r["stages"][0]["dp"].update(noise_multiplier=None, target_epsilon=1e-4),
     "stages[ae].dp.target_epsilon: 0.0001 is unreachable"),
    (lambda r: r["stages"][0]["train"].update(batch_size=64, physical_batch_size=2),
     "stages[ae].train.batch_size: 64 is larger than the 16 training samples"),
    (lambda r: r["stages"][0]["model"].update(perceptual_weight=1.0, perceptual_network="missing.pt"),
     "perceptual_network"),
    (lambda r: r["stages"][0]["search"].update(parameters={"train.batch_size": {"values": [4, 32]}})
     if "search" in r["stages"][0] else r["stages"][0].update(search={"parameters": {"train.batch_size": {"values": [4, 32]}}}),
     "batch_size: 32 is larger than the 16 training samples"),
])
def test_preflight_errors_are_one_line_exit_2(tmp_path, capsys, change, expected):
    raw = sweep(tmp_path)
    change(raw)
    code, err = run(tmp_path, raw, capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert expected in err, err
    assert not (tmp_path / "out" / "launch.json").exists()  # nothing started


def test_public_data_needs_no_delta_check(tmp_path, capsys):
    raw = sweep(tmp_path)
    raw["privacy"]["delta"] = 0.1
    raw["data"]["private"] = False
    from orchestrator.sweep_file import parse_sweep
    from orchestrator.preflight import preflight

    cfg = parse_sweep(raw)
    plans = preflight(cfg)  # no error: public data costs no budget
    assert plans["ae"].n_train == 16
