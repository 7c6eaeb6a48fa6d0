#!/usr/bin/env bash
# Install coi from this checkout into .venv (pinned by uv.lock), then run `coi setup`.
# Safe to run again: every step only does what is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
    echo "bootstrap: run as root (or install sudo): 'coi setup' installs system packages" >&2
    exit 1
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

# uv installs the exact versions in uv.lock. Bring it in once, from PyPI, in its own venv.
UV="$(command -v uv || true)"
if [ -z "$UV" ]; then
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv >/dev/null
    fi
    if [ ! -x "$ROOT/.cache/uv/bin/uv" ]; then
        python3 -m venv "$ROOT/.cache/uv"
        "$ROOT/.cache/uv/bin/pip" install --quiet "uv==0.13.9"
    fi
    UV="$ROOT/.cache/uv/bin/uv"
fi
# The system Python (readable by every user, unlike a per-user pyenv) when it is new enough:
# tests run coi as an unprivileged user too.
PY=""
if /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    PY="--python /usr/bin/python3"
fi
# Bytecode compiled now: every coi command would otherwise compile its libraries again where
# PYTHONDONTWRITEBYTECODE is set (it is on CI machines), a few hundred milliseconds each time.
# shellcheck disable=SC2086
"$UV" sync --frozen --quiet --compile-bytecode $PY
"$ROOT/.venv/bin/python" -m compileall -q "$ROOT/src" >/dev/null

# The daemon, storage pool, bridge, uid mapping and tiny image.
$SUDO "$ROOT/.venv/bin/coi" setup "$@"
