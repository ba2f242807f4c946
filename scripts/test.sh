#!/usr/bin/env bash
# Sets up (if needed) and runs the whole test suite. Extra arguments go to pytest.
# Two pytest-xdist processes by default (VEIL_TEST_PROCESSES, 0 = one process): most long tests wait on
# worker subprocesses, so two keep a 2-core machine busy. --dist loadfile keeps a file's tests (and its
# module fixtures: clusters, servers) in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n "${VEIL_TEST_PROCESSES:-2}" --dist loadfile "$@"
