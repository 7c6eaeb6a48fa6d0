"""coi's detached host helpers (the keeper of a run, the time-limit watchdog, the monitor
service): started by coi, in a session of their own, outliving it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def spawn(
    module: str, *args: str, project: str, remote: str | None = None
) -> subprocess.Popen[bytes]:
    """`python -m module args... --project P [--remote R]`, detached: no terminal, no signal
    to coi's process group reaches it, and it holds none of coi's files."""
    argv = [sys.executable, "-m", module, *args, "--project", project]
    if remote:
        argv += ["--remote", remote]
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def pid_alive(pid: int) -> bool:
    """Is there a process of that id (perhaps another user's)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (None: no such process); with the
    pid it names one process, as a pid alone may be reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses.
    return stat.rsplit(")", 1)[1].split()[19]


def keeper(
    container: str,
    *,
    project: str,
    remote: str | None,
    claim: Path | None = None,
    save: tuple[str, Path] | None = None,
) -> subprocess.Popen[bytes]:
    """Start the keeper of `container` for this process (`coi.sessions.keeper`): it ends the
    container should this process die first. `claim`: the file claiming its slot, removed
    with it; `save`: (folder in the container, host folder) to save before it ends it."""
    extra: list[str] = []
    if claim is not None:
        extra += ["--claim", str(claim)]
    if save is not None:
        extra += ["--save", save[0], str(save[1])]
    start = process_start(os.getpid()) or ""
    return spawn(
        "coi.sessions.keeper", container, str(os.getpid()), start, *extra,
        project=project, remote=remote,
    )  # fmt: skip


def dismiss(proc: subprocess.Popen[bytes] | None) -> None:
    """Its owner ended the work itself: a keeper (or another helper) has nothing left to do."""
    if proc is None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        pass
