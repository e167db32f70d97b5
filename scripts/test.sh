#!/usr/bin/env bash
# The whole test suite (fault-injection tests included). CI runs exactly this.
# Two workers: most long tests wait on subprocesses, sleeps and one-CPU trials, so a second worker fills the idle
# core (pass -n 0 to run in one process). One test at a time to a free worker (--maxschedchunk 1): the slow tests
# come first (tests/conftest.py), and xdist's default chunks would hand them all to the first worker.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python -m pytest -q -p no:cacheprovider -n 2 --maxschedchunk 1 "$@"
