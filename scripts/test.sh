#!/usr/bin/env bash
# Set everything up on this machine, then run the whole test suite against the real daemons:
# all of it on Incus (the daemon coi installs), then the LXD part (tests marked `lxd`) on
# LXD 5.0, one daemon at a time. Incus runs again at the end.
#   scripts/test.sh                  both parts
#   scripts/test.sh [PYTEST ARGS...] only these tests, on Incus
#   COI_TEST_DAEMONS=incus scripts/test.sh    skip the LXD part
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DAEMONS="${COI_TEST_DAEMONS:-incus lxd}"
[ $# -gt 0 ] && DAEMONS=incus

# Tests that check file ownership run coi as this unprivileged user (uid != 1000 on purpose).
TEST_USER=coitest
if [ "$(id -u)" -eq 0 ] && ! id "$TEST_USER" >/dev/null 2>&1; then
    useradd --create-home --uid 1500 --shell /bin/bash "$TEST_USER"
fi
# coi and Incus (LXD, if an earlier run left it running, is stopped first).
"$ROOT/scripts/switch-daemon.sh" incus --user "$TEST_USER"

# The completion tests load coi's scripts in zsh and fish too; the image script's agent-CLI
# part reads its recipes with jq (tests/unit/test_tools.py runs it).
if [ "$(id -u)" -eq 0 ] \
    && ! { command -v zsh && command -v fish && command -v jq; } >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q zsh fish jq >/dev/null
fi

# The test user runs coi from this checkout: in CI, make the folders above it traversable.
if [ "$(id -u)" -eq 0 ] && [ "${CI:-}" = "true" ]; then
    d="$ROOT"
    while [ "$d" != "/" ]; do chmod o+x "$d"; d="$(dirname "$d")"; done
    chmod -R o+rX "$ROOT/src" "$ROOT/tests" "$ROOT/.venv"
fi

echo "== lint and types"
.venv/bin/ruff check src tests bench
.venv/bin/mypy

# CI=true makes a missing daemon fail the run instead of skipping the integration tests.
status=0
for daemon in $DAEMONS; do
    if [ "$daemon" = incus ]; then
        echo "== tests on Incus (the whole suite)"
        INCUS_SOCKET=/var/lib/incus/unix.socket .venv/bin/pytest "$@" || status=$?
    else
        echo "== tests on LXD (the tests marked 'lxd')"
        "$ROOT/scripts/switch-daemon.sh" lxd --user "$TEST_USER"
        LXD_SOCKET=/var/lib/lxd/unix.socket .venv/bin/pytest -m lxd tests/integration || status=$?
        echo "== back to Incus"
        "$ROOT/scripts/switch-daemon.sh" incus --user "$TEST_USER"
    fi
done
exit "$status"
