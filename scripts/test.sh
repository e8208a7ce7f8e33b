#!/usr/bin/env bash
# Install glmv with its test extras into ./.venv, then run every check CI runs:
# ruff, mypy, import-linter (dependency levels) and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

# torch pinned: 2.13.0 is the local CPU wheel; an unpinned torch would pull CUDA packages.
pip install --quiet --disable-pip-version-check torch==2.13.0
pip install --quiet --disable-pip-version-check -e ".[test]"
# transformers' video processors (reference only) import torchvision; no CPU build exists.
pip install --quiet --disable-pip-version-check --no-deps torchvision==0.28.0
python scripts/patch_torchvision.py
# System packages some tests drive: Debian's chromium for the chat page (Playwright cannot
# download browsers) and LibreOffice Impress for PPT/PPTX documents. Without them those tests
# skip and say why.
MISSING=""
command -v chromium >/dev/null 2>&1 || MISSING="$MISSING chromium"
command -v soffice >/dev/null 2>&1 || MISSING="$MISSING libreoffice-impress"
if [ -n "$MISSING" ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    # shellcheck disable=SC2086
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $MISSING >/dev/null \
        || echo "could not install$MISSING: their tests will be skipped" >&2
fi

ruff check glmv tests scripts bench
mypy
lint-imports
pytest -n 2 -q -p no:cacheprovider
