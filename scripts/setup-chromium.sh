#!/usr/bin/env bash
# Installs Debian's chromium (headless browser for the report test) when it is missing.
# Reuses what is there; says clearly what is wrong when apt cannot be used.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-chromium: chromium is not installed and apt-get is not available;" >&2
    echo "  install Debian's 'chromium' package (or set QUAD_CHROMIUM to a Chromium binary)" >&2
    echo "  to run the report rendering test (tests/report.rs)." >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "setup-chromium: chromium is not installed and this user cannot run apt-get (not root, no sudo);" >&2
        echo "  install Debian's 'chromium' package to run the report rendering test." >&2
        exit 1
    fi
fi
echo "setup-chromium: installing Debian's chromium package" >&2
if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null; then
    echo "setup-chromium: apt-get install failed; trying once more after apt-get update" >&2
    $SUDO apt-get update -q >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null \
        || { echo "setup-chromium: could not install chromium with apt-get (see above)" >&2; exit 1; }
fi
command -v chromium >/dev/null || { echo "setup-chromium: chromium still not on PATH after install" >&2; exit 1; }
