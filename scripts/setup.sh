#!/usr/bin/env bash
# Creates .venv if missing and installs abd-ray (with its test and dashboard extras) into it; re-installs when
# pyproject.toml changes. Sourced by the two commands of the README.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "abd-ray: creating .venv with $($py --version)" >&2
  "$py" -m venv .venv
fi
stamp=".venv/.abd-ray-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "abd-ray: installing into .venv (first time: about 5 minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # torch/torchvision first, pinned to the releases this machine holds locally (a range that PyPI's CPU or CUDA
  # builds also satisfy elsewhere)
  .venv/bin/python -m pip install -q "torch>=2.9,<=2.14.1" "torchvision>=0.24,<=0.29.1"
  .venv/bin/python -m pip install -q -e ".[test,dashboard]"
  echo "$want" > "$stamp"
fi
export RAY_USAGE_STATS_ENABLED=0
export MLFLOW_DISABLE_TELEMETRY=true
export PATH="$root/.venv/bin:$PATH"
