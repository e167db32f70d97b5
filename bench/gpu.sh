#!/usr/bin/env bash
# GPU benchmark: <= 8 minutes on one H100/H200. Writes bench/results/gpu.json and gpu.md and prints a
# short table last. Usage: bench/gpu.sh [--no-compile] [--ks 1,2,4,8,16]     CPU smoke check: bench/gpu.sh --cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
# The digits teacher the sharing part distils from: trained once (seconds on a GPU) before anything is timed.
"$PY" -m abd_ray.cli teacher --dataset digits --attack badnet_grid --json > /dev/null
exec timeout 450 "$PY" bench/run.py gpu "$@"
