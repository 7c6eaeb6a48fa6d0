"""`coi shell` with the credential broker, on the real daemon, run as an unprivileged host
user: a stand-in agent (tests/standin/api-agent.sh, the `standin-api` plugin tool) calls its
API at the base URL coi put in its environment; the stand-in provider (tests/credkit.py)
receives the real key, which is nowhere in the sandbox. The broker is a host process of its
own that serves the sandbox as long as it runs: attached, detached, `--background`; when the
container is gone, nothing answers."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from tests import credkit
from tests.conftest import coi_argv, run_coi
from tests.integration.conftest import (
    STANDIN,
    USER,
    coi_names,
    remove_containers,
    user_dir,
    wait_for,
    wait_gone,
)

from coi.audit.log import AuditLog
from coi.backend import ExecRequest, IncusClient
from coi.credentials import BROKER_PORT

URL = f"http://127.0.0.1:{BROKER_PORT}/anthropic"


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[credkit.StandIn]:
    s = credkit.create(tmp_path_factory.mktemp("standin"))
    try:
        yield s
    finally:
        credkit.destroy(s)


@pytest.fixture
def host(
    uenv: dict[str, str], base: Path, user: pwd.struct_passwd, standin: credkit.StandIn
) -> dict[str, str]:
    """The user's side: the real key in coi's environment (and named in forward_env, which
    the broker overrides), the stand-in as the provider's upstream, the tool's files."""
    home = Path(uenv["HOME"])
    ca = base / "ca.pem"
    shutil.copyfile(standin.ca, ca)
    conf = user_dir(home / ".config" / "coi", user) / "config.toml"
    conf.write_text(
        '[tool]\nforward_env = ["ANTHROPIC_API_KEY", "SECRET_TOKEN"]\n'
        f'[credentials]\nca_bundle = "{ca}"\n'
        f'[credentials.upstream]\nanthropic = "{standin.url}"\n'
    )
    tool_dir = user_dir(home / ".standin-api", user)
    (tool_dir / "login.json").write_text('{"refresh": "login-secret-on-the-host"}')
    (tool_dir / "settings.json").write_text('{"mine": 1}')
    for p in (ca, conf, tool_dir / "login.json", tool_dir / "settings.json"):
        os.chown(p, user.pw_uid, user.pw_gid)
    return {**uenv, "ANTHROPIC_API_KEY": standin.key}


def _shell(env: dict[str, str], ws: Path, *extra: str) -> list[str]:
    return [
        "shell", "--tool", "standin-api", "--image", "coi-tiny", "-w", str(ws),
        "--mount", f"{STANDIN}:/opt/standin", *extra,
    ]  # fmt: skip


def _services(name: str) -> list[int]:
    """The pids of the broker services serving `name`."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"coi.credentials.service" in cmd and name.encode() in cmd:
            found.append(int(d.name))
    return found


def _sockets(env: dict[str, str]) -> list[Path]:
    return sorted((Path(env["COI_HOME"]) / "brokers").glob("*.sock"))


def _answers(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def _calls_with_the_key(standin: credkit.StandIn, before: int) -> list[str]:
    """The x-api-key of each /v1/messages request the stand-in got since `before`."""
    got = standin.requests()[before:]
    return [
        {k.lower(): v for k, v in r["headers"].items()}.get("x-api-key", "")  # type: ignore[union-attr]
        for r in got
        if r["path"] == "/v1/messages"
    ]


def _the_key_is_not_inside(
    client: IncusClient, name: str, standin: credkit.StandIn, env: dict[str, str]
) -> str:
    """Searched as root while the session runs; the agent's placeholder, which is there."""
    marker = f"marker-{os.getpid()}-{time.monotonic_ns()}"
    req = ExecRequest(["sh", "-c", 'echo "$M" > /root/m'], env={"M": marker}, user=0)
    assert client.exec.quiet(name, req) == 0
    found = credkit.find_inside(client, name, standin.key, "login-secret-on-the-host", marker)
    assert found == "/root/m"  # the search reads files; neither the key nor the login is there
    view = credkit.daemon_view(client, name)
    assert standin.key not in view
    # The agent's environment: the base URL; the other forwarded variable went in as asked.
    assert "/environ" in credkit.find_inside(client, name, URL, files=False)
    assert "/environ" in credkit.find_inside(client, name, env["SECRET_TOKEN"], files=False)
    home = "/home/code/.standin-api"
    res = client.exec.capture(name, ExecRequest(["sh", "-c", f"ls {home}; cat {home}/*"]))
    assert res.stdout.decode().split("\n", 1)[0] == "settings.json"  # login.json stayed out
    settings = json.loads(res.stdout.decode().split("\n", 1)[1])
    assert settings == {"mine": 1, "api": {"baseURL": URL}}
    return found


def test_an_attached_shell_reaches_the_provider_through_the_broker_and_holds_no_key(
    client: IncusClient,
    base: Path,
    host: dict[str, str],
    user: pwd.struct_passwd,
    standin: credkit.StandIn,
) -> None:
    ws = user_dir(base / "ws", user)
    argv = coi_argv(*_shell(host, ws), user=USER)
    child = pexpect.spawn(
        argv[0], argv[1:], env=host, encoding="utf-8", timeout=60, dimensions=(40, 160)
    )
    try:
        child.expect(re.escape("Credentials: brokered (anthropic from $ANTHROPIC_API_KEY)"))
        child.expect("not forwarded, kept on the host: ANTHROPIC_API_KEY")
        child.expect("api> ")
        before = len(standin.requests())
        child.sendline("/call")
        child.expect("call: ok")
        assert _calls_with_the_key(standin, before) == [standin.key]
        (name,) = coi_names(client, ws)
        assert len(_services(name)) == 1 and len(_sockets(host)) == 1
        _the_key_is_not_inside(client, name, standin, host)
        child.expect("api> ")
        child.sendline("/exit")
        child.expect("bye")
        child.sendline("exit")  # the pane's fallback shell; tmux ends with it
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close()
    # The session is over: the container, the broker and its socket are gone.
    wait_gone(client, ws)
    assert _services(name) == [] and _sockets(host) == []
    events = [
        e for e in AuditLog(name, Path(host["COI_HOME"])).read() if e["category"] == "credentials"
    ]
    assert [e["action"] for e in events] == ["forwarded", "stopped"]
    assert "coi ended the session" in events[-1]["description"]
    assert standin.key not in json.dumps(events)


def _capture(env: dict[str, str], name: str) -> str:
    res = run_coi("tmux", "capture", name, env=env, user=USER)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _call(env: dict[str, str], name: str) -> None:
    """The agent's `/call`, typed into its tmux session; waits for its answer."""
    done = _capture(env, name).count("call: ")
    res = run_coi("tmux", "send", name, "/call", env=env, user=USER)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: _capture(env, name).count("call: ") > done, "the agent's call")
    answers = [line for line in _capture(env, name).splitlines() if line.startswith("call: ")]
    assert answers[-1].startswith("call: ok"), answers[-1]


def test_a_background_shell_keeps_its_broker_after_coi_exits_and_loses_it_with_its_container(
    client: IncusClient,
    base: Path,
    host: dict[str, str],
    user: pwd.struct_passwd,
    standin: credkit.StandIn,
) -> None:
    """`coi shell --background` exits at once; the broker serves on from a host process of
    its own, through an attach and a detach, until the container is killed."""
    ws = user_dir(base / "ws", user)
    try:
        res = run_coi(*_shell(host, ws, "--background"), env=host, user=USER)
        assert res.returncode == 0, res.stderr
        assert "The credential broker keeps serving this session from the host" in res.stderr
        (name,) = coi_names(client, ws)
        (pid,) = _services(name)
        before = len(standin.requests())
        _call(host, name)  # coi has exited: the service answers
        _the_key_is_not_inside(client, name, standin, host)

        # Attached and detached again (tmux's prefix, then d): the same broker all along.
        argv = coi_argv("attach", name, user=USER)
        child = pexpect.spawn(argv[0], argv[1:], env=host, encoding="utf-8", timeout=60)
        try:
            time.sleep(1)  # let tmux draw the pane before we type
            child.sendline("/call")
            wait_for(lambda: len(_calls_with_the_key(standin, before)) == 2, "the call")
            child.send("\x02d")
            child.expect(pexpect.EOF)
        finally:
            child.close()
        _call(host, name)
        assert _calls_with_the_key(standin, before) == [standin.key] * 3
        assert _services(name) == [pid]
        (sock,) = _sockets(host)
        assert _answers(sock)

        res = run_coi("kill", "--force", name, env=host, user=USER)
        assert res.returncode == 0, res.stderr
        wait_for(lambda: not _services(name), "the broker to end with its container", 15)
        assert not sock.exists() and not _answers(sock)
        last = AuditLog(name, Path(host["COI_HOME"])).read()[-1]
        assert last["action"] == "stopped" and "the container is gone" in last["description"]
    finally:
        remove_containers(client, ws)


def test_a_persistent_container_keeps_the_broker_its_agent_started_with_until_it_stops(
    client: IncusClient,
    base: Path,
    host: dict[str, str],
    user: pwd.struct_passwd,
    standin: credkit.StandIn,
) -> None:
    """A second session on the running container (its agent runs in tmux) starts no broker;
    stopped, the container loses its broker and the device (its next start would spend the
    daemon's second on a dead socket); the next session brings a new one."""
    ws = user_dir(base / "ws", user)
    argv = _shell(host, ws, "--background", "--persistent", "--slot", "1")
    try:
        res = run_coi(*argv, env=host, user=USER)
        assert res.returncode == 0, res.stderr
        (name,) = coi_names(client, ws)
        (first,) = _services(name)
        _call(host, name)
        res = run_coi(*argv, env=host, user=USER)
        assert res.returncode == 0, res.stderr
        assert "the agent in this container runs already" in res.stderr
        assert _services(name) == [first]
        _call(host, name)
        _the_key_is_not_inside(client, name, standin, host)  # its settings kept the URL

        client.instances.stop(name, force=True)
        wait_for(lambda: not _services(name), "the broker to end with its container", 15)
        assert "coi-broker" not in client.instances.get(name).devices
        last = AuditLog(name, Path(host["COI_HOME"])).read()[-1]
        assert "the container stopped" in last["description"]

        res = run_coi(*argv, env=host, user=USER)
        assert res.returncode == 0, res.stderr
        (second,) = _services(name)
        assert second != first
        before = len(standin.requests())
        _call(host, name)
        assert _calls_with_the_key(standin, before) == [standin.key]
    finally:
        remove_containers(client, ws)
    wait_for(lambda: not _services(name), "the broker to end with its container", 15)
