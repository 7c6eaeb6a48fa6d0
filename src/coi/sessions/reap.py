"""After the daemon restarted (a power loss, a crash): remove the `coi run` sandboxes it left.

A `coi run` sandbox is ephemeral: the daemon deletes it when it stops. When the machine
loses power, or the daemon and the containers are killed together, it is never stopped that
way: the daemon comes back with it stopped (coi makes every sandbox with
`boot.autostart=false`, so it is not started again), and before this it stayed until the
user ran `coi clean`. Every `coi run` and `coi shell` compares the daemon's process id with
the one it saw last (one small file read); when it changed, a detached child of coi's looks
once for stopped ephemeral `run` sandboxes whose coi is gone, and deletes them. Nothing is
on the session's own path.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from coi import helpers, labels
from coi.config.paths import coi_home
from coi.fsio import write_atomic

if TYPE_CHECKING:
    from coi.backend.client import IncusClient


def _seen_path(project: str) -> Path:
    # The project name is the daemon's, and names with no path separators; it is kept to
    # letters, digits, '-' and '_' all the same, as it names a file of ours.
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in project)
    return coi_home() / "state" / f"daemon-seen-{safe}"


def after_restart(client: IncusClient, *, remote: str | None) -> bool:
    """Start the reaper when the daemon's process is not the one seen last; whether it was."""
    pid = client.server.pid
    if not pid:
        return False
    path = _seen_path(client.project)
    try:
        if path.read_text().strip() == str(pid):
            return False
    except OSError:
        pass
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, f"{pid}\n")
    helpers.spawn("coi.sessions.reap", project=client.project, remote=remote)
    return True


def leftovers(client: IncusClient, live: set[str]) -> list[str]:
    """Stopped ephemeral `coi run` sandboxes and spares of this machine whose coi is gone
    (`live`: the containers a running coi holds a slot for: one being made is stopped for a
    moment)."""
    import socket

    here = socket.gethostname()
    out = []
    for inst in client.instances.list():
        cfg = inst.config
        if (
            inst.ephemeral
            and inst.status == "Stopped"
            and cfg.get(labels.KIND) in ("run", "spare")
            and cfg.get(labels.OWNER_HOST) == here
            and inst.name not in live
            and not _alive(cfg.get(labels.OWNER_PID, ""))
        ):
            out.append(inst.name)
    return out


def _alive(pid: str) -> bool:
    return pid.isdigit() and helpers.process_start(int(pid)) is not None


def reap(client: IncusClient) -> list[str]:
    """Delete what `leftovers` finds; the names deleted."""
    from coi.errors import BackendError
    from coi.sessions.slots import claimed_containers

    gone = []
    for name in leftovers(client, claimed_containers(coi_home() / "locks")):
        try:
            client.instances.delete(name, force=True)
            gone.append(name)
        except BackendError:
            pass  # the next restart, or `coi clean`
    return gone


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="coi-reap")
    ap.add_argument("--project", default="default")
    ap.add_argument("--remote", default=None)
    a = ap.parse_args(argv)
    from coi.backend.client import IncusClient

    try:
        with IncusClient.connect(env=os.environ, remote=a.remote, project=a.project) as client:
            gone = reap(client)
    except Exception as err:  # a detached helper has nowhere to report but its log
        gone, failure = [], str(err)
    else:
        failure = ""
    if gone or failure:
        log = coi_home() / "logs" / "reap.log"
        with contextlib.suppress(OSError):
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as f:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                what = f"removed {', '.join(gone)}" if gone else f"failed: {failure}"
                f.write(f"{stamp} after a daemon restart, project {a.project}: {what}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
