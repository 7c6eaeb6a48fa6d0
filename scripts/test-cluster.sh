#!/usr/bin/env bash
# The cluster tests alone: a three-member Incus cluster made on this machine by
# tests/clusterkit.py (three incusd in namespaces of their own, reachable only over HTTPS),
# coi against it (tests/integration/test_cluster.py, test_remote_sync_cluster.py: every test
# marked `cluster`). They are part of the whole suite too (scripts/test.sh, CI: about a minute
# and a half); this runs just them, e.g. after a change to placement or to the network code.
#   scripts/test-cluster.sh [PYTEST ARGS...]
# Needs root (namespaces, veths) and the main Incus daemon running (its image is reused).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
exec .venv/bin/pytest -m cluster tests/integration "$@"
