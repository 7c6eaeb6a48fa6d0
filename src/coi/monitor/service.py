"""The monitor that outlives coi: a detached host process per session that takes over the
watch whenever no coi watches (detached, `--background`, or coi killed).

One lock per container says who watches: `coi shell` and `coi attach` hold it while their own
monitor runs (alerts on the user's terminal). The service waits on standby; when the lock
comes free (coi detached, exited or was killed, the kernel releasing its lock with it), the
service takes it and monitors, responding and writing the audit log as coi would, until the
container is gone or stopped. A coi that attaches again asks the service to step down
(SIGUSR1), takes the lock, and the service goes back to standby. So exactly one monitor
watches at any time, and the agent cannot outlast it by waiting for the user to detach.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coi import helpers
from coi.config.paths import coi_home
from coi.locks import open_lock

if TYPE_CHECKING:
    from coi.backend.client import IncusClient
    from coi.monitor.monitor import Settings

# How often the standby looks at the lock, and whether its container still runs.
POLL = 1.0


def lock_path(container: str) -> Path:
    return coi_home() / "locks" / f"monitor-{container}.lock"


def pid_path(container: str) -> Path:
    return coi_home() / "locks" / f"monitor-{container}.pid"


def running_service(container: str) -> int:
    """The pid of the container's service when one lives (0: none)."""
    try:
        pid = int(pid_path(container).read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return 0
    return pid if b"coi.monitor.service" in cmdline and container.encode() in cmdline else 0


def settings_json(settings: Settings) -> str:
    """The settings a service is started with (its network view it reads from the bridge)."""
    data = {k: v for k, v in asdict(settings).items() if k != "net"}
    return json.dumps(data)


def spawn(settings: Settings, container: str, *, project: str, remote: str | None) -> int:
    """Start the container's service unless one lives; its pid."""
    if pid := running_service(container):
        return pid
    return helpers.spawn(
        "coi.monitor.service", container, "--settings", settings_json(settings),
        project=project, remote=remote,
    ).pid  # fmt: skip


@contextlib.contextmanager
def watching_here(container: str, timeout: float = 10.0) -> Iterator[None]:
    """Hold the container's monitor lock while coi's own monitor runs: a service that has it
    is asked to step down first (its monitor stops, the lock comes free)."""
    fd = open_lock(lock_path(container))
    try:
        if not _try_lock(fd):
            if pid := running_service(container):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGUSR1)
            deadline = time.monotonic() + timeout
            while not _try_lock(fd):
                if time.monotonic() > deadline:
                    break  # watched by the service all the same; coi's monitor runs beside
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # the lock goes with it: a standby service takes over


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _alive(client: IncusClient, container: str) -> bool:
    from coi.errors import NotFound

    try:
        return client.instances.get(container).active
    except NotFound:
        return False


def _settings(raw: str) -> Settings:
    from coi.monitor.monitor import Settings

    known = {f.name for f in fields(Settings)} - {"net"}
    data: dict[str, Any] = {k: v for k, v in json.loads(raw).items() if k in known}
    return Settings(**data)


def serve(container: str, settings: Settings, *, project: str, remote: str | None) -> int:
    """Standby, then watch whenever no coi does, until the container is gone or stopped."""
    from coi.backend.client import IncusClient
    from coi.errors import BackendError

    step_down = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: step_down.set())
    pid_path(container).parent.mkdir(parents=True, exist_ok=True)
    pid_path(container).write_text(f"{os.getpid()}\n")
    fd = open_lock(lock_path(container))
    try:
        while True:
            try:
                # Connected afresh after a failure: the daemon may have restarted.
                with IncusClient.connect(env=os.environ, remote=remote, project=project) as c:
                    if _watch(c, container, settings, fd, step_down):
                        return 0
            except (BackendError, OSError, ValueError):
                pass  # the daemon restarting, or half up: look again
            time.sleep(POLL)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            if running_service(container) == os.getpid():
                pid_path(container).unlink()


def _watch(
    client: IncusClient,
    container: str,
    settings: Settings,
    fd: int,
    step_down: threading.Event,
) -> bool:
    """Standby and watch on one connection; True once the container is gone or stopped."""
    from coi.monitor.monitor import Monitor, context_of

    while True:
        if not _alive(client, container):
            return True
        if not _try_lock(fd):
            time.sleep(POLL)
            continue
        try:
            step_down.clear()
            settings.net = context_of(client, container)
            mon = Monitor(client, container, settings, alert=lambda _text: None)
            mon.start()
            try:
                while not step_down.wait(POLL):
                    if mon.responder.killed or not _alive(client, container):
                        return True
            finally:
                mon.stop()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        time.sleep(POLL)  # coi, which asked, takes the lock meanwhile


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="coi-monitor-service")
    ap.add_argument("container")
    ap.add_argument("--project", default="default")
    ap.add_argument("--remote", default=None)
    ap.add_argument("--settings", required=True)
    a = ap.parse_args(argv)
    try:
        return serve(a.container, _settings(a.settings), project=a.project, remote=a.remote)
    except Exception:  # a detached helper has nowhere to report; the audit log says what it did
        return 1


if __name__ == "__main__":
    sys.exit(main())
