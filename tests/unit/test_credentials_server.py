"""The broker served on its unix socket by a thread, and `session_broker` with a stand-in for
the daemon client: socket modes, the device, what the handle holds, stop and cleanup."""

from __future__ import annotations

import json
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from coi.audit.log import AuditLog
from coi.config.loader import load_config
from coi.credentials import DEVICE, session_broker
from coi.credentials.broker import Broker, Route
from coi.credentials.providers import PROVIDERS
from coi.credentials.server import BrokerServer
from coi.credentials.sources import Credential
from coi.errors import NotFound, SessionError
from coi.tools.base import Broker as ToolBroker
from coi.tools.base import Tool

KEY = "sk-ant-REAL-KEY-server-test"


def _upstream(seen: list[httpx.Request]) -> httpx.AsyncClient:
    def answer(r: httpx.Request) -> httpx.Response:
        seen.append(r)
        return httpx.Response(200, json={"key": r.headers.get("x-api-key") == KEY})

    return httpx.AsyncClient(transport=httpx.MockTransport(answer))


def _refused(sock: Path) -> bool:
    """Nothing serves the socket (httpx leaks a socket on this, so a plain connect)."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return True
    return False


def _get(sock: Path, token: str, path: str = "/anthropic/v1/models") -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://b") as c:
        return c.get(path, headers={"x-api-key": token})


def test_the_server_listens_on_a_private_socket_and_stops_for_good(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []
    route = Route(
        provider=PROVIDERS["anthropic"],
        token="tok",
        credential=Credential(kind="key", secret=KEY, source="t"),
        upstream="https://api.example.test",
    )
    broker = Broker("c1", {"anthropic": route}, audit=AuditLog("c1", tmp_path / "coi"))
    broker.client = _upstream(seen)
    path = tmp_path / "brokers" / "c1.sock"
    server = BrokerServer(broker, path)
    server.start()
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        answers = [_get(path, "tok"), _get(path, "nope")]
        assert [a.status_code for a in answers] == [200, 403]
        assert answers[0].json() == {"key": True} and len(seen) == 1
        assert server.running and any(t.name == "coi-broker-c1" for t in threading.enumerate())
    finally:
        server.stop()
    assert not server.running and not path.exists() and broker.closed
    assert _refused(path)
    server.stop()  # idempotent


def test_a_socket_path_too_long_is_refused_with_a_way_out(tmp_path: Path) -> None:
    broker = Broker("c1", {}, audit=AuditLog("c1", tmp_path))
    with pytest.raises(SessionError, match="too long") as err:
        BrokerServer(broker, tmp_path / ("x" * 120) / "c.sock").start()
    assert "COI_HOME" in str(err.value.resolution)


class FakeInstances:
    def __init__(self) -> None:
        self.devices: dict[str, dict[str, dict[str, str]]] = {}

    def add_device(self, name: str, device: str, spec: dict[str, str]) -> None:
        self.devices.setdefault(name, {})[device] = dict(spec)

    def remove_device(
        self, name: str, device: str, *, expect: dict[str, str] | None = None
    ) -> None:
        if device not in self.devices.get(name, {}):
            raise NotFound(f"instance '{name}' has no device '{device}'")
        del self.devices[name][device]


class FakeClient:
    def __init__(self, local: bool = True) -> None:
        self.instances = FakeInstances()
        self.endpoint = type("E", (), {"is_local": local})()


TOOL = Tool(
    name="standin",
    binary="x",
    credential_files=(".claude/.credentials.json", ".claude/settings.json"),
    secret_files=(".claude/.credentials.json",),
    brokers=(
        ToolBroker(
            provider="anthropic",
            env={"BASE": "{url}", "TOK": "{token}"},
            settings={".x.json": {"k": "{token}"}},
        ),
    ),
)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Request]:
    """The broker's upstream client answers here: no test sends anything to a network."""
    seen: list[httpx.Request] = []
    monkeypatch.setattr("coi.credentials.server.http_client", lambda *a, **k: _upstream(seen))
    return seen


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), "COI_HOME": str(tmp_path / "coi"), **extra}


def test_session_broker_yields_placeholders_and_a_device_and_cleans_up(
    tmp_path: Path, offline: list[httpx.Request]
) -> None:
    client: Any = FakeClient()
    env = _env(tmp_path, ANTHROPIC_API_KEY=KEY)
    cfg = load_config(files=[], env=env)
    with session_broker(client, "c1", TOOL, cfg, env=env) as h:
        assert h.mode == "broker" and h.providers == ("anthropic",)
        assert h.env["BASE"] == "http://127.0.0.1:41240/anthropic"
        token = h.env["TOK"]
        assert len(token) >= 43 and h.settings == {".x.json": {"k": token}}
        assert client.instances.devices["c1"][DEVICE] == h.device
        assert h.device is not None and h.device["connect"] == f"unix:{h.socket}"
        assert h.socket is not None and h.socket.parent == tmp_path / "coi" / "brokers"
        assert h.credential_files(TOOL) == (".claude/settings.json",)
        assert h.forward_env(["ANTHROPIC_API_KEY", "TERM"]) == ["TERM"]
        assert KEY not in json.dumps([h.env, h.settings, h.device, list(h.notices)])
        ok = _get(h.socket, token)
        assert ok.status_code == 200 and ok.json() == {"key": True}
        assert str(offline[0].url) == "https://api.anthropic.com/v1/models"
        assert _get(h.socket, "wrong").status_code == 403 and len(offline) == 1
        sock = h.socket
    assert client.instances.devices["c1"] == {}
    assert not sock.exists()
    assert _refused(sock)


def test_two_sessions_get_different_placeholders(tmp_path: Path) -> None:
    client: Any = FakeClient()
    env = _env(tmp_path, ANTHROPIC_API_KEY=KEY)
    cfg = load_config(files=[], env=env)
    with (
        session_broker(client, "c1", TOOL, cfg, env=env) as a,
        session_broker(client, "c2", TOOL, cfg, env=env) as b,
    ):
        assert a.env["TOK"] != b.env["TOK"] and a.socket != b.socket
        assert a.socket is not None and b.socket is not None
        assert _get(b.socket, a.env["TOK"]).status_code == 403


def test_no_broker_starts_outside_broker_mode(tmp_path: Path) -> None:
    client: Any = FakeClient(local=False)
    env = _env(tmp_path, ANTHROPIC_API_KEY=KEY)
    before = {t.name for t in threading.enumerate()}
    with session_broker(client, "c1", TOOL, load_config(files=[], env=env), env=env) as h:
        assert (h.mode, h.device, h.env) == ("copy", None, {})
        assert "remote" in " ".join(h.notices)
        assert {t.name for t in threading.enumerate()} == before
    assert client.instances.devices == {}


def test_the_broker_socket_is_not_reachable_by_a_stranger_path(tmp_path: Path) -> None:
    """Connecting to the socket is all it takes to use the broker: it must be ours alone."""
    client: Any = FakeClient()
    env = _env(tmp_path, ANTHROPIC_API_KEY=KEY)
    with session_broker(client, "c1", TOOL, load_config(files=[], env=env), env=env) as h:
        assert h.socket is not None
        st = h.socket.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(h.socket))  # we (its owner) may
        s.close()


def test_the_device_can_be_added_in_the_background(tmp_path: Path) -> None:
    client: Any = FakeClient()
    gate = threading.Event()
    plain = client.instances.add_device

    def slow_add(name: str, device: str, spec: dict[str, str]) -> None:
        gate.wait(5)  # the daemon takes about a second for a proxy device
        plain(name, device, spec)

    client.instances.add_device = slow_add
    env = _env(tmp_path, ANTHROPIC_API_KEY=KEY)
    cfg = load_config(files=[], env=env)
    with session_broker(client, "c1", TOOL, cfg, env=env, background=True) as h:
        assert client.instances.devices == {}  # not yet: the session goes on meanwhile
        gate.set()
        h.wait_attached()
        assert client.instances.devices["c1"][DEVICE] == h.device
    assert client.instances.devices["c1"] == {}

    def failing(name: str, device: str, spec: dict[str, str]) -> None:
        raise NotFound("instance 'c1' not found")

    client.instances.add_device = failing
    with (
        session_broker(client, "c1", TOOL, cfg, env=env, background=True) as h,
        pytest.raises(NotFound),
    ):
        h.wait_attached()
