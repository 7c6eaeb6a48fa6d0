"""Collect a container's processes, connections and I/O from the host's /proc and cgroups.

Nothing here runs inside the container, so the agent cannot stop or fool it: a process it
hides from `ps` inside is still in the container's cgroup, and its sockets are still in the
network namespace the host reads through /proc/<init>/net.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Where LXD and Incus (both liblxc) put a container's cgroup, v1 hierarchies and v2.
CGROUP_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def cgroup_name(project: str, name: str) -> str:
    return name if project in ("", "default") else f"{project}_{name}"


def cgroup_dir(project: str, name: str) -> Path | None:
    cg = f"lxc.payload.{cgroup_name(project, name)}"
    for root in CGROUP_ROOTS:
        d = root / cg
        if (d / "cgroup.procs").is_file():
            return d
    return None


def cgroup_pids(cgdir: Path) -> list[int]:
    """Every process in the container's cgroup tree (systemd inside makes sub-cgroups)."""
    pids: list[int] = []
    for root, _dirs, files in os.walk(cgdir):
        if "cgroup.procs" in files:
            try:
                text = Path(root, "cgroup.procs").read_text()
            except OSError:
                continue
            pids.extend(int(p) for p in text.split())
    return pids


@dataclass
class Proc:
    """One process as the host sees it."""

    pid: int  # host pid
    nspid: int  # pid inside the container
    ppid: int  # host pid of the parent
    uid: int  # host uid
    cmdline: str
    start: int  # start time in clock ticks: (pid, start) identifies a process
    io_read: int = -1  # bytes read (rchar); -1 when not readable by this user
    io_write: int = -1
    files: list[str] = field(default_factory=list)  # open files, when readable
    # What standard input, output and error are (fd -> link target, e.g. "socket:[123]").
    stdio: dict[int, str] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start)

    @property
    def name(self) -> str:
        return os.path.basename(self.cmdline.split(" ", 1)[0]) if self.cmdline else ""


def read_proc(pid: int, *, files: bool = False) -> Proc | None:
    base = Path(f"/proc/{pid}")
    try:
        raw = (base / "cmdline").read_bytes()
        status = (base / "status").read_text()
        stat = (base / "stat").read_text()
    except OSError:
        return None  # gone already
    cmd = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    fields: dict[str, str] = {}
    for line in status.splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    nspid = fields.get("NSpid", str(pid)).split()
    start = int(stat.rsplit(")", 1)[1].split()[19])
    proc = Proc(
        pid=pid,
        nspid=int(nspid[-1]),
        ppid=int(fields.get("PPid", "0")),
        uid=int(fields.get("Uid", "0").split()[0]),
        cmdline=cmd or f"[{fields.get('Name', '?')}]",
        start=start,
    )
    try:
        for line in (base / "io").read_text().splitlines():
            k, _, v = line.partition(":")
            if k == "rchar":
                proc.io_read = int(v)
            elif k == "wchar":
                proc.io_write = int(v)
    except OSError:
        pass  # another user's process: /proc/<pid>/io needs ptrace rights
    if files:
        read_fds(proc, base)
    return proc


def read_fds(proc: Proc, base: Path) -> None:
    """The process's open files, and what its fds 0-2 are (needs ptrace rights: root)."""
    try:
        for fd in os.listdir(base / "fd"):
            try:
                target = os.readlink(base / "fd" / fd)
            except OSError:
                continue
            proc.files.append(target)
            if fd in ("0", "1", "2"):
                proc.stdio[int(fd)] = target
    except OSError:
        pass


@dataclass(frozen=True)
class Conn:
    proto: str
    local: str
    remote: str
    state: str
    uid: int
    inode: int = 0  # the socket's inode: what /proc/<pid>/fd/N links to, as socket:[inode]

    @property
    def remote_ip(self) -> str:
        return self.remote.rsplit(":", 1)[0].strip("[]")

    @property
    def remote_port(self) -> int:
        return int(self.remote.rsplit(":", 1)[1])


def _addr(hexaddr: str, v6: bool) -> str:
    ip_hex, port_hex = hexaddr.split(":")
    raw = bytes.fromhex(ip_hex)
    if v6:
        packed = b"".join(struct.pack("<I", w) for w in struct.unpack(">4I", raw))
        ip = ipaddress.IPv6Address(packed)
        text = str(ip.ipv4_mapped or ip)
        return f"{text}:{int(port_hex, 16)}" if ip.ipv4_mapped else f"[{text}]:{int(port_hex, 16)}"
    return f"{socket.inet_ntoa(struct.pack('<I', int(ip_hex, 16)))}:{int(port_hex, 16)}"


def read_connections(init_pid: int) -> list[Conn]:
    """Sockets with a remote end in the container's network namespace (listeners skipped)."""
    out: list[Conn] = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/{init_pid}/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 8:
                continue
            local, remote = (
                _addr(parts[1], proto.endswith("6")),
                _addr(parts[2], proto.endswith("6")),
            )
            if remote.endswith(":0"):
                continue  # a listener or an unconnected UDP socket
            state = TCP_STATES.get(parts[3], parts[3]) if proto.startswith("tcp") else "UDP"
            inode = int(parts[9]) if len(parts) > 9 and parts[9].isdigit() else 0
            out.append(Conn(proto.rstrip("6"), local, remote, state, int(parts[7]), inode))
    return out


# The longest the connection tables go unread while no process opens a socket.
CONN_REFRESH = 2.0


@dataclass
class Sweep:
    """What one pass found, with what is new since the previous pass."""

    at: float
    processes: list[Proc]
    new_processes: list[Proc]
    connections: list[Conn]
    new_connections: list[Conn]
    read_bytes: int
    write_bytes: int
    interval: float
    io_visible: bool
    tmp: tuple[int, int] | None = None  # (used, total) bytes of /tmp, when coi may look


class Collector:
    """Keeps what it saw last, so each sweep reports what is new."""

    def __init__(self, cgdir: Path, init_pid: int, *, files: bool = True) -> None:
        self.cgdir = cgdir
        self.init_pid = init_pid
        self.files = files
        self._seen: dict[tuple[int, int], Proc] = {}
        self._cmd: dict[tuple[int, int], str] = {}
        self._conns: set[Conn] = set()
        self._held: frozenset[str] = frozenset()  # socket fds held at the last table read
        self._conn_at = -1e9
        self._last = time.monotonic()
        self._primed = False
        # Fed by the exec and exit watchers (other threads) when coi runs as root.
        self._lock = threading.Lock()
        self._known: set[int] = set()
        self._last_io: dict[int, tuple[int, int]] = {}
        self._exited = [0, 0]
        self._execs: list[Proc] = []

    def note_exec(self, proc: Proc) -> None:
        """A process of the container seen at exec time (it may be gone by the next sweep)."""
        with self._lock:
            self._known.add(proc.pid)
            self._execs.append(proc)

    def note_fork(self, parent: int, child: int) -> None:
        """A process forked by one of the container's: its I/O counts when it exits, even if
        it never execs (a subshell reading a file in a loop) and lives less than a sweep."""
        if parent in self._known:  # a set lookup, no lock: every fork on the host comes here
            with self._lock:
                self._known.add(child)

    def note_exit(self, pid: int, read: int, write: int) -> None:
        """Final I/O totals of an exiting task; counted if it was the container's."""
        with self._lock:
            if pid not in self._known:
                return
            self._known.discard(pid)
            seen_r, seen_w = self._last_io.pop(pid, (0, 0))
            self._exited[0] += max(0, read - seen_r)
            self._exited[1] += max(0, write - seen_w)

    def sweep(self, *, fresh: bool = False) -> Sweep:
        """`fresh`: read the connection tables whatever (an exec or a flow asked)."""
        now = time.monotonic()
        procs = [p for pid in cgroup_pids(self.cgdir) if (p := read_proc(pid, files=self.files))]
        with self._lock:
            execs, self._execs = self._execs, []
            (read, write), self._exited = self._exited, [0, 0]
            self._known.update(p.pid for p in procs)
            self._last_io.update({p.pid: (p.io_read, p.io_write) for p in procs if p.io_read >= 0})
        live = {p.key for p in procs}
        new = [p for p in procs if self._cmd.get(p.key) != p.cmdline]
        # Short-lived processes the exec watcher caught count as spawned too.
        new += [p for p in execs if p.key not in live and p.key not in self._cmd]
        visible = bool(read or write)
        for p in procs:
            if p.io_read < 0:
                continue
            visible = True
            old = self._seen.get(p.key)
            # A process seen for the first time counts whole (it may have done it all already),
            # except on the very first sweep, where history is not news.
            base_r = (
                old.io_read if old and old.io_read >= 0 else (p.io_read if not self._primed else 0)
            )
            base_w = (
                old.io_write
                if old and old.io_write >= 0
                else (p.io_write if not self._primed else 0)
            )
            read += max(0, p.io_read - base_r)
            write += max(0, p.io_write - base_w)
        self._seen = {p.key: p for p in procs}
        self._cmd = {p.key: p.cmdline for p in procs}
        # The namespace's TCP and UDP tables cost most of a sweep (the kernel walks its whole
        # socket hash to print them): read when a process holds a socket it did not hold at
        # the last read, when some process's fds cannot be read, or every CONN_REFRESH s.
        held = frozenset(f for p in procs for f in p.files if f.startswith("socket:"))
        blind = not self.files or any(not p.files for p in procs)
        if fresh or blind or held - self._held or now - self._conn_at >= CONN_REFRESH:
            conns = read_connections(self.init_pid)
            new_conns = [c for c in conns if c not in self._conns]
            self._conns, self._held, self._conn_at = set(conns), held, now
        else:
            conns, new_conns = list(self._conns), []
            self._held = held
        interval = max(now - self._last, 1e-3)
        self._last = now
        self._primed = True
        return Sweep(
            time.time(), procs, new, conns, new_conns, read, write, interval, visible, self._tmp()
        )

    def _tmp(self) -> tuple[int, int] | None:
        """/tmp of the container through its init's root (needs ptrace rights: root)."""
        try:
            st = os.statvfs(f"/proc/{self.init_pid}/root/tmp")
        except OSError:
            return None
        total = st.f_blocks * st.f_frsize
        return (total - st.f_bfree * st.f_frsize, total)
