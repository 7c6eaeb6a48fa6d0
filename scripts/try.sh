#!/usr/bin/env bash
# Quick start: set everything up, then run a command in a sandbox on a folder (default: here).
#   scripts/try.sh [FOLDER] [-- COMMAND...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FOLDER="${1:-$PWD}"; shift || true
[ "${1:-}" = "--" ] && shift
"$ROOT/scripts/bootstrap.sh"
if [ "$#" -eq 0 ]; then
    set -- sh -c 'echo "inside: $(id -un) uid=$(id -u) in $(pwd)"; ls -la /workspace | head -20'
fi
# The full agent image (`coi build`) is not built by set-up; the tiny image is. Pick another
# with COI_IMAGE=NAME.
IMAGE="${COI_IMAGE:-coi-tiny}"
exec "$ROOT/.venv/bin/coi" run --image "$IMAGE" --workspace "$FOLDER" -- "$@"
