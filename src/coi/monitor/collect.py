"""Collect a container's processes, connections and I/O from the host's /proc and cgroups.

Nothing here runs inside the container, so the agent cannot stop or fool it: a process it
hides from `ps` inside is still in the container's cgroup, and its sockets are still in the
network namespace the host reads through /proc/<init>/net.
"""

from __future__ import annotations

import ipaddress
import os
import signal
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


def cgroup_kill(cgdir: Path) -> bool:
    """SIGKILL every process of the container's cgroup tree at once, from the host: the cgroup
    v2 `cgroup.kill` (Linux 5.14+; the kernel walks the tree, nothing forks away meanwhile),
    in the unified hierarchy of a hybrid host too (where `cgdir` may be the v1 pids one).
    Else freeze (`cgroup_freeze`, which waits until the kernel has stopped every process, so
    none forks away between the listing and the kills), kill each process, thaw. False when
    neither works (not root): the caller asks the daemon instead."""
    name = cgdir.name
    for d in (cgdir, *(root / name for root in CGROUP_ROOTS)):
        try:
            _write(d / "cgroup.kill", "1")
        except OSError:
            continue
        return True
    found = _freezer(cgdir)
    if found is None:
        return False
    try:
        if not cgroup_freeze(cgdir):
            return False
        for pid in cgroup_pids(found[0].parent):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return True
    finally:
        cgroup_freeze(cgdir, thaw=True)  # the kills land on thaw; a half-done freeze is undone


def _write(path: Path, value: str) -> None:
    """Write a cgroup control file that must exist: never created (a missing one means this
    kernel or hierarchy lacks it)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _freezer(cgdir: Path) -> tuple[Path, Path, str, str] | None:
    """The freezer the daemon uses for this container: (control file, state file, what to
    write to freeze, what the state says once frozen); the v1 one where it is mounted, as
    liblxc does, else v2's `cgroup.freeze`. None: no freezer (not mounted, or gone)."""
    name = cgdir.name
    v1 = cgdir.parent.parent / "freezer" / name
    if (v1 / "freezer.state").is_file():
        return v1 / "freezer.state", v1 / "freezer.state", "FROZEN", "FROZEN"
    for d in (cgdir, *(r / name for r in CGROUP_ROOTS)):
        if (d / "cgroup.freeze").is_file():
            return d / "cgroup.freeze", d / "cgroup.events", "1", "frozen 1"
    return None


def cgroup_freeze(cgdir: Path, *, thaw: bool = False, timeout: float = 1.0) -> bool:
    """Freeze (or thaw) every process of the container's cgroup from the host, in the freezer
    the daemon uses (`_freezer`), and wait until the kernel says it is done. False when it
    cannot (not root, no freezer) or is not done within `timeout`: the caller asks the
    daemon instead.

    Why: liblxc polls a v1 freezer once a second, so the daemon's freeze of a container whose
    processes were busy forking took 1 s more in one case in three; a flood went on
    meanwhile. Frozen here first, the daemon's freeze finds it done at its first look."""
    found = _freezer(cgdir)
    if found is None:
        return False
    control, state, value, done = found
    if thaw:
        value, done = ("THAWED", "THAWED") if value == "FROZEN" else ("0", "frozen 0")
    deadline = time.monotonic() + timeout
    try:
        _write(control, value)
        while done not in state.read_text().splitlines():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
    except OSError:
        return False
    return True


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
    # The pipes it holds open for reading and for writing ("pipe:[123]"), from fdinfo.
    pipes_r: set[str] = field(default_factory=set)
    pipes_w: set[str] = field(default_factory=set)

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
            if target.startswith("pipe:"):
                _pipe_end(proc, base / "fdinfo" / fd, target)
    except OSError:
        pass


def _pipe_end(proc: Proc, fdinfo: Path, pipe: str) -> None:
    """Which end of the pipe the fd is (its open flags: O_RDONLY or O_WRONLY)."""
    try:
        with open(fdinfo) as f:
            for line in f:
                if line.startswith("flags:"):
                    mode = int(line.split()[1], 8) & 3
                    (proc.pipes_w if mode == os.O_WRONLY else proc.pipes_r).add(pipe)
                    return
    except (OSError, ValueError, IndexError):
        pass


# (bytes read, bytes written, pipes read from, pipes written to) of one process over a span.
PipeIO = tuple[int, int, "frozenset[str] | set[str]", "frozenset[str] | set[str]"]


def through_pipes(ios: list[PipeIO]) -> int:
    """Bytes that went from one of the container's processes to another through a pipe, as
    best the counters tell: `rchar` and `wchar` count a pipe's bytes twice (written by one,
    read by the other: `tar -c | gzip` reads a tree once and counts it twice). Per pipe with
    a writer and a reader among `ios`, the lesser of what its writers wrote and its readers
    read; each process's bytes are discounted once at most, whatever number of pipes it holds.
    A pipe whose other end is outside the container (`coi run`'s output) is not one of these."""
    left_r = [i[0] for i in ios]
    left_w = [i[1] for i in ios]
    readers: dict[str, list[int]] = {}
    writers: dict[str, list[int]] = {}
    for n, (_r, _w, pr, pw) in enumerate(ios):
        for p in pr:
            readers.setdefault(p, []).append(n)
        for p in pw:
            writers.setdefault(p, []).append(n)
    total = 0
    for p in sorted(readers.keys() & writers.keys()):
        amount = min(sum(left_r[n] for n in readers[p]), sum(left_w[n] for n in writers[p]))
        total += amount
        for side, who in ((left_r, readers[p]), (left_w, writers[p])):
            due = amount
            for n in who:
                take = min(due, side[n])
                side[n] -= take
                due -= take
    return total


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
        self._exited: list[PipeIO] = []
        self._execs: list[Proc] = []
        # The pipe ends each known process held when last looked at (at its exec, at a
        # sweep): what its I/O at exit went through.
        self._pipes: dict[int, Proc] = {}
        self._parent: dict[int, int] = {}  # child -> parent, from fork events
        # Bytes (read, written) of exited children their parent's /proc/<pid>/io will grow by
        # when it reaps them (the kernel adds a reaped child's counters to its parent's): they
        # were counted from the child's exit record, and are not counted again.
        self._reaped: dict[int, list[int]] = {}
        self._links: dict[int, tuple[set[str], set[str]]] = {}  # (reads, writes): note_fork
        self._orphans: list[tuple[int, int]] = []  # (parent, child) that exited

    def note_exec(self, proc: Proc) -> None:
        """A process of the container seen at exec time (it may be gone by the next sweep)."""
        with self._lock:
            self._known.add(proc.pid)
            self._execs.append(proc)
            self._pipes[proc.pid] = proc  # its fds are read just after, into the same Proc

    def note_fork(self, parent: int, child: int) -> None:
        """A process forked by one of the container's: its I/O counts when it exits, even if
        it never execs (a subshell reading a file in a loop) and lives less than a sweep."""
        if parent in self._known:  # a set lookup, no lock: every fork on the host comes here
            with self._lock:
                self._known.add(child)
                self._parent[child] = parent
                # A parent and its child may talk through a pipe the parent made around the
                # fork (busybox `tar -z` forks its gzip and feeds it, or reads from it): two
                # channels, one each way, that the pipe accounting may match when neither
                # end's fds were seen (the child lives less than a sweep, never execs).
                up, down = f"fork:{child}:up", f"fork:{child}:down"
                self._links[child] = ({down}, {up})
                mine = self._links.setdefault(parent, (set(), set()))
                mine[0].add(up)
                mine[1].add(down)

    def note_exit(self, pid: int, read: int, write: int) -> None:
        """Final I/O totals of an exiting task; counted if it was the container's."""
        with self._lock:
            if pid not in self._known:
                return
            self._known.discard(pid)
            seen_r, seen_w = self._last_io.pop(pid, (0, 0))
            p = self._pipes.pop(pid, None)
            # What its parent will be credited with when it reaps it: its own totals, and
            # what it reaped itself and no sweep saw it credited with.
            left = self._reaped.pop(pid, [0, 0])
            if (parent := self._parent.pop(pid, None)) is not None:
                due = self._reaped.setdefault(parent, [0, 0])
                due[0] += read + left[0]
                due[1] += write + left[1]
                # Its channels to its parent go after the next sweep, not now: the parent's
                # own exit may come after this one and be matched with it.
                self._orphans.append((parent, pid))
            lr, lw = self._links.pop(pid, (set(), set()))
            try:  # copies: the exec watcher's thread may still be filling them
                pr, pw = (p.pipes_r | lr, p.pipes_w | lw) if p else (lr, lw)
            except RuntimeError:
                pr, pw = lr, lw
            self._exited.append((max(0, read - seen_r), max(0, write - seen_w), pr, pw))

    def sweep(self, *, fresh: bool = False) -> Sweep:
        """`fresh`: read the connection tables whatever (an exec or a flow asked)."""
        now = time.monotonic()
        procs = [p for pid in cgroup_pids(self.cgdir) if (p := read_proc(pid, files=self.files))]
        with self._lock:
            execs, self._execs = self._execs, []
            ios, self._exited = self._exited, []
            self._known.update(p.pid for p in procs)
            self._last_io.update({p.pid: (p.io_read, p.io_write) for p in procs if p.io_read >= 0})
            for p in procs:
                if self.files:
                    self._pipes[p.pid] = p
            if len(self._pipes) + len(self._parent) > 4 * len(self._known) + 64:
                # Exits the watcher missed.
                self._pipes = {k: v for k, v in self._pipes.items() if k in self._known}
                self._parent = {k: v for k, v in self._parent.items() if k in self._known}
                self._reaped = {k: v for k, v in self._reaped.items() if k in self._known}
                self._links = {k: v for k, v in self._links.items() if k in self._known}
            reaped = {p.pid: self._reaped.pop(p.pid) for p in procs if p.pid in self._reaped}
            links = {
                p.pid: (set(lk[0]), set(lk[1])) for p in procs if (lk := self._links.get(p.pid))
            }
            for parent, child in self._orphans:
                if (pl := self._links.get(parent)) is not None:
                    pl[0].discard(f"fork:{child}:up")
                    pl[1].discard(f"fork:{child}:down")
            self._orphans.clear()
        live = {p.key for p in procs}
        new = [p for p in procs if self._cmd.get(p.key) != p.cmdline]
        # Short-lived processes the exec watcher caught count as spawned too.
        new += [p for p in execs if p.key not in live and p.key not in self._cmd]
        read, write = sum(i[0] for i in ios), sum(i[1] for i in ios)
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
            dr, dw = max(0, p.io_read - base_r), max(0, p.io_write - base_w)
            if (due := reaped.get(p.pid)) is not None:
                # Its reaped children's bytes, counted at their exits already.
                take_r, take_w = min(due[0], dr), min(due[1], dw)
                dr, dw = dr - take_r, dw - take_w
                due[0] -= take_r
                due[1] -= take_w
            read, write = read + dr, write + dw
            lr, lw = links.get(p.pid, (set(), set()))
            if p.pipes_r or p.pipes_w or lr or lw:
                ios.append((dr, dw, p.pipes_r | lr, p.pipes_w | lw))
        with self._lock:
            for pid, due in reaped.items():
                if due[0] or due[1]:  # not reaped yet: at a later sweep
                    more = self._reaped.setdefault(pid, [0, 0])
                    more[0] += due[0]
                    more[1] += due[1]
        # A pipe's bytes once: read from the tree, not again from the pipe.
        piped = through_pipes(ios)
        read, write = read - piped, write - piped
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
