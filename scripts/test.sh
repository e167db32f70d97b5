#!/usr/bin/env bash
# The whole test suite (fault-injection tests included). CI runs exactly this.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python -m pytest -q -p no:cacheprovider "$@"
