#!/usr/bin/env bash
# Creates .venv (if needed) and installs veil with its test dependencies.
# torch==2.13.0 (CPU) goes in first: any other torch spec would pull GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
# PostgreSQL server binaries (Debian's package): tests/scale starts a throwaway server with initdb/pg_ctl.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "setup.sh: PostgreSQL binaries missing (apt-get install postgresql); tests/scale will fail" >&2
    fi
fi
# Headless Chromium for the owner-console browser tests (tests/governance/test_console_browser.py).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
        || (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1)) \
        || echo "setup: could not install chromium; the console browser tests will be skipped" >&2
fi
PY="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.veil-installed"
WANT="$(cat pyproject.toml scripts/setup.sh scripts/setup_r.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[test]"
# R and reticulate for the R walkthrough (Debian packages; root only, skipped when present)
bash scripts/setup_r.sh "$PWD/$VENV/bin/python"
echo "$WANT" > "$STAMP"
