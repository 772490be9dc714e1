#!/usr/bin/env bash
# The DP-overhead benchmark on CUDA, for the day a GPU machine is available (at most 5 minutes).
#
#     bash benchmarks/gpu.sh [OUT_DIR]
#
# Same families, modes and side-by-side protocol as `python -m benchmarks.dp_overhead` (see its
# docstring), on the GPU, in fp32 and with the forward under bf16 autocast (both sides alike),
# at the benchmark size and at the paper's 13 x 96 x 96. Writes OUT_DIR/gpu_{fp32,bf16}.json
# and the logs; prints the tables. Exits 0 without doing anything when no GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device visible: nothing to measure (the CPU numbers come from python -m benchmarks.dp_overhead)"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Each run has its own time limit so the whole script stays under 5 minutes (GPU steps take
# milliseconds; most of the time is process start-up, one fresh process per configuration).
run() {  # name, extra args...
    local name=$1; shift
    timeout 140 "$PY" -m benchmarks.dp_overhead --device cuda --threads 4 --repeats 10 --reference on \
        --reference-batch 8 --reference-modes hooks bk --json "$OUT/gpu_$name.json" "$@" 2>&1 | tee "$OUT/gpu_$name.log" \
        || echo "gpu.sh: the $name run stopped early (time limit or error); see $OUT/gpu_$name.log"
}
run fp32
run bf16 --bf16 --modes functorch hooks bk
