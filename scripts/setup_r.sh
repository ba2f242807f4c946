#!/usr/bin/env bash
# R for the R walkthrough (examples/r, tests/serving/test_r_walkthrough.py), called by setup.sh.
# Installs Debian's r-base-core and r-cran-reticulate when Rscript is missing (root only,
# non-interactive). Debian 12's reticulate (1.28) cannot convert arrays with NumPy 2, which the
# venv has: then reticulate 1.41 is built from Debian's own source tarball (trixie) into
# /usr/local/lib/R/site-library, using an apt configuration of its own (the system's sources
# stay untouched). Set VEIL_SKIP_R=1 to skip; without R the R test is skipped with its reason.
set -euo pipefail
PYBIN="$1"
[[ "${VEIL_SKIP_R:-0}" == "1" ]] && exit 0
if ! command -v Rscript >/dev/null 2>&1; then
    if [[ "$(id -u)" != "0" ]] || ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: Rscript not found and cannot install it (needs root and apt-get); the R test will be skipped" >&2
        exit 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends r-base-core r-cran-reticulate r-cran-rlang >/dev/null
fi
# Does reticulate hand an R array to this Python's NumPy?
if RETICULATE_PYTHON="$PYBIN" Rscript -e 'invisible(reticulate::r_to_py(array(1, c(1, 1))))' >/dev/null 2>&1; then
    exit 0
fi
if [[ "$(id -u)" != "0" ]]; then
    echo "setup: reticulate cannot convert arrays with this NumPy and rebuilding it needs root" >&2
    exit 0
fi
if ! command -v g++ >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends g++ make >/dev/null
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/src"
# The system's own Debian mirror (its first main-archive URI), with the next release's suite.
mirror=$(grep -hE '^URIs:' /etc/apt/sources.list.d/debian.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n 1)
[[ -n "$mirror" ]] || mirror=$(grep -hoE '^deb [^ ]+' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | grep -v security | head -n 1)
[[ -n "$mirror" ]] || { echo "setup: no Debian mirror configured; the R test will be skipped" >&2; exit 0; }
echo "deb-src $mirror trixie main" > "$work/sources.list"
apt_own=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
         -o "Dir::State::Lists=$work/lists")
apt-get "${apt_own[@]}" update -q >/dev/null
(cd "$work/src" && apt-get "${apt_own[@]}" source --download-only r-cran-reticulate >/dev/null 2>&1 || true)
tarball="$(ls "$work"/src/r-cran-reticulate_*.orig.tar.* 2>/dev/null | head -1)"
if [[ -z "$tarball" ]]; then
    echo "setup: could not download reticulate's source from Debian; the R test will fail" >&2
    exit 0
fi
tar -C "$work/src" -xf "$tarball"
mkdir -p /usr/local/lib/R/site-library
MAKEFLAGS=-j2 R CMD INSTALL -l /usr/local/lib/R/site-library "$work/src/reticulate" >/dev/null
