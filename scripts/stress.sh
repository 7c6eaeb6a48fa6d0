#!/usr/bin/env bash
# The fault and concurrency tests, over and over (longer than CI's run should take):
# twenty `coi run` at once on one workspace, five rounds, and kill -9 at each step of
# `coi run`, three rounds. Needs what scripts/test.sh sets up (run it once first).
#   scripts/stress.sh [extra pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export INCUS_SOCKET="${INCUS_SOCKET:-/var/lib/incus/unix.socket}"
COI_STRESS_ROUNDS="${COI_STRESS_ROUNDS:-5}" .venv/bin/pytest -q -p no:cacheprovider \
    tests/integration/test_reliability.py -k twenty "$@"
for round in 1 2 3; do
    echo "== kill -9 at each step, round $round"
    .venv/bin/pytest -q -p no:cacheprovider tests/integration/test_reliability.py -k kill_9 "$@"
done
