"""`cp -a` of a folder for a review copy, with a progress line on a terminal for big ones
(bytes written, read from the copying process's own I/O counters); the same line for other
long transfers (`Meter`: a remote sandbox's upload and download)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

from coi.errors import CoiError
from coi.units import binary_text

Progress = Callable[[int, int], None]  # (bytes written so far, bytes in all)
POLL = 0.25  # seconds between two looks at cp's counters
QUIET_FOR = 0.5  # a copy that ends sooner shows nothing


def tree_bytes(root: str) -> int:
    """The size of the regular files under `root` (links not followed)."""
    total, stack = 0, [root]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    return total


def _written(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def copy_tree(src: str, dst: str, *, what: str, progress: Progress | None = None) -> None:
    """`cp -a --reflink=auto src/. dst` (shares extents where the filesystem can; links
    are copied as links, never followed); `progress` is told how far it got.

    :raises CoiError: the copy failed.
    """
    total = tree_bytes(src) if progress is not None else 0
    proc = subprocess.Popen(
        ["cp", "-a", "--reflink=auto", "--no-dereference", "--", f"{src}/.", dst],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    start = time.monotonic()
    shown = False
    while progress is not None and proc.poll() is None:
        time.sleep(POLL)
        if time.monotonic() - start >= QUIET_FOR:
            progress(min(_written(proc.pid), total), total)
            shown = True
    _, err = proc.communicate()
    if shown and progress is not None:
        progress(-1, total)  # done: the line is cleared
    if proc.returncode != 0:
        raise CoiError(
            f"could not copy {what}",
            details=err.strip()[-2000:],
            resolution="Check the folder is readable and there is room (df -h; coi health "
            "for the pool).",
        )


def terminal_progress(label: str) -> Progress | None:
    """A progress line on standard error, or None when it is not a terminal."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        if done < 0:
            sys.stderr.write("\r\033[K")
        else:
            sys.stderr.write(f"\r\033[K{label}: {binary_text(done)} of {binary_text(total)}")
        sys.stderr.flush()

    return show


class Meter:
    """Bytes moved so far, shown on a terminal once a transfer has run half a second, at
    most every POLL seconds; silent off a terminal. Call it with the running total, then
    `done()`."""

    def __init__(self, label: str, total: int) -> None:
        self.show = terminal_progress(label)
        self.total = total
        self.start = time.monotonic()
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if self.show is None or now - self.start < QUIET_FOR or now - self.last < POLL:
            return
        self.last, self.shown = now, True
        self.show(done, max(self.total, done))

    def done(self) -> None:
        if self.show is not None and self.shown:
            self.show(-1, self.total)
