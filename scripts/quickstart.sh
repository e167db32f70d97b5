#!/usr/bin/env bash
# The main job: the quickstart study on the embedded default (digits / badnet_grid / zskt; undefended, the
# Shuffling Vaccine at its defaults and an Optuna search of its strength), then its report. Extra arguments go
# to `abd-ray study` (e.g. --smoke, --name).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec abd-ray study studies/quickstart.yaml "$@"
