#!/usr/bin/env bash
# Creates .venv (if needed) and installs veil with its test dependencies.
# torch==2.13.0 (CPU) goes in first: any other torch spec would pull GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
# Headless Chromium for the owner-console browser tests (tests/governance/test_console_browser.py).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
    (apt-get install -y -q chromium >/dev/null 2>&1 \
        || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
        || echo "setup: could not install chromium; the console browser tests will be skipped" >&2
fi
PY="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.veil-installed"
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[test]"
echo "$WANT" > "$STAMP"
