"""Broker sockets whose broker is gone: a broker killed with SIGKILL (or a host that lost
power) cannot remove its socket file; the next session's broker and `coi clean` do.

A socket is stale when nothing accepts on it (connect is refused) and it is older than
`GRACE`: a broker binds its socket a moment before it listens, and a sweep by another coi in
that moment must not take a starting broker's socket. Only sockets in the brokers folder
(`~/.coi/brokers/`, 0700, coi's own) are looked at; other files there are left alone.
"""

from __future__ import annotations

import contextlib
import socket
import stat
import time
from pathlib import Path

FOLDER = "brokers"
# A live broker listens well within a second of binding (measured: under 0.1 s).
GRACE = 60.0


def folder(home: Path) -> Path:
    """Where the brokers of this coi home keep their sockets."""
    return home / FOLDER


def is_stale(path: Path, *, now: float | None = None, grace: float = GRACE) -> bool:
    """Nothing listens on this socket, and it is older than `grace` seconds."""
    try:
        st = path.lstat()
    except OSError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        return False
    if (time.time() if now is None else now) - st.st_mtime < grace:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(str(path))
        except ConnectionRefusedError:
            return True  # bound by a process that is gone (or never listened)
        except OSError:
            return False  # gone meanwhile, or a full backlog (a busy live broker)
    return False


def stale(home: Path, *, grace: float = GRACE) -> list[Path]:
    """The stale broker sockets of this coi home."""
    try:
        entries = sorted(folder(home).glob("*.sock"))
    except OSError:
        return []
    now = time.time()
    return [p for p in entries if is_stale(p, now=now, grace=grace)]


def remove_stale(home: Path, *, grace: float = GRACE) -> list[Path]:
    """Remove the stale broker sockets of this coi home; those removed."""
    gone = []
    for p in stale(home, grace=grace):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            gone.append(p)
    return gone
