"""Every file the container's processes open, as it is opened (fanotify, from the host); root.

A sweep sees a file only while some process holds it open: `grep -r` over a home, or a shell's
`read < ~/.ssh/id_rsa`, opens, reads and closes a key in a millisecond, between two sweeps,
with no telling command line. fanotify reports each open the moment it happens. The watcher
marks two mounts of the container, through its init's root: its root file system (homes,
/etc) and its /proc (another process's environ); the host's own opens of the same files are
not on those mounts and are not reported. Each event comes with an open descriptor of the
file, whose path is read and the descriptor closed; only credential-shaped paths go further.
No cost while nothing opens files; a build that opens thousands a second costs a read and a
readlink each.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
import threading
import time
from collections.abc import Callable

from coi.monitor.collect import Proc, read_proc

FAN_CLASS_NOTIF = 0x0
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_MARK_ADD = 0x1
FAN_MARK_MOUNT = 0x10
FAN_OPEN = 0x20
FAN_Q_OVERFLOW = 0x4000
FAN_NOFD = -1
AT_FDCWD = -100
_META = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        _libc.fanotify_mark.argtypes = [
            ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p
        ]  # fmt: skip
    return _libc


def available() -> bool:
    return os.geteuid() == 0


def parse(data: bytes) -> list[tuple[int, int, int]]:
    """(mask, fd, pid) of each event in one read."""
    out = []
    off = 0
    while off + _META.size <= len(data):
        length, _vers, _res, _mlen, mask, fd, pid = _META.unpack_from(data, off)
        if length < _META.size:
            break
        out.append((mask, fd, pid))
        off += length
    return out


def credential_shaped(path: str) -> bool:
    """A cheap first look at a path before the credential rules: its last part is one a
    key store or token file can have (the rules then judge the whole path)."""
    name = path.rsplit("/", 1)[-1]
    return (
        name.startswith(("id_", ".env", "privkey", "key3", "key4"))
        or name in _NAMES
        or name.endswith(_ENDINGS)
        or "/.gnupg/" in path
        or "/.password-store/" in path
        or "/keyrings/" in path
        or "/.azure/" in path
    )


_NAMES = frozenset({
    "credentials", "config", "config.json", ".git-credentials", ".netrc", ".pgpass",
    ".npmrc", ".pypirc", "hosts.yml", "logins.json", "cookies.sqlite", "Login Data",
    "Cookies", "Local State", "shadow", "gshadow", "environ", "authorized_keys", "tokens",
    "credentials.db", "access_tokens.db",
})  # fmt: skip
_ENDINGS = ("_key", "-key.pem", "_key.pem", ".key.pem", ".p12", ".pfx", ".jks", ".keystore")


class OpenWatcher:
    """Calls `on_open` with (the process, the path) of every credential-shaped file a process
    of the container opens; `inside(pid)` says whether a pid is the container's."""

    def __init__(
        self,
        init_pid: int,
        on_open: Callable[[Proc, str], None],
        inside: Callable[[int], bool],
    ) -> None:
        c = _c()
        fd = c.fanotify_init(
            FAN_CLASS_NOTIF | FAN_CLOEXEC, os.O_RDONLY | getattr(os, "O_LARGEFILE", 0)
        )
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fanotify_init: {os.strerror(err)}")
        self.fd = fd
        self.on_open = on_open
        self.inside = inside
        marked = 0
        for where in (f"/proc/{init_pid}/root", f"/proc/{init_pid}/root/proc"):
            flags = FAN_MARK_ADD | FAN_MARK_MOUNT
            if c.fanotify_mark(fd, flags, FAN_OPEN, AT_FDCWD, where.encode()) == 0:
                marked += 1
        if not marked:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"fanotify_mark: {os.strerror(err)}")
        self._me = os.getpid()
        self._stop = threading.Event()
        self._seen: dict[tuple[int, str], float] = {}
        self._thread = threading.Thread(target=self._run, name="coi-open-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        # A read blocked on the group is not woken by closing it in another thread: the loop
        # waits with a timeout instead (select), so it sees the stop within its period.
        self._thread.join(timeout=2)
        try:
            os.close(self.fd)
        except OSError:
            pass

    def _run(self) -> None:
        import select

        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(250):
                continue
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                return
            for _mask, fd, pid in parse(data):
                if fd == FAN_NOFD or fd < 0:
                    continue  # a queue overflow: nothing to look at
                try:
                    path = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    path = ""
                finally:
                    os.close(fd)
                if pid != self._me and path and credential_shaped(path):
                    self._judge(pid, path)

    def _judge(self, pid: int, path: str) -> None:
        now = time.monotonic()
        if now - self._seen.get((pid, path), -1e9) < 30:
            return  # the same process reading the same file again
        self._seen[(pid, path)] = now
        if len(self._seen) > 4096:
            self._seen = {k: v for k, v in self._seen.items() if now - v < 30}
        if not self.inside(pid) and os.path.exists(f"/proc/{pid}"):
            return  # a host process (through /proc/<init>/root): not the container's
        # One gone before its event was read (a busy host) is the container's all the same:
        # the marks are on the container's own mounts. Dropping those is the likely cause of
        # the misses of one table run (5 of 33 reads).
        # Gone already (a 1 ms `cat`): named by its host pid, so that two of them are two.
        proc = read_proc(pid) or Proc(pid, 0, 0, -1, f"[ended; host pid {pid}]", 0)
        proc.files.append(path)
        self.on_open(proc, path)
