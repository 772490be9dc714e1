"""Copy a sweep file, pointing `tracking.uri` at $MLFLOW_TRACKING_URI when that is set.

    python cluster/sweep_with_tracking.py SWEEP.yaml OUT.yaml [--uri URI]

The orchestrator reads the tracking URI from the sweep file only. The cluster recipes
(cluster/slurm.sbatch, cluster/kuberay-rayjob.yaml) take it from the environment instead, so
one sweep file serves every site: they run this first and launch OUT.yaml. Without a URI
(neither --uri nor MLFLOW_TRACKING_URI) the copy is unchanged. Relative paths in a sweep
file are relative to the working directory, not to the file, so the copy means the same.
Prints the file to launch.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep")
    p.add_argument("out")
    p.add_argument("--uri", default=os.environ.get("MLFLOW_TRACKING_URI") or None,
                   help="tracking URI (default: $MLFLOW_TRACKING_URI)")
    args = p.parse_args(argv)
    try:
        raw = yaml.safe_load(Path(args.sweep).read_text())
    except (OSError, yaml.YAMLError) as exc:
        print(f"error: {args.sweep}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(raw, dict):
        print(f"error: {args.sweep}: expected a mapping at the top level", file=sys.stderr)
        return 2
    if args.uri:
        tracking = raw.get("tracking") or {}
        if not isinstance(tracking, dict):
            print(f"error: {args.sweep}: tracking: expected a mapping", file=sys.stderr)
            return 2
        tracking["uri"] = args.uri
        raw["tracking"] = tracking
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
