"""A thread that reads datagrams from a kernel netlink socket until stopped."""

from __future__ import annotations

import select
import socket
import struct
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


# A netlink attribute's header: its length (header included) and its type.
_ATTR = struct.Struct("=HH")


def attrs(data: bytes, off: int, end: int) -> dict[int, bytes]:
    """The attributes in `data[off:end]` by type (nested and byte-order flags dropped)."""
    out: dict[int, bytes] = {}
    while off + _ATTR.size <= end:
        length, kind = _ATTR.unpack_from(data, off)
        if length < _ATTR.size:
            break
        out[kind & 0x3FFF] = data[off + _ATTR.size : off + length]
        off += (length + 3) & ~3
    return out


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to four bytes."""
    raw = _ATTR.pack(_ATTR.size + len(payload), kind) + payload
    return raw + b"\0" * ((4 - len(raw) % 4) % 4)
