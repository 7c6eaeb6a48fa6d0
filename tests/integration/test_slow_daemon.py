"""A daemon that answers slowly, or not at all (a proxy on a unix socket of the test's own, in
front of the real one): coi works slowly, or says the daemon does not answer; it never hangs."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import run_coi

from coi.backend import IncusClient

pytestmark = pytest.mark.incus


class Proxy:
    """Forwards to the daemon's socket, each answer held back `delay` s (None: forever)."""

    def __init__(self, path: Path, target: str, delay: float | None) -> None:
        self.path, self.target, self.delay = path, target, delay
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(64)
        self.open: list[socket.socket] = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.open.append(conn)
            if self.delay is None:
                continue  # taken in, never answered
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.connect(self.target)
            self.open.append(up)
            threading.Thread(target=self._pump, args=(conn, up, 0.0), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, conn, self.delay), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while data := src.recv(65536):
                if delay:
                    time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.stop.set()
        self.server.close()
        for s in self.open:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def daemon_socket(client: IncusClient) -> str:
    path = client.endpoint.socket_path
    if not path:
        pytest.fail("the test daemon is not on a local socket", pytrace=False)
    return path


@pytest.fixture
def stalled(tmp_path: Path, daemon_socket: str) -> Iterator[str]:
    proxy = Proxy(tmp_path / "stalled.sock", daemon_socket, None)
    yield str(proxy.path)
    proxy.close()


@pytest.fixture
def slow(tmp_path: Path, daemon_socket: str) -> Iterator[str]:
    proxy = Proxy(tmp_path / "slow.sock", daemon_socket, 0.05)
    yield str(proxy.path)
    proxy.close()


def _env(coi_env: dict[str, str], sock: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in coi_env.items() if k not in ("INCUS_SOCKET", "LXD_SOCKET")}
    return {**env, "INCUS_SOCKET": sock, "COI_IMAGE": "coi-tiny", **extra}


@pytest.mark.parametrize("argv", [["list"], ["run", "--", "true"]], ids=["list", "run"])
def test_a_daemon_that_does_not_answer_is_said_so_in_bounded_time(
    coi_env: dict[str, str], stalled: str, tmp_path: Path, argv: list[str]
) -> None:
    env = _env(coi_env, stalled, COI_DAEMON_TIMEOUT="3")
    started = time.monotonic()
    res = run_coi(*argv, env=env, cwd=tmp_path, timeout=60)
    took = time.monotonic() - started
    assert res.returncode != 0
    assert "did not answer in time" in res.stderr, res.stderr
    assert "coi health" in res.stderr  # what to do
    assert took < 20, f"gave up after {took:.1f} s"


def test_a_slow_daemon_is_slow_not_broken(
    client: IncusClient, coi_env: dict[str, str], slow: str, tmp_path: Path
) -> None:
    """Every answer of the daemon 50 ms late (every round trip, every websocket frame): a
    whole `coi run` still works, and says what it does as it goes."""
    ws = tmp_path / "ws"
    ws.mkdir()
    res = run_coi("run", "-w", str(ws), "--", "echo", "through", env=_env(coi_env, slow),
                  timeout=240)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "through"
    assert "Launching container" in res.stderr and "Cleaning up container" in res.stderr
