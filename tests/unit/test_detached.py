"""The detached child that copies spares: it outlives coi and holds none of coi's files."""

from __future__ import annotations

import os
import time
from pathlib import Path

from coi.sessions.sandbox import detached


def test_the_child_runs_on_its_own_and_keeps_no_pipe_of_the_caller_open(tmp_path: Path) -> None:
    done = tmp_path / "done"
    r, w = os.pipe()

    def work() -> None:
        time.sleep(0.5)
        (tmp_path / "part").write_text(str(os.getppid()))
        (tmp_path / "part").rename(done)

    started = time.monotonic()
    detached(work)
    returned = time.monotonic() - started
    os.close(w)
    # EOF at once: the child closed its copy of the pipe (a caller reading coi's output
    # would otherwise wait for the child's work to end).
    assert os.read(r, 1) == b""
    os.close(r)
    assert not done.exists() and returned < 0.5, "detached() waited for the work"
    deadline = time.monotonic() + 10
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done.exists(), "the detached work never ran"
    # Re-parented: the caller does not have to reap it.
    assert done.read_text() != str(os.getpid())
