"""The keeper of a `coi run` sandbox: a detached host process that ends it if coi dies.

`coi run` removes its sandbox when the command ends, on Ctrl-C and on SIGTERM. Killed with
SIGKILL (or by the OOM killer, or a lost terminal session) it can do nothing, and its
sandbox would run on with no owner, no monitor and no cleanup. So before it makes the
sandbox, `coi run` starts this keeper in a session of its own. The keeper watches coi's
process (its pid and start time, so a reused pid does not fool it) once a second; when coi
is gone without having dismissed it, it force-stops the container (an ephemeral one is
deleted by the daemon as it stops; a persistent one is left stopped, as `coi run` leaves it)
and writes an audit event. A container still being created when coi died is waited for,
a bounded time, and ended as it appears. `coi run` dismisses the keeper (SIGTERM) once it
has ended the sandbox itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from coi import helpers, labels

if TYPE_CHECKING:
    from coi.backend.client import IncusClient

# How often the owner is looked at: a dead coi's sandbox is stopped within about this long,
# plus the daemon's stop.
POLL = 1.0
# The names of `coi build`'s containers.
BUILD_PREFIX = "coi-build-"
# A create the daemon had under way when coi died lands within this long, or not at all.
LANDING = 60.0
# A daemon that does not answer (killed, restarting) is waited for this long: the sandbox
# runs on without it (its processes are not the daemon's), so it must be ended once it is back.
DAEMON_BACK = 900.0


process_start = helpers.process_start


def alive(pid: int, start: str) -> bool:
    return process_start(pid) == start


# Start the keeper of a container for this process, detached from it (`helpers.keeper`).
spawn = helpers.keeper


dismiss = helpers.dismiss  # coi ended its sandbox itself: the keeper has nothing left to do


def keep(
    container: str,
    owner: int,
    start: str,
    *,
    project: str,
    remote: str | None,
    claim: Path | None = None,
    save: tuple[str, Path] | None = None,
) -> int:
    while alive(owner, start):
        time.sleep(POLL)
    # coi is gone and did not dismiss us: free its slot, end what it left (including a
    # container whose create the daemon was still carrying out), then check its protected
    # paths once nothing inside can change them any more.
    _unclaim(claim, owner)
    gone = _end(container, owner, project=project, remote=remote, save=save)
    if gone and container.startswith(BUILD_PREFIX):
        _drop_build_image(container, project=project, remote=remote)
    _settle(container, removed=gone)
    return 0


def _unclaim(claim: Path | None, owner: int) -> None:
    try:
        if claim is not None and int(claim.read_text().strip() or "0") == owner:
            claim.unlink()
    except (OSError, ValueError):
        pass


def _settle(container: str, *, removed: bool) -> None:
    from coi.protection.guard import Guard, settle

    if Guard(container).exists():
        settle(container, removed=removed)


def _end(
    container: str,
    owner: int,
    *,
    project: str,
    remote: str | None,
    save: tuple[str, Path] | None = None,
) -> bool:
    """Stop the container (the daemon deletes an ephemeral one); whether it is gone."""
    from coi.backend.client import IncusClient
    from coi.errors import BackendError, DaemonUnreachable

    landing = time.monotonic() + LANDING
    give_up = time.monotonic() + DAEMON_BACK
    state = _Ending(container, owner, save)
    while time.monotonic() < landing:
        try:
            # Connected afresh after a failure: a restarting daemon has no socket for a while,
            # and a connection to the one that died is no use.
            with IncusClient.connect(env=os.environ, remote=remote, project=project) as client:
                while time.monotonic() < landing:
                    done = state.look(client)
                    if done is not None:
                        return done
                    if state.waiting:
                        # The daemon still works on it (a create, a start, a stop): its task
                        # ends on its own, then the container is ended.
                        landing = min(max(landing, time.monotonic() + LANDING), give_up)
                    time.sleep(POLL)
        except DaemonUnreachable:
            # Gone or restarting: the landing clock waits with it, up to DAEMON_BACK.
            landing = min(max(landing, time.monotonic() + LANDING), give_up)
        except (BackendError, OSError, ValueError):
            pass  # busy with the create or start still, or half up: look again
        time.sleep(POLL)
    return not state.acted


class _Ending:
    """What the keeper has seen and done of its container, one look at a time."""

    def __init__(self, container: str, owner: int, save: tuple[str, Path] | None = None) -> None:
        self.container = container
        self.owner = owner
        self.save = save  # the conversation to save first, once
        self.acted = False
        self.absent = 0  # looks in a row that found no container and no daemon task on it
        self.waiting = False  # the last look found a task of the daemon's on it

    def look(self, client: IncusClient) -> bool | None:
        """One look and what it calls for; whether the container is gone once done (None:
        not done, look again)."""
        from coi.errors import NotFound

        name = self.container
        self.waiting = False
        try:
            inst = client.instances.get(name)
        except NotFound:
            if self.acted:
                return True
            # Never made, or its create not begun: seen twice, a second apart, with no task
            # of the daemon's on it, it is not coming (a request coi sent just before it died
            # has become a task by then).
            self.absent = 0 if name in client.instances.busy() else self.absent + 1
            return True if self.absent >= 2 else None
        self.absent = 0
        persistent = inst.config.get(labels.PERSISTENT) == "true"
        if inst.running:
            if self.save is not None:
                save, self.save = self.save, None
                _save(client, name, *save)
            client.instances.stop(name, force=True)
            if not self.acted:
                _audit(name, self.owner)
            self.acted = True
        elif not persistent:
            if name in client.instances.busy():
                # Stopped with a task of the daemon's on it (its start or a stop under way):
                # that task ends on its own, then it is looked at again.
                self.waiting = True
                return None
            client.instances.delete(name, force=True)
            self.acted = True
        elif self.acted or name not in client.instances.busy():
            return False  # a persistent one, stopped: as coi run leaves it
        return None


def _drop_build_image(container: str, *, project: str, remote: str | None) -> None:
    """The image a killed `coi build` published from this container and never named."""
    from coi.backend.client import IncusClient
    from coi.errors import CoiError
    from coi.images.builder import drop_orphans

    try:
        with IncusClient.connect(env=os.environ, remote=remote, project=project) as client:
            drop_orphans(client, container=container)
    except (CoiError, OSError):
        pass  # `coi clean` and the next build look for it too


def _save(client: IncusClient, container: str, remote: str, target: Path) -> None:
    """Save the conversation coi was saving when it died (as `coi shell` would have): pulled
    beside the saved copy and swapped in whole; the previous save stays if anything fails."""
    import shutil
    import tempfile

    from coi.errors import CoiError
    from coi.sessions.store import now_rfc3339, swap_in, update_metadata

    try:
        if client.files.stat(container, remote) is None:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".pull-", dir=target.parent))
        try:
            client.files.pull_tree(container, remote, tmp / "state")
            swap_in(target, tmp / "state")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        update_metadata(target.parent, saved_at=now_rfc3339())
    except (CoiError, OSError, ValueError):
        pass  # the previous save is whole; the container is ended all the same


def _audit(container: str, owner: int) -> None:
    # Imported when acting only: the keeper of every coi run starts, the audit log (and the
    # config it reads) is 40 ms of imports few of them need.
    from coi.audit import AuditLog, Event

    AuditLog(container).write(
        Event(
            level="warning",
            category="lifecycle",
            title="Owner gone",
            description=f"{container} stopped: the coi process that owned it died (pid {owner})",
            evidence={"owner_pid": owner},
            action="stopped",
        )
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="coi-keeper")
    ap.add_argument("container")
    ap.add_argument("owner", type=int)
    ap.add_argument("start")
    ap.add_argument("--project", default="default")
    ap.add_argument("--remote", default=None)
    ap.add_argument("--claim", type=Path, default=None)
    ap.add_argument("--save", nargs=2, metavar=("REMOTE", "TARGET"), default=None)
    a = ap.parse_args(argv)
    save = (a.save[0], Path(a.save[1])) if a.save else None
    try:
        return keep(
            a.container, a.owner, a.start,
            project=a.project, remote=a.remote, claim=a.claim, save=save,
        )  # fmt: skip
    except Exception:  # a detached helper has nowhere to report; the audit log says if it acted
        return 1


if __name__ == "__main__":
    sys.exit(main())
