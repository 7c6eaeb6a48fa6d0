"""`max_duration`: a small detached host process that stops the container when time is up.

It runs apart from the coi command that started it, so the limit holds when the user
detaches (`coi shell --background`, closing the terminal) or coi is killed; nothing inside
the container can stop it. It gives up as soon as the container is gone or was replaced.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from coi import helpers, labels
from coi.audit import AuditLog, Event

# Wake up this often to notice that the container is gone (then the watchdog exits).
_CHECK_EVERY = 30.0


def spawn(
    container: str, deadline: float, *, project: str, remote: str | None, graceful: bool
) -> int:
    """Start the watchdog detached from this process; returns its pid."""
    extra = () if graceful else ("--force",)
    return helpers.spawn(
        "coi.limits.watchdog", container, f"{deadline:.3f}", *extra, project=project, remote=remote
    ).pid


def watch(container: str, deadline: float, *, project: str, remote: str | None, force: bool) -> int:
    from coi.backend.client import IncusClient
    from coi.errors import BackendError, NotFound

    with IncusClient.connect(env=os.environ, remote=remote, project=project) as client:
        while True:
            try:
                inst = client.instances.get(container)
            except NotFound:
                return 0
            if inst.config.get(labels.DEADLINE) != f"{deadline:.3f}" or not inst.running:
                return 0  # replaced, limit changed, or already stopped
            left = deadline - time.time()
            if left <= 0:
                break
            time.sleep(min(left, _CHECK_EVERY))
        try:
            if not force:
                try:
                    client.instances.stop(container, timeout=10)
                except BackendError:
                    client.instances.stop(container, force=True)
            else:
                client.instances.stop(container, force=True)
        except NotFound:
            return 0
        AuditLog(container).write(
            Event(
                level="info",
                category="limits",
                title="Time limit reached",
                description=f"{container} stopped: max_duration reached",
                evidence={"deadline": deadline},
                action="stopped",
            )
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="coi-watchdog")
    ap.add_argument("container")
    ap.add_argument("deadline", type=float)
    ap.add_argument("--project", default="default")
    ap.add_argument("--remote", default=None)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    try:
        return watch(a.container, a.deadline, project=a.project, remote=a.remote, force=a.force)
    except Exception:  # a detached helper has nowhere to report; the audit log says if it acted
        return 1


if __name__ == "__main__":
    sys.exit(main())
