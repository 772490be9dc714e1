"""Smoke tests of the benchmarks: they run and report the right fields. No timing is
asserted; the one figure checked is a ratio measured within the run (memory flat in the
logical batch), which does not depend on the machine."""
import json

import pytest

from benchmarks import dp_overhead, eval_intervals, latent_cache, memory, scaling, threads
from orchestrator.config import StageConfig


def test_memory_is_flat_in_logical_batch_and_the_check_can_fail(tmp_path):
    """What the DP steps add to the process's memory (peak RSS while they run minus the RSS
    before them, after a warm-up step) stays flat in the logical batch with micro-batching,
    and grows without it: the same check, run with micro-batching off, fails."""
    def increments(physical):
        out = tmp_path / f"memory{physical}.json"
        memory.main(["--sizes", "16", "64", "--physical", str(physical), "--steps", "1", "--json", str(out)])
        rows = json.loads(out.read_text())
        assert [r["logical_batch"] for r in rows] == [16, 64]
        for r in rows:
            assert {"logical_batch", "physical_batch", "peak_mb", "increment_mb", "increment_vs_smallest"} <= set(r)
            # >= 0, not > 0: with micro-batching the warm-up step may already hold every buffer
            # the measured steps need (a fresh-clone CI run measured +0.0 MB at logical 16)
            assert r["increment_mb"] >= 0
        return rows

    flat = increments(8)
    assert [r["physical_batch"] for r in flat] == [8, 8]
    whole = increments(0)  # no micro-batching: 16 and 64 samples in one piece
    assert [r["physical_batch"] for r in whole] == [16, 64]
    growth = whole[-1]["increment_mb"] - whole[0]["increment_mb"]
    assert whole[-1]["increment_mb"] > 1.5 * whole[0]["increment_mb"] and growth > 10  # the check sees growth
    # 4x the logical batch, same physical batch: the memory must not follow the logical batch
    # (measured: +0.0 MB with micro-batching, +41 MB without)
    assert flat[-1]["increment_mb"] - flat[0]["increment_mb"] <= 0.25 * growth


def test_dp_overhead_reports_dp_and_nondp_side_by_side(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    dp_overhead.main(["--shape", "3", "8", "8", "--batch", "2", "--repeats", "1", "--families", "vq_vae",
                      "--modes", "bk", "--reference", "off", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["bk"]
    for r in rows:
        assert r["layout"] in dp_overhead.LAYOUTS and r["dp_step_s"] > 0 and r["nondp_step_s"] > 0
        assert r["dp_over_nondp"] == pytest.approx(r["dp_step_s"] / r["nondp_step_s"], rel=0.02, abs=0.01)
        assert r["peak_mb"] > 0 and r["nondp_peak_mb"] > 0
    assert "| 3x8x8, 2 | vq_vae |" in capsys.readouterr().out


def test_scaling_help_and_stage_is_valid(capsys):
    with pytest.raises(SystemExit) as exc:
        scaling.main(["--help"])
    assert exc.value.code == 0 and "--quick" in capsys.readouterr().out
    # what the benchmark hands train_worker must be a valid stage (checked without Ray)
    for dp in (False, True):
        stage = StageConfig.model_validate({**scaling.stage_dict(dp, epochs=2, batch=16), "name": "s"})
        assert stage.dp.enabled is dp and stage.train.epochs == 2
    assert {"cores", "cpu", "torch", "gpus"} <= set(scaling.machine())


def test_subject_overhead_reports_both_units_side_by_side(tmp_path, capsys):
    from benchmarks import subject_overhead

    out = tmp_path / "subjects.json"
    subject_overhead.main(["--modes", "bk", "--repeats", "1", "--batch", "4", "--json", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["mode"] == "bk" and row["volumes_per_step"] == 4
    assert row["subject_over_record"] == pytest.approx(row["subject_s_per_volume"] / row["record_s_per_volume"])
    assert "| bk | 13x32x32, 4 |" in capsys.readouterr().out


def test_audit_cost_reports_the_three_sides(tmp_path, capsys):
    from benchmarks import audit_cost

    out = tmp_path / "audit.json"
    audit_cost.main(["--shape", "3", "8", "8", "--epochs", "1", "--repeats", "1", "--max-steps", "2",
                     "--json", str(out)])
    rows = json.loads(out.read_text())
    assert list(rows) == ["none", "gradient", "input"]
    assert rows["none"]["wall_ratio"] == 1.0 and rows["none"]["audit/epsilon_lower"] is None
    for side in ("gradient", "input"):
        assert rows[side]["train_ratio"] == pytest.approx(rows[side]["train_s"] / rows["none"]["train_s"])
        assert 0 <= rows[side]["audit/epsilon_lower"] <= rows[side]["epsilon"]
    assert "| input, M = 100 |" in capsys.readouterr().out


def test_trial_start_help(capsys):
    from benchmarks import trial_start

    with pytest.raises(SystemExit) as exc:
        trial_start.main(["--help"])
    assert exc.value.code == 0 and "--runs" in capsys.readouterr().out


def test_threads_reports_one_and_several_threads_side_by_side(tmp_path):
    out = tmp_path / "threads.json"
    rows = threads.main(["--quick", "--repeats", "1", "--families", "beta_vae", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    (row,) = rows
    assert row["family"] == "beta_vae" and row["shape"] == [13, 32, 32]
    assert row["one_thread_step_s"] > 0 and row["n_threads_step_s"] > 0
    assert row["speedup"] == row["one_thread_step_s"] / row["n_threads_step_s"]


def test_latent_cache_reports_encoding_and_cached_steps_side_by_side(tmp_path):
    out = tmp_path / "latent_cache.json"
    rows = latent_cache.main(["--quick", "--repeats", "1", "--modes", "non-DP", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    (row,) = rows
    assert row["dp"] is False and row["shape"] == [13, 32, 32] and row["threads"] == 1
    assert row["encode_step_s"] > 0 and row["cached_step_s"] > 0
    assert row["speedup"] == row["encode_step_s"] / row["cached_step_s"]


def test_eval_intervals_reports_both_ways_of_bootstrapping_and_checks_they_agree(tmp_path):
    out = tmp_path / "eval_intervals.json"
    rows = eval_intervals.main(["--quick", "--sizes", "40", "150", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [r["n"] for r in rows] == [40, 150]
    for r in rows:   # measure() raises if the two ways' intervals or distances differ
        assert r["control_per_resample_s"] > 0 and r["control_batched_s"] > 0
        assert r["control_speedup"] == r["control_per_resample_s"] / r["control_batched_s"]
