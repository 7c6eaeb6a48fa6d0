"""coi killed with SIGKILL: its sandbox does not run on unwatched (the keeper ends it)."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tests.conftest import coi_argv, run_coi
from tests.integration.conftest import USER, coi_names, user_dir, wait_for

from coi.backend import IncusClient

# coi's keeper looks at its owner once a second; the daemon's forced stop takes a moment.
WITHIN = 10


def _start_run(uenv: dict[str, str], ws: Path, *command: str) -> subprocess.Popen[str]:
    argv = coi_argv("run", "--image", "coi-tiny", "-w", str(ws), "--", *command, user=USER)
    return subprocess.Popen(
        argv, env=uenv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
    )


def _kill_hard(proc: subprocess.Popen[str]) -> None:
    # setpriv execs coi in the same process: its pid is coi's.
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _keepers() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "coi.sessions.keeper"], capture_output=True, text=True)
    return out.stdout.splitlines()


@pytest.mark.parametrize("when", ["running", "launching"])
def test_a_killed_coi_run_leaves_nothing_running(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd, when: str
) -> None:
    """SIGKILL while the command runs, or while the sandbox is still being made: within
    10 s nothing of that run remains, and the next run in the folder works."""
    ws = user_dir(base / "ws", user)
    proc = _start_run(uenv, ws, "sleep", "120")
    if when == "running":
        wait_for(
            lambda: any(client.instances.get(n).running for n in coi_names(client, ws)),
            "the sandbox to run",
        )
        time.sleep(1)  # the command is under way
    else:
        # As soon as coi has a name for it: the create is what is under way.
        wait_for(lambda: bool(_keepers()), "coi to start its keeper")
    _kill_hard(proc)
    killed_at = time.monotonic()
    wait_for(lambda: not coi_names(client, ws), "the sandbox of the killed coi to go", WITHIN + 20)
    took = time.monotonic() - killed_at
    assert took < WITHIN, f"gone after {took:.1f} s"
    wait_for(lambda: not _keepers(), "the keeper to end", 10)
    again = run_coi(
        "run", "--image", "coi-tiny", "-w", str(ws), "--", "echo", "again", env=uenv, user=USER
    )
    assert again.returncode == 0 and again.stdout.strip() == "again", again.stderr


def test_a_run_that_ends_dismisses_its_keeper(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    res = run_coi("run", "--image", "coi-tiny", "-w", str(ws), "--", "true", env=uenv, user=USER)
    assert res.returncode == 0, res.stderr
    assert _keepers() == []
