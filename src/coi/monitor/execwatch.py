"""Every exec on the host as it happens (the kernel's proc connector); needs root.

Polling /proc every interval misses what lives a few milliseconds, such as `env | grep key`.
The proc connector reports each exec the moment it happens; the watcher keeps those of one
container (by cgroup) and reads their command line before they are gone.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable

from coi.monitor.collect import Proc, read_proc
from coi.monitor.netlink import NetlinkReader

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
NLMSG_DONE = 3
_NLMSG = struct.Struct("=IHHII")
_CNMSG = struct.Struct("=IIIIHH")
_EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_EXEC = struct.Struct("=II")  # process_pid, process_tgid
_FORK = struct.Struct("=IIII")  # parent_pid, parent_tgid, child_pid, child_tgid


def available() -> bool:
    return os.geteuid() == 0


def filters_events(release: str) -> bool:
    """Linux 6.6 and later take a filter with the subscription (struct proc_input): only
    the listed event types reach this socket, not every exit, uid change and comm change on
    the host (on a busy host that halves the wake-ups)."""
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (6, 6)


def _subscribe(sock: socket.socket) -> None:
    if filters_events(os.uname().release):
        op = struct.pack("=II", PROC_CN_MCAST_LISTEN, PROC_EVENT_FORK | PROC_EVENT_EXEC)
    else:
        op = struct.pack("=I", PROC_CN_MCAST_LISTEN)
    cn = _CNMSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(op), 0)
    hdr = _NLMSG.pack(_NLMSG.size + len(cn) + len(op), NLMSG_DONE, 0, 0, os.getpid())
    sock.send(hdr + cn + op)


def in_cgroup(path: str, marker: str) -> bool:
    """Is this cgroup path the container's (`/lxc.payload.NAME`) or below it?"""
    root = "/" + marker
    return path == root or path.startswith(root + "/")


def pid_inside(pid: int, marker: str) -> bool:
    """Is the process in the container's cgroup (`lxc.payload.NAME`) or below it?"""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
    except OSError:
        return False
    return any(in_cgroup(line.split(":", 2)[-1], marker) for line in text.splitlines())


def parse_exec(data: bytes) -> list[int]:
    """Pids (tgids) of the exec events in one netlink datagram."""
    return [pid for kind, pid, _parent in parse_events(data) if kind == PROC_EVENT_EXEC]


def parse_events(data: bytes) -> list[tuple[int, int, int]]:
    """(kind, tgid, parent tgid) of the exec and fork events in one netlink datagram; a fork
    that makes a thread, not a process, is left out (the parent is 0 for an exec)."""
    out: list[tuple[int, int, int]] = []
    off = 0
    while off + _NLMSG.size <= len(data):
        length = _NLMSG.unpack_from(data, off)[0]
        if length < _NLMSG.size:
            break
        body = off + _NLMSG.size + _CNMSG.size
        if body + _EVENT.size + _EXEC.size <= off + length:
            what = _EVENT.unpack_from(data, body)[0]
            if what == PROC_EVENT_EXEC:
                out.append((what, _EXEC.unpack_from(data, body + _EVENT.size)[1], 0))
            elif what == PROC_EVENT_FORK and body + _EVENT.size + _FORK.size <= off + length:
                _ppid, ptgid, cpid, ctgid = _FORK.unpack_from(data, body + _EVENT.size)
                if cpid == ctgid:
                    out.append((what, ctgid, ptgid))
        off += (length + 3) & ~3
    return out


class ExecWatcher(NetlinkReader):
    """Calls `on_exec` with each process that execs inside the container's cgroup."""

    name = "coi-exec-watch"

    def __init__(
        self,
        cgroup_marker: str,
        on_exec: Callable[[Proc], None],
        *,
        per_second: int = 100,
        on_fork: Callable[[int, int], None] | None = None,
    ) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        # A large buffer: an exec storm must not drop the event we care about.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((0, CN_IDX_PROC))
        _subscribe(sock)
        super().__init__(sock)
        self.marker = cgroup_marker  # e.g. "lxc.payload.coi-abc-1" (never a prefix match)
        self.on_exec = on_exec
        # (parent, child) of every fork on the host: cheap (no /proc read), and the only
        # trace of a subshell that never execs (its I/O is counted when it exits).
        self.on_fork = on_fork
        self.per_second = per_second
        self.skipped = 0  # execs of the container not inspected (over the rate limit)
        self._window = (0.0, 0)

    def _inside(self, pid: int) -> bool:
        return pid_inside(pid, self.marker)

    def handle(self, data: bytes) -> None:
        for kind, pid, parent in parse_events(data):
            if kind == PROC_EVENT_FORK:
                if self.on_fork is not None:
                    self.on_fork(parent, pid)
                continue
            # Command line first: a 2 ms process may be gone by the next syscall.
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    early = f.read()
            except OSError:
                continue
            if not early or not self._inside(pid) or not self._admit():
                continue
            cmd = early.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
            # Gone already: judge what was read (the pid inside is then unknown).
            self.on_exec(read_proc(pid) or Proc(pid, 0, 0, -1, cmd, 0))

    def _admit(self) -> bool:
        """At most `per_second` inspections a second: an exec storm must not eat the host."""
        if self.per_second <= 0:
            return True
        start, count = self._window
        now = time.monotonic()
        if now - start >= 1.0:
            start, count = now, 0
        self._window = (start, count + 1)
        if count >= self.per_second:
            self.skipped += 1
            return False
        return True
