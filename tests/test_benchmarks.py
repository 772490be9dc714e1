"""Smoke tests of the benchmarks: they run and report the right fields. No timing is
asserted; the one figure checked is a ratio measured within the run (memory flat in the
logical batch), which does not depend on the machine."""
import json

import pytest

from benchmarks import memory, scaling
from orchestrator.config import StageConfig


def test_memory_is_flat_in_logical_batch(tmp_path):
    out = tmp_path / "memory.json"
    memory.main(["--sizes", "16", "64", "--physical", "8", "--steps", "1", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["logical_batch"] for r in rows] == [16, 64]
    for r in rows:
        assert {"logical_batch", "physical_batch", "peak_mb", "peak_vs_smallest"} <= set(r)
        assert r["physical_batch"] == 8 and r["peak_mb"] > 0
    assert rows[0]["peak_vs_smallest"] == 1.0
    # 4x the logical batch, same physical batch: memory must not follow the logical batch
    assert rows[-1]["peak_mb"] <= 1.5 * rows[0]["peak_mb"]


def test_scaling_help_and_stage_is_valid(capsys):
    with pytest.raises(SystemExit) as exc:
        scaling.main(["--help"])
    assert exc.value.code == 0 and "--quick" in capsys.readouterr().out
    # what the benchmark hands train_worker must be a valid stage (checked without Ray)
    for dp in (False, True):
        stage = StageConfig.model_validate({**scaling.stage_dict(dp, epochs=2, batch=16), "name": "s"})
        assert stage.dp.enabled is dp and stage.train.epochs == 2
    assert {"cores", "cpu", "torch", "gpus"} <= set(scaling.machine())
