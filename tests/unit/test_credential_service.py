"""The broker of a `coi shell` session: the detached service that outlives coi (handed its
routes over a pipe, serving until its container is gone), `session_broker(service=True)`'s
exit, and what the session keeps out of the sandbox's environment."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from coi.audit.log import AuditLog
from coi.backend.models import Instance
from coi.config.loader import load_config
from coi.credentials import DEVICE, plan, session_broker
from coi.credentials import service as svc
from coi.credentials.broker import Limits, Route
from coi.credentials.providers import CLAUDE_LOGIN, PROVIDERS
from coi.credentials.sources import Credential
from coi.errors import NotFound, SessionError
from coi.sessions.prepare import SessionOptions, prepare
from coi.tools.base import Broker as ToolBroker
from coi.tools.base import Tool

KEY = "sk-ant-REAL-KEY-service-test"
TOOL = Tool(
    name="standin",
    binary="x",
    credential_files=(".x/login.json", ".x/settings.json"),
    secret_files=(".x/login.json",),
    brokers=(ToolBroker(provider="anthropic", env={"BASE": "{url}", "TOK": "{token}"}),),
)


def _routes(tmp_path: Path) -> dict[str, Route]:
    login = Credential(
        kind="oauth",
        secret="at-1",
        source="login file",
        refresh_token="rt-1",
        expires_at=123.5,
        login=CLAUDE_LOGIN,
        file=tmp_path / "login.json",
    )
    key = Credential(kind="key", secret=KEY, source="$ANTHROPIC_API_KEY")
    return {
        "anthropic": Route(PROVIDERS["anthropic"], "tok-a", login, "https://a.test", "https://t"),
        "openai": Route(PROVIDERS["openai"], "tok-o", key, "https://o.test"),
    }


def test_the_routes_reach_the_service_whole(tmp_path: Path) -> None:
    routes = _routes(tmp_path)
    data = svc.payload(
        routes, Limits(max_requests=3), socket=tmp_path / "s", home=tmp_path, ca_bundle="ca"
    )
    back = svc._routes(json.loads(data)["routes"])
    assert back.keys() == routes.keys()
    for name, r in routes.items():
        got = back[name]
        assert (got.provider, got.token, got.upstream, got.token_url) == (
            r.provider,
            r.token,
            r.upstream,
            r.token_url,
        )
        assert got.credential == r.credential  # the secret, refresh token, login and file
    assert json.loads(data)["limits"]["max_requests"] == 3


def _inst(status: str = "Running", devices: dict[str, dict[str, str]] | None = None) -> Instance:
    return Instance.from_api({"name": "c1", "status": status, "devices": devices or {}})


class Daemon:
    """What the service asks the daemon: the container, as a test sets it."""

    def __init__(self, inst: Instance | None) -> None:
        self.inst = inst
        self.instances = self

    def get(self, name: str) -> Instance:
        if self.inst is None:
            raise NotFound(f"instance '{name}' not found")
        return self.inst


def test_the_service_ends_with_its_container_or_its_device() -> None:
    mine = {DEVICE: {"type": "proxy", "connect": "unix:/s/mine.sock"}}
    other = {DEVICE: {"type": "proxy", "connect": "unix:/s/next.sock"}}
    c: Any = Daemon(None)
    assert svc._verdict(c, "c1", "unix:/s/mine.sock", True) == "the container is gone"
    c.inst = _inst("Stopped", mine)
    assert svc._verdict(c, "c1", "unix:/s/mine.sock", True) == "the container stopped"
    c.inst = _inst("Frozen", mine)  # paused by the monitor: it may come back
    assert svc._verdict(c, "c1", "unix:/s/mine.sock", True) == "seen"
    c.inst = _inst("Running", {})
    assert svc._verdict(c, "c1", "unix:/s/mine.sock", False) is None  # coi adds it meanwhile
    assert "removed or replaced" in str(svc._verdict(c, "c1", "unix:/s/mine.sock", True))
    c.inst = _inst("Running", other)  # a later session of a persistent container
    assert "removed or replaced" in str(svc._verdict(c, "c1", "unix:/s/mine.sock", True))


class Timeline:
    """A daemon whose answers follow a script, one per poll (an exception: no answer)."""

    def __init__(self, *steps: Instance | Exception) -> None:
        self.steps = list(steps)
        self.removed: list[dict[str, str]] = []
        self.instances = self
        self.clients = 0

    def __call__(self) -> Timeline:
        self.clients += 1
        return self

    def close(self) -> None:
        pass

    def get(self, name: str) -> Instance:
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, Exception):
            raise step
        return step

    def remove_device(self, name: str, device: str, *, expect: dict[str, str]) -> None:
        self.removed.append(expect)


def test_the_watch_outlasts_a_restarting_daemon_and_forgets_its_device_when_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from coi.errors import BackendError

    monkeypatch.setattr(svc, "POLL", 0.01)
    mine = {DEVICE: {"type": "proxy", "connect": "unix:/s/mine.sock"}}
    daemon = Timeline(
        _inst("Running", {}),  # coi adds the device meanwhile
        _inst("Running", mine),
        BackendError("the daemon restarts"),
        _inst("Running", mine),
        _inst("Stopped", mine),
    )
    why = svc.watch("c1", "unix:/s/mine.sock", threading.Event(), daemon)  # type: ignore[arg-type]
    assert why == "the container stopped"
    assert daemon.removed == [mine[DEVICE]] and daemon.clients == 2  # connected again
    stop = threading.Event()
    stop.set()
    daemon = Timeline(_inst("Running", mine))
    assert svc.watch("c1", "unix:/s/mine.sock", stop, daemon) == "coi ended the session"  # type: ignore[arg-type]


def _get(sock: Path, token: str, path: str = "/anthropic/v1/models") -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://b") as c:
        return c.get(path, headers={"x-api-key": token})


def _refused(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return True
    return False


def test_a_spawned_service_serves_its_socket_and_holds_no_secret_in_sight(
    tmp_path: Path,
) -> None:
    routes = _routes(tmp_path)
    sock = tmp_path / "brokers" / "c1.sock"
    data = svc.payload(routes, Limits(), socket=sock, home=tmp_path / "coi", ca_bundle="")
    # No daemon answers at this socket: the service keeps serving (a restarting daemon).
    env = {**os.environ, "ANTHROPIC_API_KEY": KEY}
    started = time.monotonic()
    service = svc.spawn("c1", data, daemon_socket=str(tmp_path / "none.sock"), project="p", env=env)
    try:
        service.ready(20)
        ready_in = time.monotonic() - started
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        refused = _get(sock, "not-the-token")
        assert refused.status_code == 403 and "session token" in refused.text
        assert _get(sock, "tok-a", "/anthropic/admin").status_code == 403
        # The credentials came over the pipe: not in its environment or command line.
        proc = Path(f"/proc/{service.pid}")
        seen = (proc / "environ").read_bytes() + (proc / "cmdline").read_bytes()
        for secret in (KEY, "at-1", "rt-1", "tok-a"):
            assert secret.encode() not in seen
        assert service.proc.poll() is None and os.getsid(service.pid) != os.getsid(0)
    finally:
        service.stop()
    assert service.proc.returncode == 0 and not sock.exists() and _refused(sock)
    last = AuditLog("c1", tmp_path / "coi").read()[-1]
    assert last["action"] == "stopped" and last["evidence"]["reason"] == "coi ended the session"
    assert ready_in < 10


def test_a_service_that_cannot_serve_says_why(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    sock = tmp_path / "file" / "c1.sock"  # its folder cannot be made
    data = svc.payload({}, Limits(), socket=sock, home=tmp_path, ca_bundle="")
    service = svc.spawn("c1", data, daemon_socket="/nonexistent", project="p")
    with pytest.raises(SessionError, match="did not start: cannot make the broker") as err:
        service.ready(20)
    assert "mode" in str(err.value.resolution)
    assert service.proc.poll() is not None
    broken = svc.spawn("c1", b"not json", daemon_socket="/nonexistent", project="p")
    with pytest.raises(SessionError, match="JSONDecodeError"):
        broken.ready(20)


class FakeInstances:
    def __init__(self, status: str = "Running") -> None:
        self.status = status
        self.devices: dict[str, dict[str, str]] = {}

    def add_device(self, name: str, device: str, spec: dict[str, str]) -> None:
        self.devices[device] = dict(spec)

    def remove_device(
        self, name: str, device: str, *, expect: dict[str, str] | None = None
    ) -> None:
        if expect is None or self.devices.get(device) == expect:
            self.devices.pop(device, None)

    def get(self, name: str) -> Instance:
        if self.status == "gone":
            raise NotFound(f"instance '{name}' not found")
        return _inst(self.status, self.devices)


class FakeClient:
    def __init__(self, tmp_path: Path) -> None:
        self.instances = FakeInstances()
        self.project = "p"
        self.endpoint = type(
            "E", (), {"is_local": True, "socket_path": str(tmp_path / "none.sock")}
        )()


@pytest.mark.parametrize(
    ("agent_started", "status", "left_serving"),
    [(True, "Running", True), (False, "Running", False), (True, "gone", False)],
)
def test_the_service_outlives_the_with_only_for_a_started_agent_in_a_running_container(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    agent_started: bool,
    status: str,
    left_serving: bool,
) -> None:
    spawned: list[svc.Service] = []
    plain = svc.spawn

    def spawn(*a: Any, **k: Any) -> svc.Service:
        spawned.append(plain(*a, **k))
        return spawned[-1]

    monkeypatch.setattr(svc, "spawn", spawn)
    client: Any = FakeClient(tmp_path)
    env = {
        "HOME": str(tmp_path / "home"),
        "COI_HOME": str(tmp_path / "c"),
        "ANTHROPIC_API_KEY": KEY,
    }
    cfg = load_config(files=[], env=env)
    try:
        with session_broker(client, "c1", TOOL, cfg, env=env, service=True, background=True) as h:
            assert h.mode == "broker" and h.socket is not None
            if agent_started:
                h.wait_attached()
                assert client.instances.devices[DEVICE] == h.device
                assert _get(h.socket, "wrong").status_code == 403
            client.instances.status = status
        (service,) = spawned
        assert (service.proc.poll() is None) == left_serving
        assert (DEVICE in client.instances.devices) == left_serving
        assert h.socket.exists() == left_serving
    finally:
        for s in spawned:
            s.stop()


def test_the_device_is_asked_for_before_the_broker_process_is_spawned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon takes a second to add the proxy device (its poll): the request goes first,
    and importing the broker and spawning its process happen within that second, not before
    it (bench/shell_broker.py: 0.14 s of a coi shell's start)."""
    order: list[str] = []
    spawned: list[svc.Service] = []
    plain = svc.spawn

    def spawn(*a: Any, **k: Any) -> svc.Service:
        order.append("spawn")
        spawned.append(plain(*a, **k))
        return spawned[-1]

    monkeypatch.setattr(svc, "spawn", spawn)
    client: Any = FakeClient(tmp_path)
    added = client.instances.add_device

    def add_device(name: str, device: str, spec: dict[str, str]) -> None:
        order.append("device")
        added(name, device, spec)

    client.instances.add_device = add_device
    env = {
        "HOME": str(tmp_path / "home"),
        "COI_HOME": str(tmp_path / "c"),
        "ANTHROPIC_API_KEY": KEY,
    }
    cfg = load_config(files=[], env=env)
    try:
        with session_broker(client, "c1", TOOL, cfg, env=env, service=True, background=False):
            assert order == ["device", "spawn"]
    finally:
        for s in spawned:
            s.stop()


def test_prepare_says_which_forwarded_variables_come_from_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COI_HOME", str(tmp_path / "coi"))
    ws = tmp_path / "ws"
    ws.mkdir()
    environ = {
        "HOME": str(tmp_path),
        "COI_HOME": str(tmp_path / "coi"),
        "ANTHROPIC_API_KEY": KEY,
        "OPENAI_API_KEY": "sk-o",
        "FOO": "host",
    }
    cfg = load_config(files=[], env=environ)
    cfg.set("tool.forward_env", ["ANTHROPIC_API_KEY", "OPENAI_API_KEY", "FOO"], "test")
    opts = SessionOptions(workspace=ws, env={"OPENAI_API_KEY": "given"}, network="open")
    shell = prepare(opts, environ=environ, config=cfg)
    assert (
        shell.spec.env["ANTHROPIC_API_KEY"] == KEY and shell.spec.env["OPENAI_API_KEY"] == "given"
    )
    assert shell.spec.host_env == ("ANTHROPIC_API_KEY", "FOO")  # -e wins: not the host's
    # `coi run` gets no agent credential; with mode none, no provider's key either.
    run = prepare(
        SessionOptions(workspace=ws, kind="run", network="open"), environ=environ, config=cfg
    )
    assert run.spec.env["ANTHROPIC_API_KEY"] == KEY
    cfg.set("credentials.mode", "none", "test")
    run = prepare(
        SessionOptions(workspace=ws, kind="run", network="open"), environ=environ, config=cfg
    )
    assert "ANTHROPIC_API_KEY" not in run.spec.env and "OPENAI_API_KEY" not in run.spec.env
    assert run.spec.env["FOO"] == "host"
    assert any("not forwarded: ANTHROPIC_API_KEY, OPENAI_API_KEY" in m for m in run.messages)


def test_the_shell_keeps_a_brokered_key_out_of_the_forwarded_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    from coi.sessions.runner import ShellRequest, ShellSession
    from coi.sessions.sandbox import SandboxSpec

    monkeypatch.setenv("COI_HOME", str(tmp_path / "coi"))
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    cfg = load_config(files=[], env={"HOME": str(tmp_path), "COI_HOME": str(tmp_path / "c")})
    spec = SandboxSpec(
        workspace=tmp_path,
        image="coi-tiny",
        persistent=False,
        env={"ANTHROPIC_API_KEY": KEY, "FOO": "1", "CLAUDE_CODE_OAUTH_TOKEN": "given"},
        host_env=("ANTHROPIC_API_KEY", "FOO"),
    )
    client: Any = FakeClient(tmp_path)
    tool = replace(TOOL, name="standin")
    session = ShellSession(client, cfg, spec, ShellRequest(tool=tool))
    session._plan_credentials()
    assert session.spec.env == {"FOO": "1", "CLAUDE_CODE_OAUTH_TOKEN": "given"}
    assert session.box.spec is session.spec
    err = capsys.readouterr().err
    assert "brokered (anthropic from $ANTHROPIC_API_KEY)" in err
    assert "not forwarded, kept on the host: ANTHROPIC_API_KEY" in err
    assert "Warning: CLAUDE_CODE_OAUTH_TOKEN is given to the sandbox explicitly" in err
    # Copy mode forwards what the user asked, as before.
    cfg.set("credentials.mode", "copy", "test")
    session = ShellSession(client, cfg, spec, ShellRequest(tool=tool))
    session._plan_credentials()
    assert session.spec.env == spec.env
    assert plan(tool, cfg).mode == "copy"


def test_the_one_line_summary_for_info_and_health(tmp_path: Path) -> None:
    from coi.health.checks import _credentials

    env = {"HOME": str(tmp_path), "ANTHROPIC_API_KEY": KEY}
    cfg = load_config(files=[], env=env)
    assert plan(TOOL, cfg, env=env).summary == "broker (anthropic from $ANTHROPIC_API_KEY)"
    assert plan(TOOL, cfg, env={"HOME": str(tmp_path)}).summary == (
        "copy (no credential found for anthropic)"
    )
    assert plan(TOOL, cfg, env=env, local=False).summary == "copy (the daemon is remote)"
    bare = Tool(name="bare", binary="x")
    assert plan(bare, cfg, env=env).summary == "copy (bare cannot be brokered)"
    cfg.set("credentials.mode", "none", "test")
    assert plan(TOOL, cfg, env=env).summary == 'none (mode = "none")'
    # A key_command may ask for a passphrase: a summary does not run it.
    ran = tmp_path / "ran"
    cfg.set("credentials.mode", "broker", "test")
    cfg.set("credentials.key_command", {"anthropic": f"touch {ran}; echo k"}, "test")
    p = plan(TOOL, cfg, env=env, run_command=False)
    assert p.summary == "broker (anthropic from [credentials] key_command (not run))"
    assert not ran.exists()
    # A broken configured source fails the health check, saying which.
    cfg.set("credentials.key_command", {}, "test")
    cfg.set("credentials.key_file", {"anthropic": str(tmp_path / "missing")}, "test")
    check = _credentials(cfg)
    assert check.status == "failed" and "key_file" in check.message
