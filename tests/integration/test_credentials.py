"""The credential broker against the real daemon and a stand-in provider (tests/credkit.py):
the sandbox reaches the provider only through the broker's proxy device, the provider gets
the real key, and the key (or a login's refresh token) is nowhere in the sandbox."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests import credkit
from tests.conftest import ROOT

from coi.audit.log import AuditLog
from coi.backend import ExecRequest, IncusClient
from coi.config.loader import Config, load_config
from coi.credentials import BROKER_PORT, DEVICE, session_broker
from coi.tools.base import Broker, Tool

pytestmark = pytest.mark.incus

# A stand-in agent tool: gets the broker's URL and placeholder as its own variables.
AGENT = Tool(
    name="standin",
    binary="sh",
    credential_files=(".claude/.credentials.json",),
    secret_files=(".claude/.credentials.json",),
    brokers=(Broker(provider="anthropic", env={"API_URL": "{url}", "API_TOKEN": "{token}"}),),
)


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[credkit.StandIn]:
    s = credkit.create(tmp_path_factory.mktemp("standin"))
    try:
        yield s
    finally:
        credkit.destroy(s)


def _box(client: IncusClient, name: str, pool: str) -> None:
    # No NIC at all: the proxy device is the only way out, whatever the network mode.
    client.instances.create(
        name,
        image="coi-tiny",
        devices={"root": {"type": "disk", "path": "/", "pool": pool}},
        start=True,
    )


@pytest.fixture(scope="module")
def project_client(test_project: str) -> Iterator[IncusClient]:
    with IncusClient.connect(project=test_project) as c:
        yield c


@pytest.fixture(scope="module")
def box(project_client: IncusClient) -> Iterator[str]:
    name = f"cred-{os.getpid() % 100000}-{int(time.time()) % 100000}"
    _box(project_client, name, os.environ.get("COI_POOL", "coi"))
    try:
        yield name
    finally:
        project_client.instances.delete(name, force=True)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home), "COI_HOME": str(tmp_path / "coi")}


def _cfg(env: dict[str, str], standin: credkit.StandIn, **values: Any) -> Config:
    cfg = load_config(files=[], env=env)
    cfg.set("credentials.upstream", {"anthropic": standin.url}, "test")
    cfg.set("credentials.ca_bundle", str(standin.ca), "test")
    for k, v in values.items():
        cfg.set(f"credentials.{k}", v, "test")
    return cfg


def _http(
    client: IncusClient,
    box: str,
    token: str | None,
    path: str = "/anthropic/v1/messages",
    body: str = '{"model":"m","max_tokens":1}',
    env: dict[str, str] | None = None,
) -> str:
    """A raw HTTP request from inside the sandbox (busybox nc) to the broker; the answer."""
    auth = f"x-api-key: {token}\r\n" if token is not None else ""
    req = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n\r\n{body}"
    )
    res = client.exec.capture(
        box,
        ExecRequest(
            # nc -e: the request is written, then the answer read until the broker closes
            # (piping into nc ends it at the end of its input, sometimes before the answer).
            [
                "sh",
                "-c",
                f'nc 127.0.0.1 {BROKER_PORT} -e sh -c \'printf "%s" "$REQ"; cat >&2\' 2>&1',
            ],
            env={"REQ": req, **(env or {})},
        ),
    )
    return res.stdout.decode(errors="replace")


def _status(answer: str) -> int:
    return int(answer.split(" ", 2)[1]) if answer.startswith("HTTP/") else 0


def _with_agent(client: IncusClient, box: str, env: dict[str, str]) -> None:
    """A long-lived 'agent' process with the session's environment, as a tool would run."""
    client.exec.quiet(
        box, ExecRequest(["sh", "-c", "sleep 600 </dev/null >/dev/null 2>&1 &"], env=env)
    )


def test_the_sandbox_reaches_the_provider_only_through_the_broker_with_the_real_key(
    project_client: IncusClient, box: str, standin: credkit.StandIn, env: dict[str, str]
) -> None:
    client = project_client
    env["ANTHROPIC_API_KEY"] = standin.key  # the host's real key, in coi's environment
    cfg = _cfg(env, standin)
    with session_broker(client, box, AGENT, cfg, env=env) as h:
        assert h.mode == "broker" and h.device is not None
        token = h.env["API_TOKEN"]
        assert h.env["API_URL"] == f"http://127.0.0.1:{BROKER_PORT}/anthropic"
        _with_agent(client, box, h.env)

        before = len(standin.requests())
        ok = _http(client, box, token)
        assert _status(ok) == 200 and '"ok": true' in ok, ok
        got = standin.requests()[before:]
        assert len(got) == 1 and got[0]["path"] == "/v1/messages"
        headers = {k.lower(): v for k, v in got[0]["headers"].items()}  # type: ignore[union-attr]
        assert headers["x-api-key"] == standin.key  # the real key, put in by the broker
        assert token not in json.dumps(headers)

        streamed = _http(client, box, token, body='{"stream": true}')
        assert _status(streamed) == 200 and "text/event-stream" in streamed
        assert streamed.count("event: delta") == 3, streamed

        for answer, why in (
            (_http(client, box, token, path="/anthropic/admin/keys"), "not an API path"),
            (_http(client, box, None), "missing or wrong session token"),
            (_http(client, box, "not-the-token"), "missing or wrong session token"),
            (_http(client, box, token, path="/openai/v1/models"), "no provider 'openai'"),
        ):
            assert _status(answer) == 403 and why in answer, answer
        assert len(standin.requests()) == before + 2  # the refused ones never left

        # Searched as root: the file system, every process's environment and command line,
        # and the daemon's view of the container: the key is nowhere; the placeholder is.
        # A marker planted in a file proves the search reads files; the key is not found.
        marker = f"marker-{token[:12]}"
        client.exec.quiet(box, ExecRequest(["sh", "-c", 'echo "$M" > /root/m'], env={"M": marker}))
        assert credkit.find_inside(client, box, standin.key, marker) == "/root/m"
        assert "/environ" in credkit.find_inside(client, box, token, files=False)
        view = credkit.daemon_view(client, box)
        assert standin.key not in view
        assert DEVICE in view and str(h.socket) in view

        events = AuditLog(box, Path(env["COI_HOME"])).read()
        assert [e["evidence"]["status"] for e in events][-6:] == [200, 200, 403, 403, 403, 403]
        assert standin.key not in json.dumps(events) and token not in json.dumps(events)

    # The session is over: the device is gone, and the placeholder is worth nothing.
    assert DEVICE not in json.dumps(client.get(f"/1.0/instances/{box}")["devices"])
    assert _status(_http(client, box, token)) == 0
    assert not h.socket.exists()  # type: ignore[union-attr]


def test_the_placeholder_is_refused_by_the_provider_and_by_another_sandbox(
    project_client: IncusClient, box: str, standin: credkit.StandIn, env: dict[str, str]
) -> None:
    client = project_client
    env["ANTHROPIC_API_KEY"] = standin.key
    cfg = _cfg(env, standin)
    second = f"{box}-b"
    _box(client, second, os.environ.get("COI_POOL", "coi"))
    try:
        with (
            session_broker(client, box, AGENT, cfg, env=env) as a,
            session_broker(client, second, AGENT, cfg, env=env) as b,
        ):
            token = a.env["API_TOKEN"]
            assert _status(_http(client, box, token)) == 200
            # From the second sandbox, the first one's placeholder: its broker refuses it.
            answer = _http(client, second, token)
            assert _status(answer) == 403 and "wrong session token" in answer
            assert _status(_http(client, second, b.env["API_TOKEN"])) == 200
            # Sent straight to the provider (as if the agent had carried it out): refused.
            credkit.check_route(standin)
            assert _direct(standin, token) == 401
            assert _direct(standin, standin.key) == 200  # the stand-in itself works
    finally:
        client.instances.delete(second, force=True)


def _direct(standin: credkit.StandIn, key: str) -> int:
    ctx = ssl.create_default_context(cafile=str(standin.ca))
    with (
        socket.create_connection((standin.addr, 443), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=standin.addr) as tls,
    ):
        tls.sendall(
            f"POST /v1/messages HTTP/1.1\r\nHost: {standin.addr}\r\nx-api-key: {key}\r\n"
            "content-length: 2\r\nconnection: close\r\n\r\n{}".encode()
        )
        head = tls.recv(64).decode()
    return int(head.split(" ", 2)[1])


def test_request_limit_and_an_expired_login_refreshed_on_the_host(
    project_client: IncusClient, box: str, standin: credkit.StandIn, env: dict[str, str]
) -> None:
    client = project_client
    login = Path(env["HOME"]) / "login.json"
    expired_ms = int((time.time() - 600) * 1000)
    login.write_text(
        json.dumps(
            {
                "claudeAiOauth": {
                    "accessToken": "at-expired",
                    "refreshToken": standin.refresh_token,
                    "expiresAt": expired_ms,
                }
            }
        )
    )
    login.chmod(0o600)
    cfg = _cfg(
        env,
        standin,
        oauth_file={"anthropic": str(login)},
        token_url={"anthropic": f"{standin.url}/v1/oauth/token"},
        max_requests=2,
    )
    with session_broker(client, box, AGENT, cfg, env=env) as h:
        token = h.env["API_TOKEN"]
        _with_agent(client, box, h.env)
        before = len(standin.requests())
        answers = [_http(client, box, token) for _ in range(3)]
        assert [_status(a) for a in answers] == [200, 200, 403], answers
        assert "request limit (2) is reached" in answers[2]
        got = standin.requests()[before:]
        assert [r["path"] for r in got] == ["/v1/oauth/token", "/v1/messages", "/v1/messages"]
        sent = {k.lower(): v for k, v in got[1]["headers"].items()}  # type: ignore[union-attr]
        assert sent["authorization"] == f"Bearer {standin.new_access}"
        assert "oauth-2025-04-20" in sent["anthropic-beta"]
        # Refreshed on the host, written back; neither token is in the sandbox.
        saved = json.loads(login.read_text())["claudeAiOauth"]
        assert saved["accessToken"] == standin.new_access
        assert saved["refreshToken"] == "rt-rotated" and saved["expiresAt"] > time.time() * 1000
        secrets = (standin.refresh_token, "rt-rotated", standin.new_access)
        assert credkit.find_inside(client, box, *secrets) == ""
        view = credkit.daemon_view(client, box)
        assert not [x for x in secrets if x in view]
        events = AuditLog(box, Path(env["COI_HOME"])).read()
        last = events[-1]
        assert last["action"] == "refused" and last["evidence"]["reason"] == "max_requests"
        assert any(e["action"] == "refreshed" for e in events)


_AS_USER = r"""
import json, os, sys
from coi.backend import IncusClient
from coi.config.loader import load_config
from coi.credentials import session_broker
from coi.tools.base import Broker, Tool
project, box, url, ca = sys.argv[1:5]
tool = Tool(name="standin", binary="sh",
            brokers=(Broker(provider="anthropic", env={"API_TOKEN": "{token}"}),))
cfg = load_config(files=[], env=os.environ)
cfg.set("credentials.upstream", {"anthropic": url}, "test")
cfg.set("credentials.ca_bundle", ca, "test")
with IncusClient.connect(project=project) as c, session_broker(c, box, tool, cfg) as h:
    st = os.stat(h.socket)
    print(json.dumps({"token": h.env["API_TOKEN"], "uid": os.getuid(), "owner": st.st_uid,
                      "device": h.device}), flush=True)
    sys.stdin.read()
"""


def test_a_broker_of_an_unprivileged_user_serves_the_sandbox(
    project_client: IncusClient,
    box: str,
    standin: credkit.StandIn,
    test_project: str,
    user: Any,
    base: Path,
) -> None:
    """coi as a plain user: its 0600 socket is reached by the daemon's forkproxy, which drops
    to that user (security.uid/gid) before connecting."""
    ca = base / "ca.pem"
    ca.write_bytes(standin.ca.read_bytes())
    home = base / "home"
    home.mkdir()
    os.chown(home, user.pw_uid, user.pw_gid)
    child_env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "COI_HOME": str(home / ".coi"),
        "PYTHONPATH": str(ROOT / "src"),
        "ANTHROPIC_API_KEY": standin.key,
        **{k: os.environ[k] for k in ("INCUS_SOCKET",) if os.environ.get(k)},
    }
    argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]
    argv += ["--", sys.executable, "-c", _AS_USER, test_project, box, standin.url, str(ca)]
    with subprocess.Popen(
        argv, env=child_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        try:
            got = json.loads(child.stdout.readline() or "{}")
            assert got, "the user's broker did not start"
            assert got["uid"] == got["owner"] == user.pw_uid
            assert got["device"]["security.uid"] == str(user.pw_uid)
            before = len(standin.requests())
            answer = _http(project_client, box, got["token"])
            assert _status(answer) == 200, answer
            sent = standin.requests()[before]["headers"]
            assert {k.lower(): v for k, v in sent.items()}["x-api-key"] == standin.key  # type: ignore[union-attr]
        finally:
            child.stdin.close()
            child.wait(timeout=30)
    assert child.returncode == 0
    assert DEVICE not in json.dumps(project_client.get(f"/1.0/instances/{box}")["devices"])
