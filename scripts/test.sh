#!/usr/bin/env bash
# Set everything up on this machine, then run the whole test suite against the real daemon.
#   scripts/test.sh [PYTEST ARGS...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Tests that check file ownership run coi as this unprivileged user (uid != 1000 on purpose).
TEST_USER=coitest
if [ "$(id -u)" -eq 0 ] && ! id "$TEST_USER" >/dev/null 2>&1; then
    useradd --create-home --uid 1500 --shell /bin/bash "$TEST_USER"
fi
"$ROOT/scripts/bootstrap.sh" --user "$TEST_USER"

# The completion tests load coi's scripts in zsh and fish too.
if [ "$(id -u)" -eq 0 ] && ! { command -v zsh && command -v fish; } >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q zsh fish >/dev/null
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
echo "== tests"
# CI=true makes a missing daemon fail the run instead of skipping the integration tests.
exec .venv/bin/pytest "$@"
