#!/usr/bin/env bash
# Run the GPU benchmark on one CUDA device and write its section of docs/benchmarks.md.
#
# The run takes about 2 to 3 minutes on an H100-class GPU (an estimate: it has not been run there)
# and is stopped after 8 minutes. Arguments are passed on to benchmarks/gpu_bench.py, for example
# --dry-run to check the script on a machine without a GPU (which writes no report), or --report
# to write elsewhere.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
    PYTHON=python3
fi

report=(--report docs/benchmarks.md)
if [[ " $* " == *" --dry-run "* ]]; then
    # Dry-run numbers come from the CPU at tiny sizes and do not belong in the report.
    report=()
else
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "gpu.sh: nvidia-smi not found, so no NVIDIA driver is installed. Run on a machine" \
            "with a CUDA GPU, or pass --dry-run to check the script on the CPU." >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

exec timeout 480 "$PYTHON" benchmarks/gpu_bench.py "${report[@]}" "$@"
