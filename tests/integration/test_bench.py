"""`coi bench` on the real daemon: the report's shape, and nothing left behind, also when
interrupted. Timings are reported, never asserted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

from tests.conftest import coi_argv, run_coi
from tests.integration.conftest import USER, wait_for

from coi.backend import IncusClient
from coi.labels import WORKSPACE
from coi.perf.bench import BENCH_LABEL


def _bench_made(client: IncusClient) -> list[str]:
    """Containers of a bench: its own (labelled), and `coi run` sandboxes of its workspace."""
    return [
        i.name
        for i in client.instances.list()
        if BENCH_LABEL in i.config or "/coi-bench-" in i.config.get(WORKSPACE, "")
    ]


def test_bench_reports_rows_and_floors_and_leaves_nothing(
    client: IncusClient, uenv: dict[str, str]
) -> None:
    r = run_coi(
        "bench", "--runs", "2", "--image", "coi-tiny", "--list-containers", "3",
        "--format", "json", env=uenv, user=USER, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["runs"] == 2 and report["image"] == "coi-tiny"
    assert report["pool_driver"] == client.networks.pool(report["pool"]).driver  # type: ignore[union-attr]
    assert report["server"] == client.server.display_name
    rows = {row["key"]: row for row in report["rows"]}
    assert set(rows) == {
        "coi_run",
        "cold_floor",
        "warm_floor",
        "coi_list",
        "daemon_list",
        "coi_run_spare",
        "daemon_exec",
    }
    assert rows["coi_list"]["label"] == "`coi list` with 3 containers"
    cli = "incus" if client.server.kind == "incus" else "lxc"
    assert rows["daemon_list"]["label"] == f"`{cli} list` with 3 containers"
    assert rows["daemon_exec"]["label"] == f"`{cli} exec CT -- true`, CT running"
    for row in rows.values():
        assert len(row["samples_ms"]) == 2 and all(x > 0 for x in row["samples_ms"])
        assert row["min_ms"] <= row["p50_ms"] <= row["p95_ms"] <= row["max_ms"]
    assert set(report["ratios"]) == {
        "coi_run/cold_floor",
        "coi_run/warm_floor",
        "coi_list/daemon_list",
        "coi_run_spare/daemon_exec",
    }
    assert _bench_made(client) == []
    # The bench's folders (workspace, state) are gone too.
    assert not [p for p in os.listdir("/tmp") if re.match(r"coi-bench-(home-)?[0-9a-f]{8}-", p)]


def test_bench_interrupted_removes_what_it_made(client: IncusClient, uenv: dict[str, str]) -> None:
    proc = subprocess.Popen(
        coi_argv("bench", "--runs", "200", "--image", "coi-tiny", user=USER),
        env=uenv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        # Interrupted once it has containers of its own: a sandbox or a floor's container.
        wait_for(lambda: _bench_made(client) or proc.poll() is not None, "a bench container", 120)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole process group
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert _bench_made(client) == []
