"""The detached last check of the protected paths does not hold coi's stdout: a reader of the
command's output (`$(coi run -- cmd)`) sees its end when coi exits, not after the stop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Run in a process of its own whose stdout is a pipe, as a caller's would be. The settle
# process it spawns is stood in for by one that writes to stdout and stays a while: the
# reader must get EOF once the spawning process is gone, with nothing of the stand-in's.
SPAWNER = """
import subprocess, sys
real = subprocess.Popen
def popen(argv, **kw):
    stay = "print('held', flush=True); import time; time.sleep(10)"
    return real([sys.executable, "-c", stay], **kw)
subprocess.Popen = popen
from coi.protection import guard
pid = guard.settle_when_gone("c", "op", project="default", remote=None)
open(sys.argv[1], "w").write(str(pid))
"""


def test_settle_process_is_not_on_coi_stdout(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen(
        [sys.executable, "-c", SPAWNER, str(pidfile)], stdout=subprocess.PIPE, env=os.environ
    )
    try:
        out, _ = proc.communicate(timeout=60)  # returns at EOF: no child may hold the pipe
    finally:
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), 9)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0
    assert out == b""
