#!/usr/bin/env bash
# What the browser tests (tests/test_browser.py, marker `browser`) need: Chromium, from Debian, and the
# playwright package, which drives it. Idempotent: installs only what is missing. Playwright's own
# browser download (`playwright install`) is never used: the tests launch the system's Chromium.
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1; then
    sudo=; [ "$(id -u)" -eq 0 ] || sudo=sudo
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    # a font, so that pages lay out text as they would for a reader
    $sudo apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
chromium --version 2>/dev/null | head -n 1

# playwright goes into the active virtual environment; without one it comes later with the dev extra
# (pip install -e ".[dev]"), and the system's Python is left alone
py=$(command -v python || command -v python3)
if "$py" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
    "$py" -c "import playwright" 2>/dev/null || "$py" -m pip install -q playwright
    "$py" -c "from importlib.metadata import version; print('playwright', version('playwright'))"
else
    echo "no virtual environment active: playwright is not installed here (it is in the dev extra)"
fi
