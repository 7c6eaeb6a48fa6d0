"""The broker that outlives coi: a detached host process serving one `coi shell` sandbox for
as long as its container runs (docs/credentials.md).

A shell's container outlives the coi that made it (`--background`, a detached tmux, coi
killed), and its agent keeps calling its API; a broker in a thread of coi would stop with
coi. So `session_broker(..., service=True)` hands the session's routes (placeholders and the
real credentials coi found) to this process over a pipe (never its command line or
environment), and it serves them on the session's socket until the container is gone or
stopped, its broker device was replaced or removed (a later session of a persistent
container), coi asks it to stop (SIGTERM), or the daemon has not answered for 15 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from coi.credentials.providers import PROVIDERS, key_variables
from coi.errors import SessionError

if TYPE_CHECKING:
    from coi.backend.client import IncusClient
    from coi.credentials.broker import Limits, Route

# How often the service looks at its container.
POLL = 1.0
# The device must be on the container this long after the start (coi adds it meanwhile).
DEVICE_GRACE = 120.0
# A daemon that has not answered this long (restarting, or gone for good): the service ends.
DAEMON_GRACE = 15 * 60.0
MODULE = "coi.credentials.service"


def payload(
    routes: Mapping[str, Route], limits: Limits, *, socket: Path, home: Path, ca_bundle: str
) -> bytes:
    """What the service is given on its standard input."""
    out = []
    for name, r in routes.items():
        c = r.credential
        cred = {
            "kind": c.kind,
            "secret": c.secret,
            "source": c.source,
            "refresh_token": c.refresh_token,
            "expires_at": c.expires_at,
            "login": c.login is not None,
            "file": str(c.file) if c.file is not None else None,
        }
        out.append(
            {
                "provider": name,
                "token": r.token,
                "upstream": r.upstream,
                "token_url": r.token_url,
                "credential": cred,
            }
        )
    data = {
        "socket": str(socket),
        "home": str(home),
        "ca_bundle": ca_bundle,
        "limits": asdict(limits),
        "routes": out,
    }
    return json.dumps(data).encode()


def _routes(data: list[dict[str, Any]]) -> dict[str, Route]:
    from coi.credentials.broker import Route
    from coi.credentials.sources import Credential

    routes: dict[str, Route] = {}
    for r in data:
        provider = PROVIDERS[r["provider"]]
        c = r["credential"]
        cred = Credential(
            kind=c["kind"],
            secret=c["secret"],
            source=c["source"],
            refresh_token=c["refresh_token"],
            expires_at=c["expires_at"],
            login=provider.oauth_file if c["login"] else None,
            file=Path(c["file"]) if c["file"] else None,
        )
        routes[provider.name] = Route(
            provider=provider,
            token=r["token"],
            credential=cred,
            upstream=r["upstream"],
            token_url=r["token_url"],
        )
    return routes


class Service:
    """coi's side of a service it started: wait until it serves, or stop it."""

    def __init__(self, proc: subprocess.Popen[bytes], container: str) -> None:
        self.proc = proc
        self.container = container
        self._ready = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self, timeout: float = 30.0) -> None:
        """Wait until the service serves its socket.

        :raises SessionError: it ended, or said why it could not start, or took too long.
        """
        if self._ready:
            return
        out = self.proc.stdout
        assert out is not None
        line = _read_line(out, timeout)
        out.close()
        if line != "ready":
            self.stop()
            why = line.removeprefix("error: ") if line else "it ended without a word"
            if line is None:
                why = f"it did not answer within {timeout:.0f} s"
            raise SessionError(
                f"the credential broker for {self.container} did not start: {why}",
                resolution='Run the session again; [credentials] mode = "copy" copies the '
                "tool's login into the sandbox instead.",
            )
        self._ready = True

    def stop(self, timeout: float = 5.0) -> None:
        """End the service (its socket is gone when this returns). Idempotent."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()


def _read_line(stream: IO[bytes], timeout: float) -> str | None:
    """The first line the service writes ("" if it ended first; None: nothing in time)."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = stream.fileno()
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace").strip()


def spawn(
    container: str,
    data: bytes,
    *,
    daemon_socket: str,
    project: str,
    env: Mapping[str, str] | None = None,
) -> Service:
    """Start the service for `container` and hand it `data` (`payload`); returns at once
    (`Service.ready` waits until it serves).

    :raises SessionError: it could not be started.
    """
    env = os.environ if env is None else env
    secret = key_variables()  # its credentials come over the pipe, not in its environment
    argv = [sys.executable, "-m", MODULE, container, "--daemon", daemon_socket]
    argv += ["--project", project]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={k: v for k, v in env.items() if k not in secret},
            cwd="/",
            start_new_session=True,  # not ended with coi's terminal or process group
            close_fds=True,
        )
    except OSError as err:
        raise SessionError(f"cannot start the credential broker: {err}") from err
    assert proc.stdin is not None
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except OSError:
        pass  # it ended already: ready() says so
    return Service(proc, container)


# -- the service itself ---------------------------------------------------------------------


def _verdict(client: IncusClient, container: str, connect: str, seen: bool) -> str | None:
    """Why the service should end now (None: it serves on); the device's state for `seen`."""
    from coi.credentials.session import DEVICE
    from coi.errors import NotFound

    try:
        inst = client.instances.get(container)
    except NotFound:
        return "the container is gone"
    if not inst.active:
        return "the container stopped"
    dev = inst.devices.get(DEVICE) or {}
    if dev.get("connect") == connect:
        return "seen"
    return "its device was removed or replaced" if seen else None


def _forget_device(client: IncusClient, container: str, connect: str) -> None:
    """Take this service's device off its stopped container (when it is still this one's):
    its next start would otherwise spend the daemon's second on a dead socket's forkproxy."""
    from coi.credentials.session import DEVICE
    from coi.errors import BackendError

    with contextlib.suppress(BackendError):
        dev = client.instances.get(container).devices.get(DEVICE) or {}
        if dev.get("connect") == connect:
            client.instances.remove_device(container, DEVICE, expect=dev)


def watch(
    container: str, connect: str, stop: threading.Event, new_client: Callable[[], IncusClient]
) -> str:
    """Wait until the service should end; why. `new_client` connects to the daemon (again,
    after a failure: it may have restarted)."""
    from coi.errors import BackendError

    started = answered = time.monotonic()
    seen = False
    client: IncusClient | None = None
    try:
        while True:
            try:
                if client is None:
                    client = new_client()
                why = _verdict(client, container, connect, seen)
                answered = time.monotonic()
                if why == "seen":
                    seen, why = True, None
                elif why is None and answered - started > DEVICE_GRACE:
                    why = "its device was never added"
                if why is not None:
                    if why == "the container stopped":
                        _forget_device(client, container, connect)
                    return why
            except (BackendError, OSError, ValueError):
                if client is not None:
                    client.close()
                    client = None
                if time.monotonic() - answered > DAEMON_GRACE:
                    return "the daemon did not answer for 15 minutes"
            if stop.wait(POLL):
                return "coi ended the session"
    finally:
        if client is not None:
            client.close()


def _client(daemon_socket: str, project: str) -> IncusClient:
    from coi.backend.client import IncusClient
    from coi.backend.connection import Endpoint

    return IncusClient(Endpoint(socket_path=daemon_socket), project=project)


def _say(line: str) -> None:
    with contextlib.suppress(OSError):  # coi may be gone already: nobody to tell
        os.write(1, (line + "\n").encode())


def serve(container: str, data: dict[str, Any], *, daemon_socket: str, project: str) -> int:
    """Serve the routes in `data` on its socket until the session is over."""
    from coi.audit.log import AuditLog, Event
    from coi.credentials.broker import CATEGORY, Broker, Limits
    from coi.credentials.server import BrokerServer

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    socket = Path(data["socket"])
    audit = AuditLog(container, Path(data["home"]))
    limits = Limits(**data["limits"])
    broker = Broker(container, _routes(data["routes"]), limits=limits, audit=audit)
    server = BrokerServer(broker, socket, ca_bundle=data["ca_bundle"])
    try:
        server.start()
    except SessionError as err:
        _say(f"error: {err.message}")
        return 1
    except OSError as err:  # its folder could not be made
        _say(f"error: cannot make the broker's socket {socket}: {err.strerror or err}")
        return 1
    try:
        _say("ready")
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # coi stops reading: later writes must go nowhere
        os.close(devnull)
        why = watch(container, f"unix:{socket}", stop, lambda: _client(daemon_socket, project))
    finally:
        server.stop()
    audit.write(
        Event(
            level="info",
            category=CATEGORY,
            title="Credential broker stopped",
            description=f"the broker of {container} stopped: {why}",
            evidence={"pid": os.getpid(), "reason": why},
            action="stopped",
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="coi-credentials-service")
    ap.add_argument("container")
    ap.add_argument("--daemon", required=True, help="the daemon's unix socket")
    ap.add_argument("--project", default="default")
    a = ap.parse_args(argv)
    try:
        data = json.loads(sys.stdin.buffer.read())
        sys.stdin.close()
        return serve(a.container, data, daemon_socket=a.daemon, project=a.project)
    except Exception as err:  # detached: the first line of stdout is all coi reads
        _say(f"error: {type(err).__name__}: {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
