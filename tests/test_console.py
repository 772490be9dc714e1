"""The console of a healthy launch is read by a person: the README's demo in smoke-test mode
prints its plan, one progress line per trial per epoch, one line per finished trial, then
the summary and the report, and nothing twice, nothing at error level, no Ray/Tune tables."""
import re
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import launch

pytestmark = pytest.mark.heavy

DEMO = Path(__file__).resolve().parents[1] / "sweeps" / "demo.yaml"
ERROR_LEVEL = re.compile(r"(^|\s)E \d{4}|\bERROR\b|Traceback|core_worker\.cc|UserWarning|Error:", re.M)
NOISE = ("Trial status:", "Current best trial", "Checkpoint successfully created", "Reporting training result",
         "TensorBoard", "View detailed results", "Configuration for experiment", "(RayTrainWorker", "(TrainController")


def test_demo_smoke_console_is_short_and_says_each_thing_once(tmp_path):
    proc = launch(tmp_path, DEMO, "--smoke-test", "--output", "runs/smoke")
    out, err = proc.stdout, proc.stderr
    lines = out.splitlines()
    assert not ERROR_LEVEL.search(out) and not ERROR_LEVEL.search(err), out + err
    assert not [ln for ln in lines if any(n in ln for n in NOISE)]

    epochs = [ln for ln in lines if re.match(r"\[ae_(non)?dp [^\]]*\] epoch 1/1 ", ln)]
    done = [ln for ln in lines if re.match(r"\[ae_(non)?dp [^\]]*\] done: ", ln)]
    assert len(epochs) == len(set(epochs)) == 6          # 4 DP + 2 non-DP trials, one epoch each
    assert len(done) == len(set(done)) == 6
    assert all("eps=" in ln for ln in epochs if ln.startswith("[ae_dp "))
    # trials are named by what differs: the searched values
    assert {re.match(r"\[([^\]]*)\]", ln).group(1) for ln in done} == {
        "ae_dp sigma=0.8 latent=2", "ae_dp sigma=0.8 latent=4", "ae_dp sigma=1.5 latent=2",
        "ae_dp sigma=1.5 latent=4", "ae_nondp latent=2", "ae_nondp latent=4"}

    # what it will do comes first, the summary and the report last
    first = lambda text: next(i for i, ln in enumerate(lines) if text in ln)  # noqa: E731
    assert first("plan: ae_dp (4 trials") < first("placement:") + 3
    assert "Ray dashboard: http://127.0.0.1:" in out and "worker logs" in out
    summary = first("summary")
    assert max(lines.index(ln) for ln in epochs + done) < summary < first("report (python -m orchestrator.report")
    assert len(lines) <= 60, f"{len(lines)} lines:\n{out}"

    # a local launch's trials start no Ray Train helper actors a single machine never uses
    # (orchestrator/trial.py): the session's worker logs name every actor process started
    logs = Path(re.search(r"worker logs \(every trial's own output\): (\S+);", out).group(1))
    names = Counter(m for f in logs.glob("worker-*.out")
                    for m in re.findall(r"^:actor_name:(\w+)", f.read_text(errors="replace"), re.M))
    assert names["RayTrainWorker"] == 6 and names["TrainController"] == 6, names
    assert names["DatasetManager"] == 0 and names["PlacementGroupCleaner"] == 0, names
