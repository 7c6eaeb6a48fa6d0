"""The keeper knows its owner by pid and start time, so a reused pid does not fool it."""

from __future__ import annotations

import os
import subprocess

from coi.sessions.keeper import alive, process_start


def test_a_process_is_known_by_its_pid_and_start_time() -> None:
    me = process_start(os.getpid())
    assert me is not None and me.isdigit()
    assert alive(os.getpid(), me)
    assert not alive(os.getpid(), str(int(me) + 1))  # same pid, another process
    done = subprocess.Popen(["true"])
    done.wait()
    assert process_start(done.pid) is None and not alive(done.pid, me)
