#!/usr/bin/env bash
# The main job: the quickstart study on the embedded default (digits), or, until the study layer exists,
# the default digits teacher.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
if abd-ray study --help >/dev/null 2>&1; then
  exec abd-ray study studies/quickstart.yaml "$@"
fi
exec abd-ray teacher --dataset digits --attack badnet_grid "$@"
