"""Lock files on the host: what coi processes of one user hold so that only one at a time
changes a shared thing (a network, a slot, a template, a protection manifest)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def open_lock(path: Path) -> int:
    """Open (creating) a lock file; its directory is made too. The descriptor is not
    inherited by programs coi starts, so none of them keeps a lock coi let go of."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)


@contextmanager
def held(path: Path) -> Iterator[None]:
    """Hold the lock file `path` exclusively for the block, waiting for it if need be."""
    fd = open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


@contextmanager
def tried(path: Path) -> Iterator[bool]:
    """Take the lock file `path` exclusively if nobody holds it (shared or not): yields
    whether it was taken; a lock taken is held for the block."""
    fd = open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)
