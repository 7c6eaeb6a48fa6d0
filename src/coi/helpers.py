"""coi's detached host helpers (the keeper of a run, the time-limit watchdog, the monitor
service): started by coi, in a session of their own, outliving it."""

from __future__ import annotations

import subprocess
import sys


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
