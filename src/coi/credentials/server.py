"""Run a broker on a unix socket: uvicorn in a thread, with its own event loop.

Through the API (`session_broker`), a thread of the caller: it dies with it whatever kills
it (SIGKILL included), the credential is never handed to another process, and starting it
costs a thread, not an interpreter (measured in docs/performance.md); the price is sharing
the caller's GIL, which matters little: the broker waits on sockets nearly all the time.
`coi shell` runs the same thread in a host process of its own (`coi.credentials.service`):
its sandbox outlives the coi that made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import threading
from pathlib import Path

import uvicorn

from coi.backend._httpx import httpx
from coi.credentials.broker import Broker
from coi.credentials.session import MAX_SOCKET_PATH
from coi.errors import SessionError

# uvicorn's own loggers say nothing on coi's terminal (the agent's tmux is there); the
# broker's audit log is its record.
_QUIET = logging.getLogger("uvicorn")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def http_client(ca_bundle: str = "", *, trust_env: bool = True) -> httpx.AsyncClient:
    """The broker's client for upstreams: verified TLS (against `ca_bundle` when given), no
    redirects followed, long read timeouts for streamed answers."""
    verify: ssl.SSLContext | bool = True
    if ca_bundle:
        verify = ssl.create_default_context(cafile=ca_bundle)
    return httpx.AsyncClient(
        verify=verify,
        follow_redirects=False,
        trust_env=trust_env,
        timeout=httpx.Timeout(connect=30.0, read=600.0, write=600.0, pool=60.0),
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
    )


def bind_socket(path: Path) -> socket.socket:
    """A listening-ready unix socket at `path`, mode 0600, in a directory only we can enter.

    :raises SessionError: the path is too long, or cannot be made.
    """
    if len(str(path)) > MAX_SOCKET_PATH:
        raise SessionError(
            f"the broker's socket path is too long for a unix socket: {path}",
            resolution="Set COI_HOME to a shorter folder.",
        )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
    except OSError as err:
        sock.close()
        raise SessionError(f"cannot make the broker's socket {path}: {err}") from err
    return sock


class BrokerServer:
    """One broker, served on one unix socket by a thread of this process."""

    def __init__(
        self, broker: Broker, path: Path, *, ca_bundle: str = "", trust_env: bool = True
    ) -> None:
        self.broker = broker
        self.path = path
        self._ca_bundle = ca_bundle
        self._trust_env = trust_env
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Listen on the socket; returns once requests are served.

        :raises SessionError: the server did not come up.
        """
        sock = bind_socket(self.path)
        config = uvicorn.Config(
            self.broker,
            log_config=None,
            access_log=False,
            lifespan="off",
            http="h11",
            ws="none",
            timeout_graceful_shutdown=1,
            server_header=False,
            proxy_headers=False,
            date_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name=f"coi-broker-{self.broker.container}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            raise SessionError(f"the credential broker did not start: {self._error or 'timeout'}")

    def _run(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(sock))
        except BaseException as err:  # reported to start(); nothing else can see it
            self._error = err
            self._ready.set()
        finally:
            loop.close()
            sock.close()

    async def _serve(self, sock: socket.socket) -> None:
        assert self._server is not None
        if self.broker.client is None:
            # Made in the loop that uses it.
            self.broker.client = http_client(self._ca_bundle, trust_env=self._trust_env)
        watcher = asyncio.create_task(self._watch_started())
        try:
            await self._server.serve(sockets=[sock])
        finally:
            watcher.cancel()
            await self.broker.client.aclose()

    async def _watch_started(self) -> None:
        assert self._server is not None
        while not self._server.started:
            await asyncio.sleep(0.005)
        self._ready.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving (requests in flight are cut), close the upstream connections and
        remove the socket. Idempotent."""
        self.broker.closed = True
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
