"""The workspace's cache on a cluster (tests/clusterkit.py: three members over HTTPS, a `dir`
pool on each member's own disk): a cache per member, made where the sandbox runs, so a later
session on that member sends only what changed; `coi clean --workspace-caches` removes the
caches on every member."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from tests import clusterkit
from tests.conftest import run_coi

pytestmark = pytest.mark.cluster

HOW = re.compile(r"Copied the workspace to the remote sandbox: .*MB sent, (.*)\) in [\d.]+ s")


@pytest.fixture
def env(tmp_path: Path, cluster: clusterkit.Cluster) -> dict[str, str]:
    return clusterkit.user_env(cluster, tmp_path)


def _how(env: dict[str, str], ws: Path, member: str) -> str:
    res = run_coi("--remote", "c", "run", "--network", "open", "--target", member, "-w",
                  str(ws), "--", "cat", "/workspace/notes.txt", env=env, timeout=240)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout == (ws / "notes.txt").read_text()
    found = HOW.search(res.stderr)
    assert found, res.stderr
    return found[1]


def _caches(cluster: clusterkit.Cluster) -> set[tuple[str, str]]:
    with cluster.members[0].admin() as c:
        vols = c.get("/1.0/storage-pools/coi/volumes/custom", recursion=1) or []
    return {(v["name"], v["location"]) for v in vols if v["name"].startswith("coi-ws-")}


def test_a_cache_per_member_and_clean_on_every_member(
    cluster: clusterkit.Cluster, env: dict[str, str], tmp_path: Path
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "notes.txt").write_text("one\n")
    (ws / "blob.bin").write_bytes(os.urandom(200_000))
    assert _how(env, ws, "m1") == "the whole workspace: no cache of it on the server yet"
    assert _how(env, ws, "m3") == "the whole workspace: no cache of it on the server yet"
    (ws / "notes.txt").write_text("two\n")
    # Each member's sandbox uses that member's cache (not one the sandbox cannot attach).
    assert _how(env, ws, "m1") == "only what changed: 1 files, 0 removed"
    assert _how(env, ws, "m3") == "only what changed: 1 files, 0 removed"
    assert {loc for _, loc in _caches(cluster)} == {"m1", "m3"}
    clean = run_coi("--remote", "c", "clean", "--workspace-caches", "--force", env=env,
                    timeout=240)  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.count("Deleted workspace cache") == 2, clean.stdout
    assert _caches(cluster) == set()
