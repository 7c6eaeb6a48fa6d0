#!/usr/bin/env bash
# Quick start: set everything up, build the agent image once, then work on a folder in a sandbox.
#   scripts/try.sh [FOLDER]               the agent (coi shell) on FOLDER (default: here)
#   scripts/try.sh [FOLDER] -- COMMAND... one command in a fresh sandbox on FOLDER
# COI_IMAGE=coi-tiny skips the agent image (a 3 MB busybox image, built in a second).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FOLDER="${1:-$PWD}"; shift || true
[ "${1:-}" = "--" ] && shift
"$ROOT/scripts/bootstrap.sh"
COI="$ROOT/.venv/bin/coi"
IMAGE="${COI_IMAGE:-coi}"
if [ "$IMAGE" = "coi" ] && ! "$COI" image exists coi; then
    "$COI" build   # a few minutes, once; progress is shown
fi
if [ "$#" -eq 0 ]; then
    if [ -t 0 ] && [ -t 1 ]; then
        exec "$COI" shell --image "$IMAGE" --workspace "$FOLDER"
    fi
    set -- sh -c 'echo "inside: $(id -un) uid=$(id -u) in $(pwd)"; ls -la /workspace | head -20'
fi
exec "$COI" run --image "$IMAGE" --workspace "$FOLDER" -- "$@"
