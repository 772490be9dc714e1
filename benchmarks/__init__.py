"""Benchmarks: ratios measured side by side in one run (README, "Performance")."""
import json
from pathlib import Path


def write_json(path, result) -> None:
    """Write a benchmark's rows (its `--json FILE`), when a path was given."""
    if path:
        Path(path).write_text(json.dumps(result, indent=2))
