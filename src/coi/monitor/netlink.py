"""A thread that reads datagrams from a kernel netlink socket until stopped."""

from __future__ import annotations

import select
import socket
import threading


class NetlinkReader:
    """Subclasses open `self.sock` and handle each datagram in `handle`."""

    name = "coi-netlink"

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def handle(self, data: bytes) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.5)
            if not ready:
                continue
            # Everything queued, then back to select: one wake-up for a burst of events.
            for _ in range(256):
                try:
                    data = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError:
                    continue  # ENOBUFS when the kernel had more than the buffer: read on
                self.handle(data)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
        self.sock.close()
