#!/usr/bin/env bash
# Sets up (if needed) and runs the main demo on the bundled data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m veil.cli demo "$@"
