"""The cluster recipes in cluster/, each checked as far as one machine allows.

- ray-up.yaml: against Ray's own schema (ray/autoscaler/ray-schema.json in the installed ray),
  as written and after Ray's `prepare_config` (what `ray up` does first).
- kuberay-rayjob.yaml, kuberay-raycluster.yaml: the RayJob/RayCluster objects against a JSON
  schema written from KubeRay's ray.io/v1 Go types (tests/fixtures/cluster_schemas/); every
  pod template and the ConfigMap against the `kubernetes` client's API models, unknown keys
  being errors; the cluster spec through Ray's KubeRay autoscaler config reader; the sweep
  file in the ConfigMap against the orchestrator's schema. The Dockerfile's COPY sources exist.
- mlflow-server.sh: started on a free loopback port; a run, a metric and an artifact go
  through MlflowClient over HTTP and come back; the server's process group is stopped.
- ray_slurm.sh / slurm.sbatch: the srun command lines (a fake srun on PATH); then two Ray
  "nodes" on this machine (a head and a worker joining it with --address, distinct ports,
  one temp dir), a task pinned to each node, and teardown leaving none of our processes.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import free_ports

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SCHEMAS = Path(__file__).resolve().parent / "fixtures" / "cluster_schemas"


# --- helpers ------------------------------------------------------------------------------
def leftovers(marker: str, sessions=()) -> dict[int, str]:
    """Our processes still running: those whose command line holds `marker` (a unique temp
    dir of ours), and every process in their sessions or in `sessions` (the sessions our
    `setsid` launchers led: Ray's workers rename themselves, their command lines do not show
    the marker). Never this test process's own session."""
    procs = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state, _ppid, _pgrp, session = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue
        if state != "Z":
            procs.append((int(proc.name), cmd, int(session)))
    sessions = {int(s) for s in sessions} | {sid for _, cmd, sid in procs if marker in cmd}
    sessions.discard(os.getsid(0))
    return {pid: cmd for pid, cmd, sid in procs
            if pid != os.getpid() and (marker in cmd or sid in sessions)}


def settled_leftovers(marker: str, sessions=(), grace_s: float = 20.0) -> dict[int, str]:
    """`leftovers`, after giving Ray's helpers (e.g. the dashboard's multiprocessing
    forkserver, which exits when it notices its parent is gone) a moment to exit."""
    deadline = time.monotonic() + grace_s
    left = leftovers(marker, sessions)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = leftovers(marker, sessions)
    return left


def kill_pids(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def kill_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop the process group of a child started with start_new_session=True."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; wait for the rest of the group
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def load_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


# --- ray up --------------------------------------------------------------------------------
def _ray_schema():
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_ray_up_config_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    schema = _ray_schema()
    jsonschema.validate(raw, schema)                 # the file as written
    prepared = prepare_config(copy.deepcopy(raw))    # what `ray up` does first (local provider)
    validate_config(prepared)                        # Ray's own check of the result
    assert raw["provider"]["type"] == "local"
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["min_workers"] == node_type["max_workers"] == len(raw["provider"]["worker_ips"])
    # the project is installed on every node, torch pinned first
    setup = " ".join(raw["setup_commands"])
    assert setup.index("torch==2.13.0") < setup.index("pip install -q -e ~/dp-orchestrator")
    assert "--dashboard-host=127.0.0.1" in " ".join(raw["head_start_ray_commands"])
    # the schema has teeth: a misspelt key is refused
    bad = copy.deepcopy(raw)
    bad["setup_command"] = bad.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):
        jsonschema.validate(bad, schema)


# --- KubeRay -------------------------------------------------------------------------------
def _kuberay_schema():
    return json.loads((SCHEMAS / "kuberay_ray.io_v1.schema.json").read_text())


def _ray_objects():
    """(file, object) for every ray.io object in the KubeRay manifests."""
    out = []
    for name in ("kuberay-rayjob.yaml", "kuberay-raycluster.yaml"):
        out += [(name, d) for d in load_docs(name) if d.get("apiVersion") == "ray.io/v1"]
    return out


def _cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def test_kuberay_manifests_match_kuberay_types():
    jsonschema = pytest.importorskip("jsonschema")
    schema = _kuberay_schema()
    objs = _ray_objects()
    assert sorted(o["kind"] for _, o in objs) == ["RayCluster", "RayJob"]
    for name, obj in objs:
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=str)
        assert not errors, f"{name}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors)
        spec = _cluster_spec(obj)
        workers = spec["workerGroupSpecs"]
        assert workers and all(w["minReplicas"] <= w.get("replicas", w["minReplicas"]) <= w["maxReplicas"]
                               for w in workers), name
        gpu_limits = [w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
                      for w in workers]
        assert all(int(g) >= 1 for g in gpu_limits), f"{name}: a GPU worker group is expected"
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert any(e["name"] == "MLFLOW_TRACKING_URI" for e in head.get("env", [])), name
        images = {c["image"] for g in [spec["headGroupSpec"], *workers] for c in g["template"]["spec"]["containers"]}
        assert len(images) == 1, f"{name}: one image for every pod, got {images}"
    job = next(o for _, o in objs if o["kind"] == "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] >= 0
    assert "python -m orchestrator.launch" in job["spec"]["entrypoint"]
    assert isinstance(yaml.safe_load(job["spec"]["runtimeEnvYAML"]), dict)

    # the schema has teeth
    for mutate, expect in [
        (lambda s: s["workerGroupSpecs"][0].__setitem__("replica", 2), "replica"),
        (lambda s: s["workerGroupSpecs"][0].pop("groupName"), "groupName"),
        (lambda s: s["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0), "not of type 'string'"),
        (lambda s: s.__setitem__("workerGroupSpec", []), "workerGroupSpec"),
    ]:
        bad = copy.deepcopy(job)
        mutate(_cluster_spec(bad))
        messages = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(bad)]
        assert any(expect in m for m in messages), (expect, messages)
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = True
    assert not jsonschema.Draft7Validator(schema).is_valid(bad)


_QUANTITY_KEYS = {"limits", "requests", "sizeLimit"}


def _k8s_errors(value, typ: str, path: str, quantity: bool = False) -> list[str]:
    """Check `value` (parsed YAML) against a kubernetes client model type, recursively.

    Uses the models' `openapi_types` / `attribute_map` (present in both the legacy and the
    pydantic generations of the client): a key that is not a field of the model is an error,
    and so is a missing required field (where the model says which are required)."""
    import kubernetes.client as kc

    m = re.fullmatch(r"(?:List\[|list\[)(.*)\]", typ)
    if m:
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, v in enumerate(value) for e in _k8s_errors(v, m.group(1), f"{path}[{i}]", quantity)]
    m = re.fullmatch(r"(?:Dict\[|dict\()[^,]+, (.*)[\])]", typ)
    if m:
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        return [e for k, v in value.items() for e in _k8s_errors(v, m.group(1), f"{path}.{k}", quantity)]
    if typ == "str":
        ok = isinstance(value, str) or (quantity and isinstance(value, (int, float)) and not isinstance(value, bool))
        return [] if ok else [f"{path}: expected a string, got {value!r}"]
    if typ == "int":
        return [] if isinstance(value, int) and not isinstance(value, bool) else [f"{path}: expected an integer"]
    if typ == "bool":
        return [] if isinstance(value, bool) else [f"{path}: expected true/false"]
    if typ == "float":
        return [] if isinstance(value, (int, float)) and not isinstance(value, bool) else [f"{path}: expected a number"]
    if typ in ("object", "datetime", "date", "bytes"):
        return []
    klass = getattr(kc, typ)
    if not isinstance(value, dict):
        return [f"{path}: expected a {typ} mapping"]
    by_json = {j: a for a, j in klass.attribute_map.items()}
    errors = []
    for key, v in value.items():
        if key not in by_json:
            errors.append(f"{path}.{key}: not a field of {typ}")
            continue
        errors += _k8s_errors(v, klass.openapi_types[by_json[key]], f"{path}.{key}", key in _QUANTITY_KEYS)
    fields = getattr(klass, "model_fields", None)     # pydantic generation: knows what is required
    if fields:
        for attr, info in fields.items():
            if info.is_required() and klass.attribute_map[attr] not in value:
                errors.append(f"{path}: {typ} requires `{klass.attribute_map[attr]}`")
    return errors


def _pod_templates(obj: dict):
    spec = _cluster_spec(obj)
    yield "headGroupSpec.template", spec["headGroupSpec"]["template"]
    for i, w in enumerate(spec["workerGroupSpecs"]):
        yield f"workerGroupSpecs[{i}].template", w["template"]


def test_kuberay_pod_templates_match_kubernetes_models():
    pytest.importorskip("kubernetes", reason="pip install kubernetes: the Kubernetes API models")
    for name, obj in _ray_objects():
        errors = _k8s_errors(obj["metadata"], "V1ObjectMeta", f"{name}:metadata")
        for where, template in _pod_templates(obj):
            errors += _k8s_errors(template, "V1PodTemplateSpec", f"{name}:{where}")
            pod = template["spec"]
            volumes = {v["name"] for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                missing = {m["name"] for m in c.get("volumeMounts", [])} - volumes
                assert not missing, f"{name}:{where}: mounts of undeclared volumes {missing}"
                assert any(m["mountPath"] == "/mnt/shared" for m in c.get("volumeMounts", [])), \
                    f"{name}:{where}: every pod mounts the shared volume"
        assert not errors, "\n".join(errors)
    for name in ("kuberay-rayjob.yaml",):
        for doc in load_docs(name):
            if doc["kind"] == "ConfigMap":
                assert not _k8s_errors(doc, "V1ConfigMap", f"{name}:ConfigMap")
    # the check has teeth
    _, job = _ray_objects()[0]
    bad = copy.deepcopy(next(t for _, t in _pod_templates(job)))
    bad["spec"]["containers"][0]["volumeMount"] = bad["spec"]["containers"][0].pop("volumeMounts")
    bad["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}
    bad["spec"]["containers"].append({"image": "x"})
    errors = "\n".join(_k8s_errors(bad, "V1PodTemplateSpec", "bad"))
    assert "volumeMount: not a field of V1Container" in errors
    assert "limit: not a field of V1ResourceRequirements" in errors
    import kubernetes.client as kc
    if getattr(kc.V1Container, "model_fields", None):
        assert "V1Container requires `name`" in errors


def test_kuberay_cluster_specs_read_by_rays_kuberay_autoscaler():
    """Ray's autoscaler derives its node types from a RayCluster spec: the resources it sees."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    for name, obj in _ray_objects():
        cr = {"metadata": {"name": obj["metadata"]["name"], "namespace": "default"}, "spec": _cluster_spec(obj)}
        config = _derive_autoscaling_config_from_ray_cr(cr)    # runs Ray's validate_config too
        types = config["available_node_types"]
        assert types["headgroup"]["resources"]["CPU"] == 0, f"{name}: the head keeps no CPU for trials"
        assert types["gpu"]["resources"]["GPU"] == 1 and types["gpu"]["resources"]["CPU"] >= 1, name


def test_kuberay_sweep_configmap_is_a_valid_sweep(tmp_path):
    from orchestrator.sweep_file import load_sweep

    docs = load_docs("kuberay-rayjob.yaml")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    job = next(d for d in docs if d["kind"] == "RayJob")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(cm["data"]["sweep.yaml"])
    cfg = load_sweep(sweep)
    assert cfg.cluster.address == "auto" and cfg.cluster.use_gpu is True
    assert str(cfg.output).startswith("/mnt/shared/") and cfg.data.root.startswith("/mnt/shared/")
    # the entrypoint reads the file where the head mounts the ConfigMap
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    vol = next(v["name"] for v in head["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"])
    mount = next(m["mountPath"] for m in head["containers"][0]["volumeMounts"] if m["name"] == vol)
    assert f"{mount}/sweep.yaml" in job["spec"]["entrypoint"]
    assert "/app/cluster/sweep_with_tracking.py" in job["spec"]["entrypoint"]


def test_dockerfile_installs_torch_first_and_copies_existing_paths():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    runs = [line for line in text.splitlines() if line.startswith("RUN pip install")]
    assert "TORCH_SPEC" in runs[0] and runs[-1].endswith("pip install --no-cache-dir .")
    assert "ARG TORCH_SPEC=torch==2.13.0" in text
    ray_version = re.search(r"ARG RAY_VERSION=(\S+)", text).group(1)
    for _, obj in _ray_objects():
        assert _cluster_spec(obj)["rayVersion"] == ray_version
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    assert "wget" in text          # KubeRay's default probes run wget


# --- sweep_with_tracking.py ------------------------------------------------------------------
def test_sweep_with_tracking_sets_the_uri_from_the_environment(tmp_path):
    src = tmp_path / "in.yaml"
    src.write_text("name: x\noutput: runs/x\ntracking: {uri: null}\nstages: []\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    out = subprocess.run([sys.executable, str(CLUSTER / "sweep_with_tracking.py"), str(src), str(tmp_path / "o.yaml")],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / "o.yaml")
    got = yaml.safe_load((tmp_path / "o.yaml").read_text())
    assert got == {"name": "x", "output": "runs/x", "tracking": {"uri": "http://127.0.0.1:5000"}, "stages": []}
    env.pop("MLFLOW_TRACKING_URI")
    subprocess.run([sys.executable, str(CLUSTER / "sweep_with_tracking.py"), str(src), str(tmp_path / "p.yaml")],
                   env=env, check=True, capture_output=True)
    assert yaml.safe_load((tmp_path / "p.yaml").read_text())["tracking"] == {"uri": None}


# --- mlflow-server.sh ------------------------------------------------------------------------
def test_mlflow_server_script_arguments_and_warning(tmp_path):
    """The command line it builds, with a stand-in `mlflow` (nothing listens)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mlflow").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_ARGS"\n')
    (bin_dir / "mlflow").chmod(0o755)
    base = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_ARGS": str(tmp_path / "args"),
            "MLFLOW_DIR": str(tmp_path / "m")}
    for key in ("MLFLOW_HOST", "MLFLOW_PORT", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION",
                "MLFLOW_ALLOWED_HOSTS"):
        base.pop(key, None)
    out = subprocess.run(["bash", str(CLUSTER / "mlflow-server.sh")], env=base, capture_output=True, text=True,
                         check=True)
    args = (tmp_path / "args").read_text().split("\n")
    assert args[:3] == ["server", "--backend-store-uri", f"sqlite:///{tmp_path}/m/mlflow.db"]
    assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--port") + 1] == "5000"
    assert "--serve-artifacts" in args and args[args.index("--artifacts-destination") + 1] == f"{tmp_path}/m/artifacts"
    assert "  tracking: {uri: http://127.0.0.1:5000}" in out.stdout.splitlines()
    assert "warning" not in out.stderr
    out = subprocess.run(["bash", str(CLUSTER / "mlflow-server.sh")], capture_output=True, text=True, check=True,
                         env={**base, "MLFLOW_HOST": "0.0.0.0", "MLFLOW_ALLOWED_HOSTS": "mlflow.internal:5000",
                              "MLFLOW_BACKEND_STORE_URI": "postgresql://u:secret@db/mlflow"})
    assert "warning: MLflow listens on 0.0.0.0:5000" in out.stderr
    assert "secret" not in out.stdout and "postgresql://u:***@db/mlflow" in out.stdout
    args = (tmp_path / "args").read_text().split("\n")
    assert args[args.index("--allowed-hosts") + 1] == "mlflow.internal:5000"


def _fake_bin(tmp_path: Path, ray_body: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scripts = {
        # srun: log the call, drop srun's own options (through `-w NODE`), run the rest here
        "srun": 'echo "srun $*" >> "$FAKE_LOG"\nwhile [[ $# -gt 0 && "$1" != -w ]]; do shift; done\nshift 2\n'
                'exec "$@"\n',
        "scontrol": '[[ "$1 $2 $3" == "show hostnames n[0-1]" ]] && printf "n0\\nn1\\n"\n',
        "hostname": 'echo "10.1.2.3 10.9.9.9"\n',
        "ray": 'echo "ray $*" >> "$FAKE_LOG"\n' + ray_body,
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _slurm_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_"))}
    env.update(RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def test_ray_slurm_srun_command_lines(tmp_path):
    bin_dir = _fake_bin(tmp_path, "exec sleep 60\n")
    env = _slurm_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "calls"),
                     SLURM_JOB_NODELIST="n[0-1]", SLURM_CPUS_PER_TASK="16", SLURM_GPUS_PER_TASK="a100:4",
                     RAY_TEMP_DIR=str(tmp_path / "r"))
    script = """
    set -u
    source cluster/ray_slurm.sh
    read -r -a nodes <<<"$(ray_slurm_nodes)"
    echo "NODES ${nodes[*]}"
    start_head "${nodes[0]}"
    start_worker "${nodes[1]}"
    echo "PIDS ${RAY_SLURM_PIDS[*]}"
    for _ in $(seq 50); do [[ $(grep -c '^ray ' "$FAKE_LOG") == 2 ]] && break; sleep 0.1; done
    echo "ADDRESS $RAY_HEAD_ADDRESS"
    RAY_STOP_TIMEOUT=10 stop_all
    """
    out = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.split(" ", 1)[0].isupper())
    assert lines["NODES"] == "n0 n1" and lines["ADDRESS"] == "10.1.2.3:6379"
    calls = (tmp_path / "calls").read_text().splitlines()
    r = tmp_path / "r"
    assert "srun --nodes=1 --ntasks=1 -w n0 hostname --ip-address" in calls
    assert (f"srun --nodes=1 --ntasks=1 -w n0 ray start --head --block --node-ip-address=10.1.2.3 --port=6379 "
            f"--num-cpus=16 --num-gpus=4 --temp-dir={r} --dashboard-host=127.0.0.1 --dashboard-port=8265 "
            f"--ray-client-server-port=10001") in calls
    assert (f"srun --nodes=1 --ntasks=1 -w n1 ray start --address=10.1.2.3:6379 --block --num-cpus=16 "
            f"--num-gpus=4 --temp-dir={r}") in calls
    for pid in map(int, lines["PIDS"].split()):       # stop_all ended both launchers
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_ray_slurm_wait_for_nodes_fails_fast_when_a_launcher_dies(tmp_path):
    bin_dir = _fake_bin(tmp_path, "exit 1\n")          # `ray start` fails at once
    port = free_ports(1)[0]                            # nothing listens there
    env = _slurm_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "calls"),
                     RAY_SLURM_NODES="n0 n1", RAY_HEAD_IP="127.0.0.1", RAY_PORT=str(port),
                     RAY_TEMP_DIR=str(tmp_path / "r"))
    script = 'source cluster/ray_slurm.sh; start_head n0; start_worker n1; wait_for_nodes 2 60; echo "RC $?"; stop_all'
    t0 = time.monotonic()
    out = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert "RC 1" in out.stdout, out.stdout + out.stderr
    assert "exited before the cluster was up" in out.stderr
    assert time.monotonic() - t0 < 30


def _two_node_env(marker: Path, ports: list[int], **extra) -> dict:
    token = marker / "token"
    token.write_text(os.urandom(32).hex())
    head_ports, worker_ports = ports[3:9], ports[9:15]
    flags = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
    return _slurm_env(
        RAY_SLURM_LAUNCH="ray_slurm_local_launch", RAY_SLURM_NODES="n0 n1",
        RAY_TEMP_DIR=str(marker), RAY_SLURM_LOG_DIR=str(marker / "logs"),
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
        RAY_NUM_CPUS="1", RAY_NUM_GPUS="0",
        RAY_PORT=str(ports[0]), RAY_DASHBOARD_PORT=str(ports[1]), RAY_CLIENT_PORT=str(ports[2]),
        RAY_HEAD_ARGS=" ".join(f"{f}={p}" for f, p in zip(flags, head_ports)) + " --include-log-monitor=false",
        RAY_WORKER_ARGS=" ".join(f"{f}={p}" for f, p in zip(flags, worker_ports)) + " --include-log-monitor=false",
        RAY_STOP_TIMEOUT="40", **extra)


TASKS_PY = """
import json, os, sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
nodes = [n for n in ray.nodes() if n["Alive"]]

@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id(), os.getpid()

refs = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in nodes]
ran = ray.get(refs, timeout=60)
print("TASKS " + json.dumps({"nodes": [n["NodeID"] for n in nodes], "ran_on": [r[0] for r in ran],
                             "ports": [n["NodeManagerPort"] for n in nodes]}), flush=True)
"""


@pytest.mark.heavy
def test_ray_slurm_two_nodes_on_one_machine(tmp_path):
    # short: Ray's Unix socket paths live under the temp dir (108-byte limit)
    marker = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    ports = free_ports(15)
    env = _two_node_env(marker, ports)
    (tmp_path / "tasks.py").write_text(TASKS_PY)
    script = f"""
    set -u
    source cluster/ray_slurm.sh
    read -r -a nodes <<<"$(ray_slurm_nodes)"
    start_head "${{nodes[0]}}"
    start_worker "${{nodes[1]}}"
    echo "LAUNCHERS ${{RAY_SLURM_PIDS[*]}}"
    if wait_for_nodes 2 75; then
        echo "ADDRESS $RAY_HEAD_ADDRESS"
        python {tmp_path / 'tasks.py'} "$RAY_HEAD_ADDRESS"
        ps -eo pid=,args= | grep -F "$RAY_TEMP_DIR" | grep -v grep | sed 's/^ */RUNNING /'
    fi
    stop_all
    """
    t0 = time.monotonic()
    out = ""
    proc = subprocess.Popen(["bash", "-c", script], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=170)
    finally:
        kill_group(proc, grace_s=5)
        launchers = re.search(r"^LAUNCHERS (.*)$", out, re.M)
        left = settled_leftovers(str(marker), launchers.group(1).split() if launchers else ())
        kill_pids(left)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in (marker / "logs").glob("*.log"))
        shutil.rmtree(marker, ignore_errors=True)
    elapsed = time.monotonic() - t0
    assert "TASKS " in out, out + logs
    tasks = json.loads(out.split("TASKS ", 1)[1].splitlines()[0])
    assert len(tasks["nodes"]) == 2 and len(set(tasks["nodes"])) == 2, tasks
    assert tasks["ran_on"] == tasks["nodes"], "each task ran on the node it was pinned to"
    assert sorted(tasks["ports"]) == sorted([ports[3], ports[9]]), "the nodes are our head and our worker"
    running = [line for line in out.splitlines() if line.startswith("RUNNING ")]
    assert sum("gcs_server" in line for line in running) == 1
    assert sum("/raylet/raylet" in line for line in running) == 2
    assert not left, f"left running after stop_all: {left}"
    assert re.search(rf"^ADDRESS \S+:{ports[0]}$", out, re.M), out
    print(f"two-node cluster up, tasks run and stopped in {elapsed:.0f} s")


@pytest.mark.heavy
def test_slurm_sbatch_runs_the_launch_against_the_cluster(tmp_path):
    """The batch script itself, its srun replaced by local processes: Ray comes up on two
    "nodes", the launch joins it at the head's address (its sweep asks for a GPU, so it stops
    with exit 2 right after joining), the exit code comes back, and Ray is torn down."""
    marker = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    ports = free_ports(15)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "sbatch-check", "output": str(tmp_path / "out"),
        "data": {"root": str(tmp_path / "data"), "shape": [13, 16, 16],
                 "labels": ["LVEDV", "LVESV", "LVEF", "MYOEDTHICK", "MYOESTHICK", "ESED"],
                 "synthesize": {"kind": "phantom", "n": 40, "seed": 0}},
        "privacy": {"delta": 1.0e-3},
        "cluster": {"workers_per_trial": 1, "use_gpu": True},
        "stages": [{"name": "ae", "model": {"kind": "beta_vae", "channels": [8, 16], "norm_num_groups": 4},
                    "train": {"epochs": 1, "batch_size": 8, "physical_batch_size": 8},
                    "dp": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0}}],
    }))
    env = _two_node_env(marker, ports, SWEEP=str(sweep), JOIN_TIMEOUT="75")
    t0 = time.monotonic()
    proc = subprocess.Popen(["bash", str(CLUSTER / "slurm.sbatch"), "--output", str(tmp_path / "out2")], cwd=REPO,
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=170)
    finally:
        kill_group(proc, grace_s=5)
        left = settled_leftovers(str(marker))
        kill_pids(left)
        shutil.rmtree(marker, ignore_errors=True)
    elapsed = time.monotonic() - t0
    print(out[-3000:])
    assert proc.returncode == 2, out
    address = re.search(r"head on n0 at (\S+)", out).group(1)
    assert address.endswith(f":{ports[0]}")
    assert f"--address {address} --output {tmp_path / 'out2'}" in out
    assert f"joined Ray cluster at {address}" in out, out
    assert "error: cluster.use_gpu" in out
    assert "ray_slurm: stopping Ray (2 launchers)" in out
    assert not left, f"left running after the batch script: {left}"
    print(f"sbatch: cluster up, launch joined and stopped in {elapsed:.0f} s")
