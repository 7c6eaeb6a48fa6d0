"""Published ports, forwarded host sockets and aliases, on the real daemon.

coi runs as the unprivileged test user. Traffic goes only to listeners these tests make:
the host's loopback (ports the sandboxes publish) and the host's own address on the
project's bridge (to see that nothing listens there); never to another machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import struct
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from tests.conftest import coi_argv, run_coi
from tests.integration.conftest import USER, coi_names, remove_containers, user_dir, wait_for

from coi.backend import IncusClient
from coi.backend.exec import ExecRequest
from coi.errors import SessionError
from coi.sessions.forwards import Published, check_free

# A unix-socket client for the tiny image (busybox has none): connects, sends one line,
# prints the answer. Built static with the host's compiler, mounted in.
CLIENT_C = r"""
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc < 3) return 2;
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a; memset(&a, 0, sizeof a); a.sun_family = AF_UNIX;
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) { perror("connect"); return 1; }
    if (write(fd, argv[2], strlen(argv[2])) < 0 || write(fd, "\n", 1) < 0) return 1;
    char buf[512]; ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0) fwrite(buf, 1, n, stdout);
    return 0;
}
"""


def _coi(uenv: dict[str, str], ws: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_coi(*args, env=uenv, cwd=ws, user=USER, timeout=180)


def _write(path: Path, text: str, user: pwd.struct_passwd) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chown(path.parent, user.pw_uid, user.pw_gid)
    path.write_text(text)
    os.chown(path, user.pw_uid, user.pw_gid)


def _user_config(uenv: dict[str, str], text: str, user: pwd.struct_passwd) -> None:
    """The test user's own (trusted) config file."""
    home = Path(uenv["HOME"])
    user_dir(home / ".config", user)
    _write(home / ".config" / "coi" / "config.toml", text, user)


def _free_block(width: int) -> int:
    """A first port from which `width` ports are free on the host's loopback (bounded)."""
    rng = random.Random()
    for _ in range(50):
        first = rng.randrange(20000, 40000)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + width):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    pytest.fail("no free block of ports on 127.0.0.1")


def _get(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/", timeout=3) as resp:
        return str(resp.read().decode())


def _answers(port: int) -> bool:
    try:
        return "served by" in _get(port)
    except OSError:
        return False


@pytest.fixture
def ws(base: Path, user: pwd.struct_passwd) -> Path:
    return user_dir(base / "ws", user)


@pytest.fixture
def cleanup(client: IncusClient, ws: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """coi processes a test started: ended (SIGTERM: coi removes its sandbox) and waited
    for; then whatever is left of the workspace's containers goes."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.communicate(timeout=60)  # its pipes read to the end and closed
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
    remove_containers(client, ws)


def _serve(uenv: dict[str, str], ws: Path, *args: str) -> subprocess.Popen[str]:
    """`coi run` of a web server on container ports 3000 and `args`' pool port, serving
    the container's name; it runs until the test ends it."""
    script = (
        'mkdir -p /tmp/w && echo "served by $(hostname)" > /tmp/w/index.html && '
        "httpd -p 3000 -h /tmp/w && httpd -p $POOL_PORT -h /tmp/w && exec sleep 300"
    )
    argv = coi_argv("run", "--image", "coi-tiny", "-w", str(ws), *args, "--", "sh", "-c",
                    script, user=USER)  # fmt: skip
    return subprocess.Popen(
        argv, env=uenv, cwd=ws, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _free(port: int) -> bool:
    try:
        check_free([Published(port, 3000)])
    except SessionError:
        return False
    return True


def _bridge_address(client: IncusClient, bridge: str) -> str:
    return client.networks.get(bridge).config["ipv4.address"].split("/")[0]


# -- ports ----------------------------------------------------------------------------------


def test_each_slot_publishes_its_own_ports_on_loopback_only(
    client: IncusClient,
    uenv: dict[str, str],
    ws: Path,
    user: pwd.struct_passwd,
    bridge: str,
    cleanup: list[subprocess.Popen[str]],
) -> None:
    """[ports] pool and map: slot 1 and slot 2 of one workspace each serve port 3000 at
    their own host port on 127.0.0.1; nothing listens on the host's other addresses."""
    p = _free_block(6)
    _user_config(
        uenv,
        f'[ports]\npool = "{p}-{p + 1}"\n[[ports.map]]\nhost = {p + 2}\ncontainer = 3000\n',
        user,
    )
    cleanup.append(_serve(uenv, ws, "--slot", "1", "-e", f"POOL_PORT={p}"))
    wait_for(lambda: _answers(p + 2), "slot 1's server at its published port", 90)
    cleanup.append(_serve(uenv, ws, "--slot", "2", "-e", f"POOL_PORT={p}"))
    wait_for(lambda: _answers(p + 5), "slot 2's server at its published port", 90)
    one, two = sorted(coi_names(client, ws))
    assert one.endswith("-1") and two.endswith("-2")
    # Slot 1 as configured; slot 2 shifted by the width (3): its own port 3000 and pool port.
    assert _get(p + 2) == f"served by {one}\n" and _get(p) == f"served by {one}\n"
    assert _get(p + 5) == f"served by {two}\n" and _get(p + 3) == f"served by {two}\n"

    # Loopback only: the daemon's listeners are on 127.0.0.1, and the host's address on the
    # bridge (the sandboxes' gateway) refuses every published port.
    listening = subprocess.run(
        ["ss", "-Hltn"], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    for port in (p, p + 1, p + 2, p + 3, p + 4, p + 5):
        addrs = {line.split()[3].rsplit(":", 1)[0] for line in listening
                 if line.split() and line.split()[3].endswith(f":{port}")}  # fmt: skip
        assert addrs == {"127.0.0.1"}, (port, addrs)
        with pytest.raises(ConnectionRefusedError), socket.socket() as s:
            s.settimeout(3)
            s.connect((_bridge_address(client, bridge), port))

    # coi list and coi info show the mapping.
    res = _coi(uenv, ws, "list", "--format", "json")
    assert res.returncode == 0, res.stderr
    by_name = {c["name"]: c for c in json.loads(res.stdout)["active_containers"]}
    assert by_name[two]["ports"] == [
        {"bind": "127.0.0.1", "host": p + 3, "container": p, "count": 2},
        {"bind": "127.0.0.1", "host": p + 5, "container": 3000, "count": 1},
    ]
    text = _coi(uenv, ws, "list").stdout
    assert f"Ports: 127.0.0.1:{p}-{p + 1}->{p}-{p + 1}/tcp, 127.0.0.1:{p + 2}->3000/tcp" in text
    info = _coi(uenv, ws, "info", one, "--format", "json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["ports"][1] == {
        "bind": "127.0.0.1", "host": p + 2, "container": 3000, "count": 1,
    }  # fmt: skip
    assert f"127.0.0.1:{p + 5}->3000/tcp" in _coi(uenv, ws, "info", two).stdout


def test_a_port_taken_on_the_host_is_an_error_before_anything_starts(
    client: IncusClient, uenv: dict[str, str], ws: Path, user: pwd.struct_passwd
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        res = _coi(uenv, ws, "run", "--image", "coi-tiny", "-w", str(ws),
                   "--port", f"{port}:3000", "--", "true")  # fmt: skip
        assert res.returncode == 1, res.stderr
        assert f"Error: port {port} is already in use on the host (127.0.0.1:{port})" in res.stderr
        assert "To fix: Stop what listens there" in res.stderr
        assert "Creating container" not in res.stderr
        assert coi_names(client, ws) == []
        # The same from the config's pool (slot 1 publishes it as itself).
        _user_config(uenv, f'[ports]\npool = "{port}"\n', user)
        res = _coi(uenv, ws, "run", "--image", "coi-tiny", "-w", str(ws), "--", "true")
        assert res.returncode == 1 and f"port {port} is already in use" in res.stderr
        assert coi_names(client, ws) == []
    # Freed: a run publishes it, and the next run at once can too (the first one's sandbox,
    # and its listener, are gone when coi returns).
    for _ in range(2):
        res = _coi(uenv, ws, "run", "--image", "coi-tiny", "-w", str(ws), "--", "true")
        assert res.returncode == 0, res.stderr
        assert f"Publishing ports: 127.0.0.1:{port}->{port}/tcp" in res.stderr
        assert coi_names(client, ws) == []


def test_a_port_taken_after_the_check_is_still_a_clear_error(
    client: IncusClient, uenv: dict[str, str], ws: Path
) -> None:
    """The race: a port taken between coi's check and the daemon's listen (played by turning
    coi's first check off). The daemon refuses to start the sandbox with words of its own; coi
    says which port, as the check would, and leaves nothing behind."""
    code = (
        "import coi.sessions.forwards as f\n"
        "real, calls = f.check_free, []\n"
        "def late(*a, **k):\n"
        "    calls.append(1)\n"
        "    return real(*a, **k) if len(calls) > 1 else None\n"
        "f.check_free = late\n"
        "from coi.cli import main\n"
        "raise SystemExit(main())\n"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        argv = coi_argv("run", "--image", "coi-tiny", "-w", str(ws), "--port", f"{port}:3000",
                        "--", "true", user=USER)  # fmt: skip
        argv[argv.index("-m") : argv.index("-m") + 2] = ["-c", code]
        res = subprocess.run(argv, env=uenv, cwd=ws, capture_output=True, text=True, timeout=180)
    assert res.returncode == 1, res.stderr
    assert f"Error: port {port} is already in use on the host" in res.stderr, res.stderr
    assert "the daemon said: " in res.stderr and "proxy device" in res.stderr
    wait_for(lambda: not coi_names(client, ws), "nothing left of the refused sandbox")


def test_a_reused_persistent_sandbox_publishes_this_sessions_ports(
    client: IncusClient,
    uenv: dict[str, str],
    ws: Path,
    cleanup: list[subprocess.Popen[str]],
) -> None:
    """A persistent sandbox made with one --port and reused with another publishes the new
    one only (its device is replaced before it starts again)."""
    a = _free_block(2)
    res = _coi(uenv, ws, "run", "--image", "coi-tiny", "-w", str(ws), "--persistent",
               "--slot", "1", "--port", f"{a}:3000", "--", "true")  # fmt: skip
    assert res.returncode == 0, res.stderr
    (box,) = coi_names(client, ws)
    assert client.instances.get(box).status == "Stopped"
    cleanup.append(
        _serve(
            uenv,
            ws,
            "--persistent",
            "--slot",
            "1",
            "--port",
            f"{a + 1}:3000",
            "-e",
            "POOL_PORT=3001",
        )
    )
    wait_for(lambda: _answers(a + 1), "the reused sandbox at its new port", 90)
    assert _get(a + 1) == f"served by {box}\n"
    with pytest.raises(ConnectionRefusedError), socket.socket() as s:
        s.settimeout(3)
        s.connect(("127.0.0.1", a))
    devices = client.instances.get(box).devices
    assert devices["coi-ports"]["listen"] == f"tcp:127.0.0.1:{a + 1}"


# -- sockets --------------------------------------------------------------------------------


class SocketServer:
    """A unix socket server on the host: answers each line with who connected (the peer's
    uid from the kernel) and what it said; bounded, in a thread of the test."""

    def __init__(self, path: Path, owner: int, tag: str) -> None:
        self.path, self.tag = path, tag
        self.peers: list[int] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chown(path, owner, owner)
        os.chmod(path, 0o600)
        self.sock.listen(8)
        self.sock.settimeout(1.0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          12))[1]  # fmt: skip
                self.peers.append(uid)
                data = b""
                with contextlib.suppress(OSError):
                    while not data.endswith(b"\n") and len(data) < 200:
                        chunk = conn.recv(100)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(f"{self.tag} uid={uid} got={data.decode().strip()}\n".encode())

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(5)
        self.path.unlink(missing_ok=True)


@pytest.fixture
def uc(tmp_path: Path) -> Iterator[Path]:
    """A folder holding the static unix-socket client, world-readable (mounted in)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.fail("no C compiler on the host for the socket client (apt-get install gcc)")
    d = Path(f"/tmp/coi-uc-{os.getpid()}-{random.randrange(1 << 30)}")
    d.mkdir(mode=0o755)
    try:
        src = tmp_path / "uc.c"
        src.write_text(CLIENT_C)
        subprocess.run([cc, "-static", "-O2", "-o", str(d / "uc"), str(src)], check=True)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def servers(base: Path, user: pwd.struct_passwd) -> Iterator[dict[str, SocketServer]]:
    made = {
        # the user's own sockets (0600, theirs) and one only root may open
        "app": SocketServer(base / "app.sock", user.pw_uid, "app-answer"),
        "agent": SocketServer(base / "agent.sock", user.pw_uid, "agent-answer"),
        "root": SocketServer(base / "root.sock", 0, "root-answer"),
    }
    yield made
    for s in made.values():
        s.close()


def test_host_socket_answers_inside_as_the_agent_user(
    client: IncusClient,
    uenv: dict[str, str],
    ws: Path,
    base: Path,
    user: pwd.struct_passwd,
    uc: Path,
    servers: dict[str, SocketServer],
) -> None:
    """[[sockets]] and [ssh] forward_agent from the user's config: inside, the agent user
    owns the sockets (0600) and reaches the host servers, which see the user who ran coi
    connect, never root; a host socket only root may open stays closed to the sandbox."""
    _user_config(
        uenv,
        f'[[sockets]]\nhost = "{base / "app.sock"}"\ncontainer = "/tmp/app.sock"\n'
        f'[[sockets]]\nhost = "{base / "root.sock"}"\ncontainer = "/tmp/root.sock"\n'
        "[ssh]\nforward_agent = true\n",
        user,
    )
    env = {**uenv, "SSH_AUTH_SOCK": str(base / "agent.sock")}
    script = (
        'id -u; ls -ln /tmp/app.sock "$SSH_AUTH_SOCK"; echo "auth=$SSH_AUTH_SOCK"; '
        '/opt/t/uc /tmp/app.sock ping; /opt/t/uc "$SSH_AUTH_SOCK" sign-this; '
        "/opt/t/uc /tmp/root.sock let-me-in; echo done"
    )
    res = run_coi("run", "--image", "coi-tiny", "-w", str(ws), "--mount", f"{uc}:/opt/t",
                  "--", "sh", "-c", script, env=env, cwd=ws, user=USER, timeout=180)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert out.splitlines()[0] == "1000"
    for line in [x for x in out.splitlines() if x.startswith("srw")]:
        assert line.split()[:4] == ["srw-------", "1", "1000", "1000"], line
    assert "auth=/tmp/coi-ssh-agent.sock" in out
    assert f"app-answer uid={user.pw_uid} got=ping" in out
    assert f"agent-answer uid={user.pw_uid} got=sign-this" in out
    assert "root-answer" not in out and servers["root"].peers == []
    assert servers["app"].peers == [user.pw_uid] and servers["agent"].peers == [user.pw_uid]
    assert "SSH agent forwarded" in res.stderr and "done" in out
    wait_for(lambda: not coi_names(client, ws), "the sandbox to go")


def test_untrusted_workspace_cannot_forward_sockets_or_publish(
    client: IncusClient,
    uenv: dict[str, str],
    ws: Path,
    base: Path,
    user: pwd.struct_passwd,
    uc: Path,
    servers: dict[str, SocketServer],
) -> None:
    """The attacker's .coi.toml (the agent wrote it, or a cloned repository brought it) asks
    for the user's sockets, their SSH agent and ports on every address: all dropped, said on
    stderr; inside there is no socket and no SSH_AUTH_SOCK, and no port is published."""
    port = _free_block(1)
    _write(
        ws / ".coi.toml",
        f'[[sockets]]\nhost = "{base / "app.sock"}"\ncontainer = "/tmp/evil.sock"\n'
        "[ssh]\nforward_agent = true\n"
        f'[ports]\npool = "{port}"\nbind = "0.0.0.0"\n',
        user,
    )
    env = {**uenv, "SSH_AUTH_SOCK": str(base / "agent.sock")}
    script = (
        'echo "auth=[$SSH_AUTH_SOCK]"; echo "tmp=[$(ls /tmp | tr "\\n" " ")]"; '
        "/opt/t/uc /tmp/evil.sock steal; /opt/t/uc /tmp/coi-ssh-agent.sock sign; echo done"
    )
    res = run_coi("run", "--image", "coi-tiny", "-w", str(ws), "--mount", f"{uc}:/opt/t",
                  "--", "sh", "-c", script, env=env, cwd=ws, user=USER, timeout=180)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    err = res.stderr
    assert f"Warning: {ws / '.coi.toml'} is not trusted; these settings from it are dropped" in err
    for key in (
        "sockets = ",
        "ssh.forward_agent = true",
        "ports.pool = ",
        'ports.bind = "0.0.0.0"',
    ):
        assert key in err, key
    assert "auth=[]" in res.stdout and "done" in res.stdout
    (listing,) = [x for x in res.stdout.splitlines() if x.startswith("tmp=")]
    assert "evil.sock" not in listing and "coi-ssh-agent" not in listing
    assert "answer" not in res.stdout
    assert servers["app"].peers == [] and servers["agent"].peers == []
    assert "Publishing ports" not in err and "SSH agent forwarded" not in err


# -- aliases --------------------------------------------------------------------------------


def test_names_people_choose(
    client: IncusClient,
    uenv: dict[str, str],
    ws: Path,
    unique: str,
    cleanup: list[subprocess.Popen[str]],
) -> None:
    """--name: shown in coi list, coi info NAME, coi attach NAME; unique; coi alias sets,
    lists and removes; coi kill NAME ends it."""
    name = f"web-{unique}"
    argv = coi_argv("run", "--image", "coi-tiny", "-w", str(ws), "--name", name, "--",
                    "sleep", "300", user=USER)  # fmt: skip
    cleanup.append(subprocess.Popen(argv, env=uenv, cwd=ws, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    wait_for(lambda: bool(coi_names(client, ws)) and client.instances.get(
        coi_names(client, ws)[0]).running, "the named sandbox", 90)  # fmt: skip
    (box,) = coi_names(client, ws)
    assert client.instances.get(box).config["user.coi.alias"] == name

    listed = json.loads(_coi(uenv, ws, "list", "--format", "json").stdout)
    assert [c["alias"] for c in listed["active_containers"] if c["name"] == box] == [name]
    assert f"Alias: {name}" in _coi(uenv, ws, "list").stdout
    info = _coi(uenv, ws, "info", name, "--format", "json")
    assert info.returncode == 0 and json.loads(info.stdout)["name"] == box, info.stderr
    aliases = json.loads(_coi(uenv, ws, "alias", "--list", "--format", "json").stdout)
    assert {"alias": name, "container": box} in aliases

    # Unique: a second sandbox may not take the name, and none is left behind trying.
    res = _coi(uenv, ws, "run", "--image", "coi-tiny", "-w", str(ws), "--name", name, "--", "true")
    assert res.returncode == 1 and f"the name '{name}' is taken by container {box}" in res.stderr
    wait_for(lambda: coi_names(client, ws) == [box], "only the named sandbox to remain")
    res = _coi(uenv, ws, "alias", "other-name", box)  # another name for the same container
    assert res.returncode == 0 and f"other-name -> {box}" in res.stdout, res.stderr
    res = _coi(uenv, ws, "alias", "--remove", "other-name")
    assert res.returncode == 0 and f"Removed alias other-name from {box}" in res.stdout
    assert (
        "user.coi.alias" not in client.instances.get(box).config
        or not client.instances.get(box).config["user.coi.alias"]
    )
    assert _coi(uenv, ws, "alias", name, box).returncode == 0

    # Attach by the name: a shell in that very container.
    child = pexpect.spawn(*_split(coi_argv("attach", name, "--bash", user=USER)), env=uenv,
                          encoding="utf-8", timeout=60)  # fmt: skip
    try:
        child.sendline("echo at-$(hostname)-x")
        child.expect(f"at-{box}-x")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)

    res = _coi(uenv, ws, "kill", name)
    assert res.returncode == 0 and f"Killed {box}" in res.stdout, res.stdout + res.stderr
    wait_for(lambda: not coi_names(client, ws), "the killed sandbox to go")


def _split(argv: list[str]) -> tuple[str, list[str]]:
    return argv[0], argv[1:]


def test_a_named_shell_publishes_and_is_shut_down_by_its_name(
    client: IncusClient, uenv: dict[str, str], ws: Path, unique: str
) -> None:
    """`coi shell --background --name N --port P:3000`: the agent's server answers at P, coi
    info N shows it, coi shutdown N ends the sandbox and frees the port."""
    name, port = f"shell-{unique}", _free_block(1)
    res = _coi(uenv, ws, "shell", "--background", "--debug", "--image", "coi-tiny", "-w",
               str(ws), "--name", name, "--port", f"{port}:3000")  # fmt: skip
    try:
        assert res.returncode == 0, res.stderr
        (box,) = coi_names(client, ws)
        serve = 'mkdir -p /tmp/w && echo "served by $(hostname)" > /tmp/w/index.html && ' \
            "httpd -p 3000 -h /tmp/w"  # fmt: skip
        req = ExecRequest(["sh", "-c", serve], user=1000, group=1000)
        assert client.exec.quiet(box, req) == 0
        wait_for(lambda: _answers(port), "the shell's server at its published port", 30)
        assert _get(port) == f"served by {box}\n"
        info = json.loads(_coi(uenv, ws, "info", name, "--format", "json").stdout)
        assert (info["name"], info["alias"], info["kind"]) == (box, name, "shell")
        assert info["ports"] == [{"bind": "127.0.0.1", "host": port, "container": 3000, "count": 1}]
        # coi tmux by the name too.
        sent = _coi(uenv, ws, "tmux", "send", name, "echo by-$((40+2))-name")
        assert sent.returncode == 0 and f"coi-{box}" in sent.stdout, sent.stdout + sent.stderr
        wait_for(lambda: "by-42-name" in _coi(uenv, ws, "tmux", "capture", name).stdout,
                 "the command typed by the name to show", 15)  # fmt: skip
        res = _coi(uenv, ws, "shutdown", name, "--timeout", "5")
        assert res.returncode == 0 and f"Shutdown {box}" in res.stdout, res.stdout + res.stderr
        assert coi_names(client, ws) == []
        # Not asserted: that the port is free again at once. The daemon's proxy process may
        # hold it after the container is gone, in the final CI run of 2026-12-06 for over a
        # minute (docs/network.md); coi's next session on it says so clearly.
    finally:
        remove_containers(client, ws)
