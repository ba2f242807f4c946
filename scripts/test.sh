#!/usr/bin/env bash
# Sets up (if needed) and runs the whole test suite. Extra arguments go to pytest.
# Two pytest-xdist processes by default (VEIL_TEST_PROCESSES, 0 = one process): most long tests wait on
# worker subprocesses, so two keep a 2-core machine busy. --dist loadfile keeps a file's tests (and its
# module fixtures: clusters, servers) in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Every worker, CLI and example the tests start is a new Python process that imports veil (~250 modules).
# Where PYTHONDONTWRITEBYTECODE is set (as on the CI host) none of them writes bytecode, so each compiled
# veil from source again (~0.7 s of CPU a process): compile it once here. Python still checks each .pyc
# against its source's mtime and size, so an edited file is recompiled, never run stale.
.venv/bin/python -m compileall -q -j 0 veil examples tests >/dev/null || true  # pytest reports a broken file
# pytest itself caches the test modules it rewrites only where bytecode may be written: with the variable set,
# each xdist process rewrote every test file again (~10 s of CPU each). The caches are gitignored.
exec env -u PYTHONDONTWRITEBYTECODE .venv/bin/python -m pytest -n "${VEIL_TEST_PROCESSES:-2}" --dist loadfile "$@"
