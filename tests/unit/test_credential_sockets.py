"""A broker killed with SIGKILL leaves its socket file: the next session's broker and
`coi clean` remove it (nothing accepts on it, and it is past the grace a starting broker
gets); a live broker's socket, a young one and other files stay."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from coi.config.loader import load_config
from coi.credentials import service as svc
from coi.credentials import session_broker, sockets
from coi.credentials.broker import Limits, Route
from coi.credentials.providers import PROVIDERS
from coi.credentials.sources import Credential
from coi.sessions import cleanup
from coi.tools.base import Broker as ToolBroker
from coi.tools.base import Tool

KEY = "sk-ant-REAL-KEY-sockets-test"


def _service(home: Path, name: str) -> tuple[svc.Service, Path]:
    """A real broker service serving its socket in `home`'s brokers folder."""
    cred = Credential(kind="key", secret=KEY, source="$ANTHROPIC_API_KEY")
    routes = {"anthropic": Route(PROVIDERS["anthropic"], "tok", cred, "https://a.test")}
    sock = sockets.folder(home) / f"{name}-abc123.sock"
    data = svc.payload(routes, Limits(), socket=sock, home=home, ca_bundle="")
    # No daemon answers its watch: it serves on (as through a daemon restart).
    service = svc.spawn(name, data, daemon_socket=str(home / "none.sock"), project="p")
    service.ready(20)
    return service, sock


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def _killed(home: Path, name: str) -> Path:
    """The socket a SIGKILLed broker left (it could not remove it), past the grace."""
    service, sock = _service(home, name)
    os.kill(service.pid, signal.SIGKILL)
    service.proc.wait(10)
    assert sock.exists()  # what this is about
    _age(sock, sockets.GRACE + 5)
    return sock


def test_the_socket_of_a_killed_broker_is_stale_a_live_or_young_one_is_not(
    tmp_path: Path,
) -> None:
    home = tmp_path / "coi"
    dead = _killed(home, "c1")
    live, live_sock = _service(home, "c2")
    try:
        _age(live_sock, sockets.GRACE + 5)
        # Bound and never listened on, a moment ago: a broker starting up.
        young = sockets.folder(home) / "c3-young.sock"
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(young))
        other = sockets.folder(home) / "notes.sock"
        other.write_text("not a socket")
        _age(other, sockets.GRACE + 5)

        assert sockets.stale(home) == [dead]
        assert sockets.stale(home, grace=0) == [dead, young]
        assert sockets.remove_stale(home) == [dead]
        assert not dead.exists() and live_sock.exists() and young.exists() and other.exists()
        assert live.proc.poll() is None  # the live broker was not touched
    finally:
        live.stop()
    assert sockets.stale(tmp_path / "no-such-home") == []


def test_coi_clean_lists_and_removes_a_killed_brokers_socket(tmp_path: Path) -> None:
    home = tmp_path / "coi"
    dead = _killed(home, "c1")
    plan = cleanup.CleanPlan(leftovers=cleanup.plan_leftovers(home, []))
    assert plan.leftovers == [dead]
    client: Any = None  # a plan of leftovers only: the daemon is not asked
    assert cleanup.execute(client, plan, lambda _line: None) == 1
    assert not dead.exists()


class _Instances:
    def add_device(self, name: str, device: str, spec: dict[str, str]) -> None:
        pass

    def remove_device(self, name: str, device: str, *, expect: Any = None) -> None:
        pass


class _Client:
    instances = _Instances()
    endpoint = type("E", (), {"is_local": True})()


def test_the_next_session_removes_a_killed_brokers_socket(tmp_path: Path) -> None:
    home = tmp_path / "coi"
    dead = _killed(home, "c1")
    env = {"HOME": str(tmp_path), "COI_HOME": str(home), "ANTHROPIC_API_KEY": KEY}
    tool = Tool(
        name="standin",
        binary="x",
        brokers=(ToolBroker(provider="anthropic", env={"TOK": "{token}"}),),
    )
    client: Any = _Client()
    with session_broker(client, "c2", tool, load_config(files=[], env=env), env=env) as h:
        assert not dead.exists()
        assert h.socket is not None and h.socket.exists()
